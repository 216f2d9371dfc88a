"""Write a plain-text corpus into record shards, once, for text-only CM3 (data="text").

The library of `python -m cm3jax.tokenize_text` (cm3jax/tokenize_text.py)."""

import collections

import numpy as np

from cm3jax.data import code_shards, text_corpus

NO_CODES = np.zeros(0, np.int64)
RECORDS_PER_WRITE = 1024
MAX_CHARS = 1000


def tokenize_split(dataset: str, split: str, out: str, data_dir: str = "",
                   max_chars: int = MAX_CHARS, shard_size: int = 4096) -> dict:
  """Writes one split of `dataset` into text-record shards in `out`; returns its counts."""
  skipped: collections.Counter = collections.Counter()
  documents, total = text_corpus.documents(dataset, split, skipped, data_dir, max_chars)
  settings = {"shard_size": shard_size, "dataset": dataset, "max_chars": max_chars,
              "tokens_per_image": 0, "codebook_size": 0}

  def records(chunk: list[text_corpus.Document]) -> list[bytes]:
    return [code_shards.serialize(key, NO_CODES, text) for key, text in chunk]

  return code_shards.write_split(documents, records, out, split, settings, RECORDS_PER_WRITE,
                                 total, skipped, unit="doc")


def describe(summary: dict) -> str:
  skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
  return (f"{summary['split']}: {summary['records']} text records in {summary['shards']} shards; "
          f"skipped: {skipped}")
