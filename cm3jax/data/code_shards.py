"""The format of image-code shards: what `cm3jax.tokenize_images` writes and the CM3 pipeline reads.

`DIR/SPLIT-NNNNN.tfrecord` files of tf.train.Examples (`codes`: int64 [tokens_per_image],
`caption`: bytes, `key`: bytes) and, once a split is complete, `DIR/SPLIT.json` with its counts
(records, shards, tokens_per_image, codebook_size, skipped rows by reason).
"""

import glob
import json
import os

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.data import tf_cpu


def shard_path(directory: str, split: str, shard: int) -> str:
  return os.path.join(directory, f"{split}-{shard:05d}.tfrecord")


def manifest_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.json")


def settings_path(directory: str, split: str) -> str:
  """What the shards of a split were written with (cm3jax.tokenize_images), for resuming."""
  return os.path.join(directory, f"{split}.settings.json")


def read_manifest(directory: str, split: str, contents: str = "",
                  maker: str = "cm3jax.tokenize_images") -> dict:
  """The counts of a complete split (of `contents`, written by `maker`: the task shards share
  this layout), or a ConfigError saying how to make it."""
  path = manifest_path(directory, split)
  if not os.path.exists(path):
    raise ConfigError(f"{directory} holds no complete {split} split{contents} "
                      f"({os.path.basename(path)} is missing): run python -m {maker} first")
  with open(path) as f:
    return json.load(f)


def check_codebook(directory: str, manifest: dict, num_image_codes: int):
  """A ConfigError when the shards' VQGAN has another codebook than the vocabulary."""
  if manifest["codebook_size"] != num_image_codes:
    raise ConfigError(f"{directory} holds codes of a {manifest['codebook_size']}-code VQGAN but "
                      f"the vocabulary has {num_image_codes} image codes")


def shard_paths(directory: str, split: str) -> list[str]:
  read_manifest(directory, split)
  paths = sorted(glob.glob(os.path.join(directory, f"{split}-[0-9][0-9][0-9][0-9][0-9].tfrecord")))
  if not paths:
    raise ConfigError(f"{directory} has a {split}.json but no {split} shards")
  return paths


def serialize(key: bytes, codes: np.ndarray, caption: bytes) -> bytes:
  tf = tf_cpu.tensorflow()
  feature = {
      "codes": tf.train.Feature(int64_list=tf.train.Int64List(value=codes.tolist())),
      "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parser(tokens_per_image: int):
  """A tf function: serialised record -> {"codes": int32 [tokens_per_image], "caption": string,
  "key": string}."""
  tf = tf_cpu.tensorflow()
  spec = {"codes": tf.io.FixedLenFeature([tokens_per_image], tf.int64),
          "caption": tf.io.FixedLenFeature([], tf.string),
          "key": tf.io.FixedLenFeature([], tf.string)}

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    return {"codes": tf.cast(ex["codes"], tf.int32), "caption": ex["caption"], "key": ex["key"]}
  return parse


def captions(paths: list[str]):
  """Every caption in the shards, as bytes, in file order."""
  tf = tf_cpu.tensorflow()
  spec = {"caption": tf.io.FixedLenFeature([], tf.string)}
  ds = tf.data.TFRecordDataset(paths).map(lambda r: tf.io.parse_single_example(r, spec)["caption"])
  for caption in ds.as_numpy_iterator():
    yield caption


def read_split(directory: str, split: str, limit: int) -> tuple[np.ndarray, list[str]]:
  """Codes [N, tokens_per_image] and captions of the first N <= limit records of a split."""
  tf = tf_cpu.tensorflow()
  parse = parser(read_manifest(directory, split)["tokens_per_image"])
  ds = tf.data.TFRecordDataset(shard_paths(directory, split)).map(parse).take(limit)
  codes, captions = [], []
  for ex in ds.as_numpy_iterator():
    codes.append(ex["codes"])
    captions.append(ex["caption"].decode("utf-8", "replace"))
  if not captions:
    raise ConfigError(f"{directory} has no {split} records")
  return np.stack(codes), captions
