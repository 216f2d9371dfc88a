"""Write instruction-tuning records into task shards, their images as VQGAN codes, once.

The library of `python -m cm3jax.tokenize_tasks` (cm3jax/tokenize_tasks.py)."""

import collections
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.data import code_shards, sft, shapes_tasks, task_shards
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
  folder = os.path.dirname(files.absolute(path))
  for record in good:
    place = lambda s: (sft.ImagePath(os.path.join(folder, s.path))
                       if isinstance(s, sft.ImagePath) else s)
    yield sft.Record(record.task, tuple(map(place, record.input)),
                     tuple(map(place, record.output)))


def _pixels(image, resolution: int) -> np.ndarray:
  if isinstance(image, shapes_tasks.Picture):
    return image.render()
  return tokenize_images.decode_image(files.read_bytes(image.path), resolution)


def readable(made: Iterable[sft.Record], resolution: int, skipped: collections.Counter
             ) -> Iterator[tuple[sft.Record, list[np.ndarray]]]:
  """Each record with the pixels of its images; one whose image cannot be read is counted and
  left out."""
  for record in made:
    try:
      yield record, [_pixels(s, resolution) for s in record.input + record.output
                     if not isinstance(s, str)]
    except Exception:  # PIL and the file system raise many types for a bad image
      skipped["unreadable image"] += 1


def encoded(tokenizer: ImageTokenizer, chunk: list[tuple[sft.Record, list[np.ndarray]]]
            ) -> list[sft.Record]:
  """The records of `readable` with their images as codes, encoded in one batch."""
  pixels = [p for _, images in chunk for p in images]
  codes = iter(tokenizer.encode(np.stack(pixels)) if pixels else [])
  swap = lambda s: s if isinstance(s, str) else next(codes)
  return [sft.Record(r.task, tuple(map(swap, r.input)), tuple(map(swap, r.output)))
          for r, _ in chunk]


def source(dataset: str, examples_per_task: int) -> dict:
  """What names a dataset's records in a split's made_by: the JSONL file's absolute path, or the
  shapes task suite with its records per task."""
  kind, _, path = dataset.partition(":")
  if kind == "jsonl" and path:
    return {"dataset": f"jsonl:{files.absolute(path)}"}
  return {"dataset": dataset, "examples_per_task": examples_per_task}


def write_split(tokenizer: ImageTokenizer, made: Iterable[sft.Record], out: str, split: str,
                shard_size: int = SHARD_SIZE, skipped=None, made_from: Optional[dict] = None
                ) -> dict:
  """Writes the records' shards and OUT/SPLIT.json with the records per task
  (code_shards.write_split: resumed after the whole shards already in `out`; a complete split is
  reused when its manifest records this run's made_by (tokenize_images.made_by: the records,
  named by `made_from` (`source`), the VQGAN and the shard size) and refused otherwise); returns
  the manifest."""
  skipped = collections.Counter() if skipped is None else skipped

  def records_of(chunk):
    return [task_shards.serialize(r) for r in encoded(tokenizer, chunk)]

  def tasks(paths):
    return {"tasks": dict(sorted(collections.Counter(
        t.decode() for t in code_shards.strings(paths, "task")).items()))}

  return code_shards.write_split(
      readable(made, tokenizer.cfg.resolution, skipped), records_of, out, split,
      tokenize_images.made_by(tokenizer, shard_size, made_from), ENCODE_RECORDS,
      skipped=skipped, allow_empty=None, count=tasks)


def tokenize_split(tokenizer: ImageTokenizer, dataset: str, split: str, out: str,
                   examples_per_task: int, shard_size: int = SHARD_SIZE) -> dict:
  skipped: collections.Counter = collections.Counter()
  return write_split(tokenizer, records(dataset, split, examples_per_task, skipped), out, split,
                     shard_size, skipped, source(dataset, examples_per_task))


def describe(summary: dict) -> str:
  tasks = ", ".join(f"{n} {t}" for t, n in summary["tasks"].items())
  skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
  return f"{summary['split']}: {summary['records']} records ({tasks}); skipped: {skipped}"
