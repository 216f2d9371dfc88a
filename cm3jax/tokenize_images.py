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

import collections
import io
import itertools
import json
import os
import sys
from typing import Iterable, Iterator, Optional

import numpy as np
import tqdm
from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.data import code_shards, image_captions, tf_cpu
from cm3jax.vqgan.tokenizer import ImageTokenizer

def decode_image(data: bytes, resolution: int) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB [resolution, resolution, 3], centre-cropped and resized."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as image:
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
      image = image.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image, np.uint8)


def prepare(examples: Iterable[tuple[bytes, bytes, bytes]], resolution: int,
            skipped: collections.Counter) -> Iterator[tuple[bytes, np.ndarray, bytes]]:
  """(key, encoded image, caption) -> (key, pixels, caption); bad examples are counted in
  `skipped` by reason and left out."""
  for key, data, caption in examples:
    if not caption.strip():
      skipped["empty caption"] += 1
      continue
    try:
      caption.decode("utf-8")
    except UnicodeDecodeError:
      skipped["caption is not UTF-8"] += 1
      continue
    try:
      pixels = decode_image(data, resolution)
    except Exception:  # PIL raises many types for truncated or foreign data.
      skipped["undecodable image"] += 1
      continue
    yield key, pixels, caption


def write_split(tokenizer: ImageTokenizer, examples: Iterable[tuple[bytes, bytes, bytes]], out: str,
                split: str, batch_size: int, shard_size: int, total: Optional[int] = None,
                skipped: Optional[collections.Counter] = None, allow_empty: bool = False) -> dict:
  """Encodes `examples` into shards of `shard_size` records, resuming after the whole shards
  already in `out`; returns (and writes to OUT/SPLIT.json) the counts. `skipped` may already
  hold the rows the source could not read. The settings that decide the shards' contents are
  recorded in OUT/SPLIT.settings.json with the first shard, and a resume with other settings is
  refused. A split with no usable example is an error unless `allow_empty`."""
  if batch_size < 1 or shard_size < 1:
    raise ConfigError(f"--batch_size={batch_size} and --shard_size={shard_size} must be at least 1")
  tf = tf_cpu.tensorflow()
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--out={out} is not a directory that can be made: {e.strerror}") from None
  manifest = code_shards.manifest_path(out, split)
  if os.path.exists(manifest):
    with open(manifest) as f:
      return json.load(f)
  done_shards = 0
  while os.path.exists(code_shards.shard_path(out, split, done_shards)):
    done_shards += 1
  settings = {"shard_size": shard_size, "vqgan_step": tokenizer.step,
              "tokens_per_image": tokenizer.cfg.tokens_per_image,
              "codebook_size": tokenizer.cfg.n_embed}
  _check_settings(out, split, done_shards, settings)
  skip = done_shards * shard_size
  skipped = collections.Counter() if skipped is None else skipped
  usable = prepare(examples, tokenizer.cfg.resolution, skipped)
  bar = tqdm.tqdm(total=total, unit="img", desc=f"{split}", file=sys.stdout, dynamic_ncols=True,
                  disable=not sys.stdout.isatty())
  # Resume: the first `skip` usable examples are in the shards already.
  if sum(1 for _ in itertools.islice(usable, skip)) < skip:
    raise ConfigError(f"{out} holds {done_shards} shards of {split}, more than this dataset fills; "
                      "use a new --out")
  bar.update(skip + sum(skipped.values()))
  written, shard = skip, done_shards
  while True:
    records = []
    shard_items = itertools.islice(usable, shard_size)
    while chunk := list(itertools.islice(shard_items, batch_size)):
      keys, pixels, captions = zip(*chunk)
      codes = tokenizer.encode(np.stack(pixels))
      records.extend(code_shards.serialize(k, c, t) for k, c, t in zip(keys, codes, captions))
      bar.update(len(chunk))
    if not records:
      break
    path = code_shards.shard_path(out, split, shard)
    with tf.io.TFRecordWriter(path + ".tmp") as writer:
      for record in records:
        writer.write(record)
    os.replace(path + ".tmp", path)
    written += len(records)
    shard += 1
  bar.close()
  if not written and not allow_empty:
    raise ConfigError(f"split {split} has no usable example (skipped: {dict(skipped) or 'none'}); "
                      "nothing written (--allow_empty_splits writes an empty split)")
  summary = {"split": split, "records": written, "shards": shard, **settings,
             "skipped": dict(skipped)}
  with open(manifest, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _check_settings(out: str, split: str, done_shards: int, settings: dict):
  """Records `settings` before the first shard; refuses to resume shards written with others."""
  path = code_shards.settings_path(out, split)
  if not done_shards:
    with open(path, "w") as f:
      json.dump(settings, f, indent=1)
    return
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    raise ConfigError(f"{out} holds {done_shards} shards of {split} but not the settings they "
                      f"were written with ({os.path.basename(path)}); use a new --out") from None
  differs = [f"{k}={recorded.get(k)} (this run: {v})" for k, v in settings.items()
             if recorded.get(k) != v]
  if differs:
    raise ConfigError(f"the {done_shards} shards of {split} in {out} were written with "
                      + ", ".join(differs) + "; resume with the same settings, or use a new --out")


def tokenize_split(tokenizer: ImageTokenizer, dataset: str, split: str, out: str, data_dir: str = "",
                   image_dir: str = "", image_key: str = "image", caption_key: str = "caption",
                   batch_size: int = 64, shard_size: int = 4096, allow_empty: bool = False) -> dict:
  """Encodes one split of `dataset` (see cm3jax/data/image_captions.py) into shards in `out`."""
  skipped: collections.Counter = collections.Counter()
  examples, total = image_captions.examples(dataset, split, skipped, data_dir, image_dir,
                                            image_key, caption_key)
  return write_split(tokenizer, examples, out, split, batch_size, shard_size, total, skipped,
                     allow_empty)


def describe(summary: dict) -> str:
  skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
  return (f"{summary['split']}: {summary['records']} records in {summary['shards']} shards; "
          f"skipped: {skipped}")


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
  flags.DEFINE_integer("shard_size", 4096, "Records per output shard.")
  flags.DEFINE_bool("allow_empty_splits", False, "Write a split with no usable example instead of "
                    "stopping.")


def main(FLAGS):
  if not FLAGS.vqgan_workdir or not FLAGS.out:
    raise ConfigError("--vqgan_workdir and --out are required")
  tokenizer = ImageTokenizer.load(FLAGS.vqgan_workdir)
  for split in FLAGS.splits:
    summary = tokenize_split(tokenizer, FLAGS.dataset, split, FLAGS.out, FLAGS.data_dir,
                             FLAGS.image_dir, FLAGS.image_key, FLAGS.caption_key,
                             FLAGS.batch_size, FLAGS.shard_size, FLAGS.allow_empty_splits)
    print(describe(summary))


if __name__ == "__main__":
  cli.run("tokenize_images", _define_flags, main)
