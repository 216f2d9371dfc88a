"""Score a trained model on the shapes data: seen and held-out colour-shape compositions.

  python -m cm3jax.eval_shapes --workdir=workdirs/tiny [--splits=validation,test]

Text->image: an image is generated for each caption of a split and read back by a deterministic
pixel analyser (`analyse`); it counts as right when it shows exactly the things, sizes, colours,
shapes and places of the caption. Image->text: each image's codes are captioned by infilling; a
caption counts as right when it describes the image exactly ('A above B' = 'B below A'). Text
to image is scored greedy and with top-p, with and without classifier-free guidance, with
contrastive top-k, and best of 8 top-p samples reranked by the model's own likelihood of the
caption given each image; its ceiling is the share of the split's own VQGAN codes that decode
to an image the analyser reads right ("VQGAN reconstructions"). The validation split holds
compositions seen in training, the test split held-out ones. The report goes to
WORKDIR/eval_shapes.json and, as a markdown table, WORKDIR/eval_shapes.md; its best text->image
setting (the highest mean over the splits) to WORKDIR/sampling_defaults.json, which
`cm3jax.sample` draws with where no flag says otherwise.

  python -m cm3jax.eval_shapes --workdir=workdirs/tiny_ra --retrieve=3

adds a column per split with retrieval: each caption follows the 3 documents of the run's
memory bank (or --memory) nearest it, each image being captioned those nearest the image, and
guidance is scored with the documents in the unconditional stream and without them. Given a
retriever (--retriever, or the bank's), best of 8 reranked by the retriever's image-text score
is scored too.

  python -m cm3jax.eval_shapes --workdir=workdirs/tiny --quantize=int8

scores the sampler with weight-only int8 weights (docs/design.md, "Decoding"); its report goes
to WORKDIR/eval_shapes_int8.json and .md, to set beside the float one, and the sampling
defaults stay those measured on the weights as trained.

  python -m cm3jax.eval_shapes --workdir=workdirs/tiny_sft \
      --tasks=edit,grounded,seg2image,image2seg,caption,vqa --splits=validation \
      --num_examples=200 --baseline=workdirs/tiny

scores the instruction-tuned tasks instead (cm3jax/eval/eval_tasks.py) on each split's first
--num_examples records of every task of the shapes task suite, for the run and, with
--baseline, the run it was tuned from; the report goes to WORKDIR/eval_tasks.json and .md,
each task's best decoding of the run to WORKDIR/sampling_defaults.json.
"""

import os
import time

from absl import flags

from cm3jax import cli
from cm3jax import run as run_lib
from cm3jax.config import ConfigError
from cm3jax.data import sft
from cm3jax.eval import eval_shapes, eval_tasks
from cm3jax.sampling import defaults, engine


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a cm3jax.train run on the shapes data.")
  flags.DEFINE_integer("num_examples", 1000, "Examples to score per split (each has 1,000).")
  flags.DEFINE_integer("batch_size", 128, "Images generated together.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_list("splits", list(eval_shapes.SPLITS), "test: held-out compositions; validation: "
                    "compositions seen in training.")
  flags.DEFINE_integer("retrieve", 0, "Also score each split with this many documents retrieved "
                       "from --memory before each prompt; 0: no retrieval.")
  flags.DEFINE_string("memory", None, "The memory bank to retrieve from; default: the run's "
                      "(cm3.retrieval.memory, else WORKDIR/memory).")
  flags.DEFINE_string("retriever", None, "A retriever that reranks samples (a train_retriever "
                      "workdir or a CLIP checkpoint); default: the memory bank's, with --retrieve.")
  flags.DEFINE_list("tasks", [], "Score these instruction-tuned tasks instead of text->image "
                    f"and captions: {','.join(sft.TASKS)}.")
  flags.DEFINE_string("baseline", "", "With --tasks: also score this run (the model before "
                      "instruction tuning).")
  flags.DEFINE_enum("quantize", "none", list(engine.QUANTIZE), "Score the sampler with these "
                    "weights: none (the compute dtype) or int8 (weight-only int8), whose report "
                    "goes to WORKDIR/eval_shapes_int8.json and .md, leaving the sampling defaults "
                    "as they are. Not with --tasks.")


def main(FLAGS):
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required")
  if FLAGS.num_examples < 1 or FLAGS.batch_size < 1:
    raise ConfigError(f"--num_examples={FLAGS.num_examples} and --batch_size={FLAGS.batch_size} "
                      "must be at least 1")
  if FLAGS.baseline and not FLAGS.tasks:
    raise ConfigError("--baseline scores the tasks of --tasks; name them")
  if FLAGS.quantize != "none" and FLAGS.tasks:
    raise ConfigError("--quantize scores text->image and captions, not --tasks")
  if FLAGS.tasks:
    eval_tasks.parse_tasks(FLAGS.tasks)
  else:
    eval_shapes.check_splits(FLAGS.splits)
  t = time.perf_counter()
  run = run_lib.load(FLAGS.workdir, memory=FLAGS.memory or "", quantize=FLAGS.quantize)
  if FLAGS.tasks:
    baseline = run_lib.load(FLAGS.baseline) if FLAGS.baseline else None
    runs = eval_tasks.report(run, FLAGS.splits, FLAGS.tasks, FLAGS.num_examples,
                             FLAGS.batch_size, FLAGS.seed, baseline)
    print("\n".join(eval_tasks.table(runs)))
    print(f"{time.perf_counter() - t:.0f}s; written to " + ", ".join(
        os.path.join(FLAGS.workdir, f)
        for f in eval_tasks.REPORT_FILES + (defaults.SAMPLING_DEFAULTS_FILE,)))
    return
  results = eval_shapes.report(run, FLAGS.splits, FLAGS.num_examples, FLAGS.batch_size,
                               FLAGS.seed, FLAGS.retrieve, FLAGS.retriever or "")
  print("\n".join(eval_shapes.table(results)))
  written = eval_shapes.report_files(FLAGS.quantize)
  if FLAGS.quantize == "none":
    written += (defaults.SAMPLING_DEFAULTS_FILE,)
  print(f"{time.perf_counter() - t:.0f}s; written to " + ", ".join(
      os.path.join(FLAGS.workdir, f) for f in written))


if __name__ == "__main__":
  cli.run("eval_shapes", _define_flags, main)
