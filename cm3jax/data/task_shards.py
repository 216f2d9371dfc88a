"""The format of instruction-tuning shards: what `cm3jax.tokenize_tasks` writes and the SFT
stream (`data.sft_stream`) reads.

`DIR/SPLIT-NNNNN.tfrecord` files of tf.train.Examples, one per `sft.Record` with its images as
VQGAN codes: `task` (bytes), `layout` (bytes: a letter per segment, `t` text or `i` image, the
input's, `|`, the output's), `texts` (bytes, the text segments in order) and `codes` (int64,
the images' codes end to end). `DIR/SPLIT.json`, written once the split is whole, counts its
records per task and the rows skipped by reason, and holds its made_by (cm3jax/core/provenance.py:
the dataset, the VQGAN, shard_size, tokens_per_image, codebook_size) with its fingerprint.
"""

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.data import code_shards, sft, tf_cpu

shard_path, manifest_path = code_shards.shard_path, code_shards.manifest_path


def read_manifest(directory: str, split: str) -> dict:
  return code_shards.read_manifest(directory, split, " of task records", "cm3jax.tokenize_tasks")


def serialize(record: sft.Record) -> bytes:
  """A record whose images are code arrays, as a tf.train.Example."""
  tf = tf_cpu.tensorflow()
  segments = record.input + record.output
  kind = lambda s: "t" if isinstance(s, str) else "i"
  layout = "".join(map(kind, record.input)) + "|" + "".join(map(kind, record.output))
  texts = [s.encode("utf-8") for s in segments if isinstance(s, str)]
  codes = [np.asarray(s, np.int64).ravel() for s in segments if not isinstance(s, str)]
  feature = {
      "task": tf.train.Feature(bytes_list=tf.train.BytesList(value=[record.task.encode()])),
      "layout": tf.train.Feature(bytes_list=tf.train.BytesList(value=[layout.encode()])),
      "texts": tf.train.Feature(bytes_list=tf.train.BytesList(value=texts)),
      "codes": tf.train.Feature(int64_list=tf.train.Int64List(
          value=np.concatenate(codes).tolist() if codes else [])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse(serialized: bytes, tokens_per_image: int) -> sft.Record:
  """`serialize`'s inverse: images come back as int32 code arrays [tokens_per_image]."""
  tf = tf_cpu.tensorflow()
  f = tf.train.Example.FromString(serialized).features.feature
  layout = f["layout"].bytes_list.value[0].decode()
  texts = iter(t.decode("utf-8") for t in f["texts"].bytes_list.value)
  codes = np.asarray(f["codes"].int64_list.value, np.int32).reshape(-1, tokens_per_image)
  images = iter(codes)
  made = [[next(texts) if k == "t" else next(images) for k in part] for part in layout.split("|")]
  return sft.Record(f["task"].bytes_list.value[0].decode(), tuple(made[0]), tuple(made[1]))


def read_split(directory: str, split: str) -> list[sft.Record]:
  """Every record of a complete split, in file order."""
  tf = tf_cpu.tensorflow()
  manifest = read_manifest(directory, split)
  paths = [shard_path(directory, split, i) for i in range(manifest["shards"])]
  missing = [p for p in paths if not files.exists(p)]
  if missing:
    raise ConfigError(f"{directory} has a {split}.json but not its shard {missing[0]}")
  return [parse(r, manifest["tokens_per_image"])
          for r in tf.data.TFRecordDataset(paths).as_numpy_iterator()]
