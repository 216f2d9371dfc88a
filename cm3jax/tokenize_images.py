"""Encode an image-caption dataset into VQGAN code sequences, once, for the training pipeline.

  python -m cm3jax.tokenize_images --vqgan_workdir=workdirs/vqgan --out=workdirs/codes

  python -m cm3jax.tokenize_images --vqgan_workdir=VQ --out=CODES --dataset=tsv:cc3m_{split}.tsv

  python -m cm3jax.tokenize_images --vqgan_workdir=gs://B/vqgan --out=gs://B/codes --multihost \
      --dataset='wds:gs://B/laion/{split}/{00000..09999}.tar' --splits=train

--dataset is shapes (the default), another TFDS dataset, tsv:PATH, coco:PATH, wds:PATTERN
(webdataset tars, as img2dataset writes them) or parquet:PATTERN (cm3jax/data/image_captions.py).
Writes the shards and, when a split is complete, the `OUT/SPLIT.json` of counts that
cm3jax/data/code_shards.py describes. Each shard is written under a temporary name and renamed
when whole, so an interrupted run resumes after the last whole shard. Rows that cannot be read,
samples without an image or a caption, images that cannot be decoded, captions that are empty or
not UTF-8 and truncated files are skipped and counted by reason; other images are decoded by a
pool of threads, converted to RGB and centre-cropped and resized to the VQGAN's size.

With --multihost every host of a pod (the same command on each; launch/tpu_pod.sh runs it)
encodes its share of the input files on its own devices into its own part of each split, and
resumes its part after an interruption; process 0 writes the split's manifest once every part
is done. The result reads as a split written by one host.
"""

import os

import jax
from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.prepare import tokenize_images
from cm3jax.vqgan.tokenizer import ImageTokenizer


def _define_flags():
  """Flags of the command line only, so that tests and tools can import this module."""
  flags.DEFINE_string("vqgan_workdir", None, "Workdir of cm3jax.train_vqgan.")
  flags.DEFINE_string("out", None, "Directory for the code shards.")
  flags.DEFINE_string("dataset", "shapes", "shapes, a TFDS name, tsv:PATH, coco:PATH, wds:PATTERN "
                      "or parquet:PATTERN; {split} in PATH is replaced by the split.")
  flags.DEFINE_string("image_dir", "", "Images of a coco: dataset (default: the JSON's folder).")
  flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir.")
  flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to encode.")
  flags.DEFINE_string("image_key", "image", "Image feature of a TFDS dataset, image-bytes column "
                      "of a parquet one (img2dataset: jpg).")
  flags.DEFINE_string("caption_key", "caption", "Caption feature of a TFDS dataset, caption "
                      "column of a parquet one.")
  flags.DEFINE_integer("batch_size", 64, "Images encoded per jitted call.")
  flags.DEFINE_integer("shard_size", tokenize_images.SHARD_SIZE, "Records per output shard.")
  flags.DEFINE_bool("allow_empty_splits", False, "Write a split with no usable example instead of "
                    "stopping.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first; each host "
                    "encodes its share of the input files.")


def main(FLAGS):
  if not FLAGS.vqgan_workdir or not FLAGS.out:
    raise ConfigError("--vqgan_workdir and --out are required")
  tokenizer = ImageTokenizer.load(FLAGS.vqgan_workdir)
  host = (jax.process_index(), jax.process_count())
  for split in FLAGS.splits:
    summary = tokenize_images.tokenize_split(
        tokenizer, FLAGS.dataset, split, FLAGS.out, FLAGS.data_dir, FLAGS.image_dir,
        FLAGS.image_key, FLAGS.caption_key, FLAGS.batch_size, FLAGS.shard_size,
        FLAGS.allow_empty_splits, host)
    part = f"host {host[0]} of {host[1]}'s part of " if host[0] else ""
    print(part + tokenize_images.describe(summary), flush=True)


if __name__ == "__main__":
  cli.run("tokenize_images", _define_flags, main)
