"""Write instruction-tuning records into task shards, their images as VQGAN codes, once.

The library of `python -m cm3jax.tokenize_tasks` (cm3jax/tokenize_tasks.py)."""

import collections
import itertools
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files, provenance
from cm3jax.data import code_shards, sft, shapes_tasks, task_shards, tf_cpu
from cm3jax.prepare import tokenize_images
from cm3jax.vqgan.tokenizer import ImageTokenizer

ENCODE_RECORDS = 256  # records whose images are encoded in one batch
SHARD_SIZE = 4096  # records per shard, by default


def records(dataset: str, split: str, examples_per_task: int, skipped: collections.Counter
            ) -> Iterator[sft.Record]:
  """The records of one split of `dataset`; JSONL lines that are not records are counted in
  `skipped`."""
  if dataset == "shapes_tasks":
    for task in sft.TASKS:
      for i in range(examples_per_task):
        yield shapes_tasks.example(task, split, i)
    return
  kind, _, path = dataset.partition(":")
  if kind != "jsonl" or not path:
    raise ConfigError(f"--dataset={dataset!r} is not shapes_tasks or jsonl:PATH")
  path = path.replace("{split}", split)
  good, bad = sft.read_jsonl(path)
  skipped.update(bad)
  folder = os.path.dirname(os.path.abspath(path))
  for record in good:
    place = lambda s: (sft.ImagePath(os.path.join(folder, s.path))
                       if isinstance(s, sft.ImagePath) else s)
    yield sft.Record(record.task, tuple(map(place, record.input)),
                     tuple(map(place, record.output)))


def _pixels(image, resolution: int) -> np.ndarray:
  if isinstance(image, shapes_tasks.Picture):
    return image.render()
  with open(image.path, "rb") as f:
    return tokenize_images.decode_image(f.read(), resolution)


def encoded(tokenizer: ImageTokenizer, made: Iterable[sft.Record],
            skipped: collections.Counter) -> Iterator[sft.Record]:
  """Each record with its images as codes; one whose image cannot be read is counted and left
  out."""
  resolution = tokenizer.cfg.resolution
  made = iter(made)
  while chunk := list(itertools.islice(made, ENCODE_RECORDS)):
    kept, pixels = [], []
    for record in chunk:
      try:
        images = [_pixels(s, resolution) for s in record.input + record.output
                  if not isinstance(s, str)]
      except Exception:  # PIL and the file system raise many types for a bad image
        skipped["unreadable image"] += 1
        continue
      kept.append(record)
      pixels += images
    codes = iter(tokenizer.encode(np.stack(pixels)) if pixels else [])
    for record in kept:
      swap = lambda s: s if isinstance(s, str) else next(codes)
      yield sft.Record(record.task, tuple(map(swap, record.input)),
                       tuple(map(swap, record.output)))


def source(dataset: str, examples_per_task: int) -> dict:
  """What names a dataset's records in a split's made_by: the JSONL file's absolute path, or the
  shapes task suite with its records per task."""
  kind, _, path = dataset.partition(":")
  if kind == "jsonl" and path:
    return {"dataset": f"jsonl:{os.path.abspath(path)}"}
  return {"dataset": dataset, "examples_per_task": examples_per_task}


def write_split(tokenizer: ImageTokenizer, made: Iterable[sft.Record], out: str, split: str,
                shard_size: int = SHARD_SIZE, skipped=None, made_from: Optional[dict] = None
                ) -> dict:
  """Writes the records' shards and OUT/SPLIT.json; returns the manifest. A complete split is
  reused when its manifest records this run's made_by (tokenize_images.made_by: the records,
  named by `made_from` (`source`), the VQGAN and the shard size) and refused otherwise."""
  if shard_size < 1:
    raise ConfigError(f"--shard_size={shard_size} must be at least 1")
  tf = tf_cpu.tensorflow()
  manifest_path = task_shards.manifest_path(out, split)
  settings = tokenize_images.made_by(tokenizer, shard_size, made_from)
  if os.path.exists(manifest_path):
    summary = task_shards.read_manifest(out, split)
    provenance.check(summary, settings, f"the complete {split} split in {out}",
                     code_shards.REMEDY)
    return summary
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--out={out} is not a directory that can be made: {e.strerror}") from None
  skipped = collections.Counter() if skipped is None else skipped
  tasks: collections.Counter = collections.Counter()
  shards = 0
  stream = encoded(tokenizer, made, skipped)
  while chunk := list(itertools.islice(stream, shard_size)):
    with files.atomic_path(task_shards.shard_path(out, split, shards)) as tmp:
      with tf.io.TFRecordWriter(tmp) as writer:
        for record in chunk:
          writer.write(task_shards.serialize(record))
          tasks[record.task] += 1
    shards += 1
  if not shards:
    raise ConfigError(f"split {split} has no usable record (skipped: {dict(skipped) or 'none'})")
  summary = {"split": split, "records": sum(tasks.values()), "tasks": dict(sorted(tasks.items())),
             "shards": shards, **settings, provenance.FINGERPRINT: provenance.fingerprint(settings),
             "skipped": dict(skipped)}
  files.write_json(manifest_path, summary)
  return summary


def tokenize_split(tokenizer: ImageTokenizer, dataset: str, split: str, out: str,
                   examples_per_task: int, shard_size: int = SHARD_SIZE) -> dict:
  skipped: collections.Counter = collections.Counter()
  return write_split(tokenizer, records(dataset, split, examples_per_task, skipped), out, split,
                     shard_size, skipped, source(dataset, examples_per_task))


def describe(summary: dict) -> str:
  tasks = ", ".join(f"{n} {t}" for t, n in summary["tasks"].items())
  skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
  return f"{summary['split']}: {summary['records']} records ({tasks}); skipped: {skipped}"
