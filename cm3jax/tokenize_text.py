"""Write a plain-text corpus into record shards, once, for text-only CM3 (data="text").

  python -m cm3jax.tokenize_text --out=workdirs/text_tiny/codes

  python -m cm3jax.tokenize_text --out=TEXT --dataset=files:wikitext-103/wiki.{split}.raw       --splits=train,validation --max_chars=8000

--dataset is shapes_text (the default: the built-in corpus), files:PATTERN or tfds:NAME:FIELD
(cm3jax/data/text_corpus.py). The records are image-code shards with no codes
(cm3jax/data/code_shards.py), written as tokenize_images writes its own: whole shards renamed
into place, an interrupted run resumed after them, and OUT/SPLIT.json once a split is complete.
Documents longer than --max_chars characters are cut at whitespace into several records: keep
them within one training row (about seq_len - 3 * cm3.max_spans tokens; the stream skips and
counts longer ones). Empty and non-UTF-8 documents are skipped and counted.
"""

import os

from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.data import text_corpus
from cm3jax.prepare import tokenize_text


def _define_flags():
  flags.DEFINE_string("out", None, "Directory for the text-record shards.")
  flags.DEFINE_string("dataset", "shapes_text", f"{text_corpus.FORMS}; {{split}} in PATTERN is "
                      "replaced by the split.")
  flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to write.")
  flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir.")
  flags.DEFINE_integer("max_chars", tokenize_text.MAX_CHARS, "Longer documents are cut into records of at most "
                       "this many characters.")
  flags.DEFINE_integer("shard_size", 4096, "Records per output shard.")


def main(FLAGS):
  if not FLAGS.out:
    raise ConfigError("--out is required")
  for split in FLAGS.splits:
    print(tokenize_text.describe(tokenize_text.tokenize_split(FLAGS.dataset, split, FLAGS.out, FLAGS.data_dir,
                                  FLAGS.max_chars, FLAGS.shard_size)), flush=True)


if __name__ == "__main__":
  cli.run("tokenize_text", _define_flags, main)
