"""Encode an image-caption dataset into VQGAN code sequences, once, for the training pipeline.

  python -m cm3jax.tokenize_images --vqgan_workdir=workdirs/vqgan --out=workdirs/codes

Writes `OUT/SPLIT-NNNNN.tfrecord` shards of tf.train.Examples (`codes`: int64 [tokens_per_image],
`caption`: bytes, `key`: bytes) and, when a split is complete, `OUT/SPLIT.json` with the counts.
Each shard is written under a temporary name and renamed when whole, so an interrupted run
resumes after the last whole shard. Images that cannot be decoded or have no caption are skipped
and counted; others are converted to RGB and centre-cropped and resized to the VQGAN's size.
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
from absl import app, flags, logging

from cm3jax.config import ConfigError
from cm3jax.data import tf_cpu
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
                split: str, batch_size: int, shard_size: int, total: Optional[int] = None) -> dict:
  """Encodes `examples` into shards of `shard_size` records, resuming after the whole shards
  already in `out`; returns (and writes to OUT/SPLIT.json) the counts."""
  tf = tf_cpu.tensorflow()
  os.makedirs(out, exist_ok=True)
  manifest = os.path.join(out, f"{split}.json")
  if os.path.exists(manifest):
    with open(manifest) as f:
      return json.load(f)
  done_shards = 0
  while os.path.exists(_shard_path(out, split, done_shards)):
    done_shards += 1
  skip = done_shards * shard_size
  skipped: collections.Counter = collections.Counter()
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
      records.extend(_example(k, c, t) for k, c, t in zip(keys, codes, captions))
      bar.update(len(chunk))
    if not records:
      break
    tmp = _shard_path(out, split, shard) + ".tmp"
    with tf.io.TFRecordWriter(tmp) as writer:
      for record in records:
        writer.write(record)
    os.replace(tmp, _shard_path(out, split, shard))
    written += len(records)
    shard += 1
  bar.close()
  summary = {"split": split, "records": written, "shards": shard,
             "tokens_per_image": tokenizer.cfg.tokens_per_image,
             "codebook_size": tokenizer.cfg.n_embed, "vqgan_step": tokenizer.step,
             "skipped": dict(skipped)}
  with open(manifest, "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def _shard_path(out: str, split: str, shard: int) -> str:
  return os.path.join(out, f"{split}-{shard:05d}.tfrecord")


def _example(key: bytes, codes: np.ndarray, caption: bytes) -> bytes:
  tf = tf_cpu.tensorflow()
  feature = {
      "codes": tf.train.Feature(int64_list=tf.train.Int64List(value=codes.tolist())),
      "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def tfds_examples(dataset: str, data_dir: str, split: str, image_key: str, caption_key: str):
  """(key, encoded image bytes, caption bytes) of a TFDS split, images left undecoded; and the
  split's size."""
  tf_cpu.tensorflow()
  import tensorflow_datasets as tfds
  if dataset.split("/")[0] == "shapes":
    from cm3jax.data import shapes_tfds
    builder = shapes_tfds.builder(dataset, data_dir)
  else:
    builder = tfds.builder(dataset, data_dir=data_dir)
    builder.download_and_prepare()
  if split not in builder.info.splits:
    raise ConfigError(f"{dataset} has no split {split!r}; it has {list(builder.info.splits)}")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})
  total = builder.info.splits[split].num_examples

  def examples():
    for i, ex in enumerate(tfds.as_numpy(ds)):
      yield f"{split}/{i}".encode(), ex[image_key], ex[caption_key]
  return examples(), total


def _define_flags():
  """Flags of the command line only, so that tests and tools can import this module."""
  flags.DEFINE_string("vqgan_workdir", None, "Workdir of cm3jax.train_vqgan.")
  flags.DEFINE_string("out", None, "Directory for the code shards.")
  flags.DEFINE_string("dataset", "shapes", "A TFDS dataset with image and text features.")
  flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"), "TFDS data_dir.")
  flags.DEFINE_list("splits", ["train", "validation", "test"], "Splits to encode.")
  flags.DEFINE_string("image_key", "image", "Image feature of the dataset.")
  flags.DEFINE_string("caption_key", "caption", "Caption feature of the dataset.")
  flags.DEFINE_integer("batch_size", 64, "Images encoded per jitted call.")
  flags.DEFINE_integer("shard_size", 4096, "Records per output shard.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  try:
    if not FLAGS.vqgan_workdir or not FLAGS.out:
      raise ConfigError("--vqgan_workdir and --out are required")
    tokenizer = ImageTokenizer.load(FLAGS.vqgan_workdir)
    for split in FLAGS.splits:
      examples, total = tfds_examples(FLAGS.dataset, FLAGS.data_dir, split, FLAGS.image_key,
                                      FLAGS.caption_key)
      summary = write_split(tokenizer, examples, FLAGS.out, split, FLAGS.batch_size,
                            FLAGS.shard_size, total)
      skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
      print(f"{split}: {summary['records']} records in {summary['shards']} shards; "
            f"skipped: {skipped}")
  except ConfigError as e:
    sys.exit(f"cm3jax.tokenize_images: error: {e}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
