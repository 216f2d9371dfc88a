"""Encode an image-caption dataset into VQGAN code sequences, once, for the training pipeline.

  python -m cm3jax.tokenize_images --vqgan_workdir=workdirs/vqgan --out=workdirs/codes

  python -m cm3jax.tokenize_images --vqgan_workdir=VQ --out=CODES --dataset=tsv:cc3m_{split}.tsv

--dataset is shapes (the default), another TFDS dataset, tsv:PATH or coco:PATH
(cm3jax/data/image_captions.py). Writes the shards and, when a split is complete, the
`OUT/SPLIT.json` of counts that cm3jax/data/code_shards.py describes. Each shard is written under
a temporary name and renamed when whole, so an interrupted run resumes after the last whole shard.
Rows that cannot be read, images that cannot be decoded and captions that are empty or not UTF-8
are skipped and counted; other images are converted to RGB and centre-cropped and resized to the
VQGAN's size.
"""

import os

from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.prepare import tokenize_images
from cm3jax.vqgan.tokenizer import ImageTokenizer


def _define_flags():
  """Flags of the command line only, so that tests and tools can import this module."""
  flags.DEFINE_string("vqgan_workdir", None, "Workdir of cm3jax.train_vqgan.")
  flags.DEFINE_string("out", None, "Directory for the code shards.")
  flags.DEFINE_string("dataset", "shapes", "shapes, a TFDS name, tsv:PATH or coco:PATH; {split} in "
                      "PATH is replaced by the split.")
  flags.DEFINE_string("image_dir", "", "Images of a coco: dataset (default: the JSON's folder).")
  flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir.")
  flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to encode.")
  flags.DEFINE_string("image_key", "image", "Image feature of the dataset.")
  flags.DEFINE_string("caption_key", "caption", "Caption feature of the dataset.")
  flags.DEFINE_integer("batch_size", 64, "Images encoded per jitted call.")
  flags.DEFINE_integer("shard_size", tokenize_images.SHARD_SIZE, "Records per output shard.")
  flags.DEFINE_bool("allow_empty_splits", False, "Write a split with no usable example instead of "
                    "stopping.")


def main(FLAGS):
  if not FLAGS.vqgan_workdir or not FLAGS.out:
    raise ConfigError("--vqgan_workdir and --out are required")
  tokenizer = ImageTokenizer.load(FLAGS.vqgan_workdir)
  for split in FLAGS.splits:
    summary = tokenize_images.tokenize_split(tokenizer, FLAGS.dataset, split, FLAGS.out, FLAGS.data_dir,
                             FLAGS.image_dir, FLAGS.image_key, FLAGS.caption_key,
                             FLAGS.batch_size, FLAGS.shard_size, FLAGS.allow_empty_splits)
    print(tokenize_images.describe(summary))


if __name__ == "__main__":
  cli.run("tokenize_images", _define_flags, main)
