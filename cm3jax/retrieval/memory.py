"""The memory bank: document vectors of a split's code-shard records, as float16 shards, and the
documents themselves, read by record id without holding the bank in memory.

The bank follows the layout of the code shards it embeds: `BANK/bank-NNNNN.npz` belongs to code
file NNNNN of the split (in its manifest's `files` order) and holds `vectors` (float16 [n, E],
L2-normalised), `ids` (int64 [n]: each embedded record's index in the split, in file order) and
`skipped` (the file's records left out, by reason). Beside it, `BANK/bank-NNNNN.documents.npy`
holds every record of that code file, in order, as fixed-width rows (`codes`: uint16 or int32
[tokens_per_image], `caption`: bytes), so that a record's document is one byte-range read
(`Documents`). Host h of N embeds files h, h + N, ... and reads only those; shards are written
whole (the documents first, then the vectors under a temporary name, renamed when whole), so an
interrupted build resumes after the shards it has. `BANK/bank.settings.json`, written before the
first shard, records what made them (the bank's made_by, cm3jax/core/provenance.py: the
retriever's and the VQGAN's fingerprints, the dimension, the code shards and split it embeds),
and a resume compares it. `BANK/bank.json`, written last, marks a complete bank: the made_by and
its fingerprint, the retriever's source, the records of each code file (`shard_records`), the
vector count and the records skipped by reason.
"""

import collections
import json
import os
from typing import Optional, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files, provenance
from cm3jax.data import code_shards, tf_cpu

MANIFEST = "bank.json"
SETTINGS = "bank.settings.json"  # what made the shards (cm3jax/core/provenance.py), for resuming
REMEDY = ("run with the retriever, VQGAN, codes and settings it was made with, or write to a new "
          "--out")


def settings_path(bank: str) -> str:
  return os.path.join(bank, SETTINGS)


def shard_path(bank: str, shard: int) -> str:
  return os.path.join(bank, f"bank-{shard:05d}.npz")


def write_shard(bank: str, shard: int, vectors_NxE: np.ndarray, ids_N: np.ndarray,
                skipped: dict[str, int]):
  """One shard, whole or not at all; `skipped` counts its records left out, by reason."""
  path = shard_path(bank, shard)
  with files.atomic_path(path) as tmp, files.open_file(tmp, "wb") as f:
    np.savez(f, vectors=vectors_NxE.astype(np.float16), ids=ids_N.astype(np.int64),
             skipped=np.array(json.dumps(skipped)))


def shard_skipped(bank: str, shard: int) -> dict[str, int]:
  with files.open_file(shard_path(bank, shard), "rb") as f, np.load(f) as shard_file:
    return json.loads(str(shard_file["skipped"]))


def done_shards(bank: str) -> set[int]:
  return {int(os.path.basename(p)[5:10]) for p in files.glob(os.path.join(bank, "bank-*.npz"))}


def documents_path(bank: str, shard: int) -> str:
  return os.path.join(bank, f"bank-{shard:05d}.documents.npy")


def read_manifest(bank: str) -> dict:
  path = os.path.join(bank, MANIFEST)
  if not files.exists(path):
    raise ConfigError(f"{bank} holds no complete memory bank ({MANIFEST} is missing): run "
                      "python -m cm3jax.build_memory first")
  manifest = files.read_json(path)
  if "shard_records" not in manifest:
    raise ConfigError(f"memory bank {bank} was built by an earlier cm3jax, in shards that are "
                      "not its code files and without its documents: rebuild it with python -m "
                      "cm3jax.build_memory --out=NEW_DIRECTORY")
  return manifest


def load(bank: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(vectors float16 [N, E], ids int64 [N], manifest) of a complete bank."""
  manifest = read_manifest(bank)
  vectors, ids = [], []
  for shard in range(manifest["shards"]):
    path = shard_path(bank, shard)
    if not files.exists(path):
      raise ConfigError(f"memory bank {bank} lacks {os.path.basename(path)} of its "
                        f"{manifest['shards']} shards")
    with files.open_file(path, "rb") as f, np.load(f) as shard_file:
      vectors.append(shard_file["vectors"])
      ids.append(shard_file["ids"])
  vectors_NxE = np.concatenate(vectors) if vectors else np.zeros((0, manifest["dim"]), np.float16)
  ids_N = np.concatenate(ids) if ids else np.zeros((0,), np.int64)
  if len(ids_N) != manifest["records"]:
    raise ConfigError(f"memory bank {bank} holds {len(ids_N)} vectors; its {MANIFEST} says "
                      f"{manifest['records']}")
  return vectors_NxE, ids_N, manifest


def check_compatible(manifest: dict, bank: str, r):
  """Refuses a bank built by another retriever (`r`, a retriever.Retriever: its weights and
  towers), or of another dimension."""
  dim = r.cfg.embed_dim
  if manifest["dim"] != dim:
    raise ConfigError(f"memory bank {bank} holds {manifest['dim']}-dimensional vectors; this "
                      f"retriever embeds in {dim}")
  if manifest["retriever_fingerprint"] != r.fingerprint:
    raise ConfigError(f"memory bank {bank} was built by another retriever "
                      f"({manifest['retriever']}); rebuild it with this one")
  provenance.check(manifest, r.towers, f"memory bank {bank}",
                   "load its retriever as the bank records it")


def codes_identity(codes_dir: str, codes_manifest: dict) -> dict:
  """What names the code shards of a split in a made_by (cm3jax/core/provenance.py)."""
  return {"codes": files.absolute(codes_dir),
          "codes_fingerprint": codes_manifest.get(provenance.FINGERPRINT),
          "codes_records": codes_manifest["records"]}


def check_covers(manifest: dict, bank: str, codes_dir: str):
  """Refuses code shards other than the ones the bank embedded (its ids index those records)."""
  codes = codes_identity(codes_dir, code_shards.read_manifest(codes_dir, manifest["split"]))
  provenance.check(manifest, codes, f"memory bank {bank} of the {manifest['split']} split",
                   "build a bank of these codes with python -m cm3jax.build_memory")


def records(codes_dir: str, split: str):
  """(index in the split, key, caption bytes, codes) of every record of a split, in file order."""
  for _, rows in file_records(codes_dir, split, None):
    yield from rows


def file_records(codes_dir: str, split: str, shards: Optional[Sequence[int]]):
  """(shard, its records as `records` gives them) for each of the split's code files `shards`
  (None: all), reading the split's file list once and only those files."""
  tf = tf_cpu.tensorflow()
  paths, counts = code_shards.shard_files(codes_dir, split)
  parse = code_shards.parser(code_shards.read_manifest(codes_dir, split)["tokens_per_image"])
  starts = np.cumsum([0] + counts)
  for shard in range(len(paths)) if shards is None else shards:
    ds = tf.data.TFRecordDataset(paths[shard]).map(parse)
    yield shard, [(int(starts[shard]) + row, ex["key"], ex["caption"], ex["codes"])
                  for row, ex in enumerate(ds.as_numpy_iterator())]


def write_documents(bank: str, shard: int, captions: Sequence[bytes], codes_NxT: np.ndarray,
                    codebook_size: int):
  """The documents of code file `shard`, every record in order, as fixed-width rows."""
  dtype = np.dtype([("codes", np.uint16 if codebook_size <= 2**16 else np.int32,
                     (codes_NxT.shape[1],)),
                    ("caption", f"S{max([len(c) for c in captions], default=0) or 1}")])
  rows = np.zeros(len(captions), dtype)
  rows["codes"], rows["caption"] = codes_NxT, captions
  with files.atomic_path(documents_path(bank, shard)) as tmp, files.open_file(tmp, "wb") as f:
    np.save(f, rows)


class Documents:
  """The bank's documents by record id, each read from its file by byte range (a local path or
  a bucket's): memory does not grow with the bank."""

  def __init__(self, bank: str, manifest: dict):
    self.bank = bank
    self.starts = np.cumsum([0] + manifest["shard_records"])
    self.layouts: dict[int, tuple[int, np.dtype]] = {}  # shard -> (data offset, row dtype)

  def __len__(self) -> int:
    return int(self.starts[-1])

  def get(self, ids_K: np.ndarray) -> tuple[list[bytes], np.ndarray]:
    """(captions, codes int32 [K, T]) of the records `ids_K` (each in [0, len(self)))."""
    ids_K = np.asarray(ids_K, np.int64).reshape(-1)
    if ids_K.size and (ids_K.min() < 0 or ids_K.max() >= len(self)):
      raise ValueError(f"record ids must lie in [0, {len(self)}): got {ids_K.min()} to "
                       f"{ids_K.max()}")
    shards = np.searchsorted(self.starts, ids_K, side="right") - 1
    found: dict[int, np.void] = {}
    for shard in np.unique(shards):
      with files.open_file(documents_path(self.bank, int(shard)), "rb") as f:
        offset, dtype = self._layout(int(shard), f)
        for i in np.unique(ids_K[shards == shard]):
          f.seek(offset + int(i - self.starts[shard]) * dtype.itemsize)
          found[int(i)] = np.frombuffer(f.read(dtype.itemsize), dtype)[0]
    rows = [found[int(i)] for i in ids_K]
    width = rows[0]["codes"].shape[0] if rows else 0
    codes = np.array([r["codes"] for r in rows], np.int32).reshape(len(rows), width)
    return [bytes(r["caption"]) for r in rows], codes

  def _layout(self, shard: int, f) -> tuple[int, np.dtype]:
    if shard not in self.layouts:
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
      _, _, dtype = read_header(f)
      self.layouts[shard] = (f.tell(), dtype)
    return self.layouts[shard]


def usable(batch, num_codes: int, skipped: collections.Counter):
  """The (index, key, text, codes) of records that can be embedded; the others counted."""
  for index, key, caption, codes in batch:
    try:
      text = caption.decode("utf-8")
    except UnicodeDecodeError:
      skipped["caption is not UTF-8"] += 1
      continue
    if not text.strip():
      skipped["empty caption"] += 1
    elif codes.min() < 0 or codes.max() >= num_codes:
      skipped["image code out of range"] += 1
    else:
      yield index, key, text, codes
