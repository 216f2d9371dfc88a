"""Write instruction-tuning records into task shards, their images as VQGAN codes, once.

  python -m cm3jax.tokenize_tasks --vqgan_workdir=workdirs/tiny/vqgan --out=workdirs/tiny_sft/tasks

  python -m cm3jax.tokenize_tasks --vqgan_workdir=VQ --out=TASKS --dataset=jsonl:sft_{split}.jsonl

--dataset is shapes_tasks (the default: the shapes task suite of cm3jax/data/shapes_tasks.py,
--examples_per_task train records and --eval_examples_per_task of each other split per task)
or jsonl:PATH, whose lines are cm3jax/data/sft.py's JSON records ({split} in PATH is replaced by
the split; image paths are relative to the file). Lines that are not records and records with
an image that cannot be read are skipped and counted. Writes the shards and then OUT/SPLIT.json
(cm3jax/data/task_shards.py); a split is written whole or not at all, and a complete one is
reused.
"""

from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.prepare import tokenize_tasks
from cm3jax.vqgan.tokenizer import ImageTokenizer


def _define_flags():
  flags.DEFINE_string("vqgan_workdir", None, "Workdir of cm3jax.train_vqgan.")
  flags.DEFINE_string("out", None, "Directory for the task shards.")
  flags.DEFINE_string("dataset", "shapes_tasks", "shapes_tasks or jsonl:PATH ({split} in PATH is "
                      "replaced by the split).")
  flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to write.")
  flags.DEFINE_integer("examples_per_task", 2000, "shapes_tasks: train records per task.")
  flags.DEFINE_integer("eval_examples_per_task", 500, "shapes_tasks: records per task of the "
                       "other splits.")
  flags.DEFINE_integer("shard_size", tokenize_tasks.SHARD_SIZE, "Records per shard.")


def main(FLAGS):
  if not FLAGS.vqgan_workdir or not FLAGS.out:
    raise ConfigError("--vqgan_workdir and --out are required")
  if FLAGS.examples_per_task < 1 or FLAGS.eval_examples_per_task < 1:
    raise ConfigError("--examples_per_task and --eval_examples_per_task must be at least 1")
  tokenizer = ImageTokenizer.load(FLAGS.vqgan_workdir)
  for split in FLAGS.splits:
    count = FLAGS.examples_per_task if split == "train" else FLAGS.eval_examples_per_task
    print(tokenize_tasks.describe(tokenize_tasks.tokenize_split(tokenizer, FLAGS.dataset, split, FLAGS.out, count,
                                  FLAGS.shard_size)), flush=True)


if __name__ == "__main__":
  cli.run("tokenize_tasks", _define_flags, main)
