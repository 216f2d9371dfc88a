"""Train a CLIP retriever on the built-in shapes data (symmetric InfoNCE).

  python -m cm3jax.train_retriever --config=configs/clip_shapes.py --workdir=workdirs/clip

Text goes through the project's sentencepiece tokenizer: `config.tokenizer`, or one trained on
the train captions into WORKDIR/tokenizer.model. Evaluation embeds the validation split and
reports text->image and image->text recall@1 and @5, a hit being a retrieved item whose scene
equals the query's (two captions can describe one scene, "A above B" and "B below A").
Data-parallel over the mesh; resumes from the latest checkpoint in --workdir.
"""

from cm3jax import cli
from cm3jax.training import train_retriever


def _define_flags():
  cli.define_run_flags("Checkpoints, the tokenizer and TensorBoard events go here; a run "
                       "resumes from it.")


def main(FLAGS):
  train_retriever.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run("train_retriever", _define_flags, main)
