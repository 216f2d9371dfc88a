"""The memory bank: document vectors of a split's code-shard records, as float16 shards.

`BANK/bank-NNNNN.npz` holds `vectors` (float16 [n, E], L2-normalised) and `ids` (int64 [n]: the
record's index in its split, in file order) and `skipped` (its records left out, by reason) for
records NNNNN * shard_size onwards; shards are written whole (a temporary file, then a rename),
so an interrupted build resumes after the last one. `BANK/bank.settings.json`, written before
the first shard, records what made them (the bank's made_by, cm3jax/core/provenance.py: the
retriever's and the VQGAN's fingerprints, the dimension, the code shards and split it embeds,
the shard size), and a resume compares it. `BANK/bank.json`, written last, marks a complete
bank: the made_by and its fingerprint, the retriever's source, the record count and the records
skipped by reason.
"""

import collections
import json
import os

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


def read_manifest(bank: str) -> dict:
  path = os.path.join(bank, MANIFEST)
  if not files.exists(path):
    raise ConfigError(f"{bank} holds no complete memory bank ({MANIFEST} is missing): run "
                      "python -m cm3jax.build_memory first")
  return files.read_json(path)


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
  """(index, key, caption bytes, codes) of every record of a split, in file order."""
  tf = tf_cpu.tensorflow()
  parse = code_shards.parser(code_shards.read_manifest(codes_dir, split)["tokens_per_image"])
  ds = tf.data.TFRecordDataset(code_shards.shard_paths(codes_dir, split)).map(parse)
  for index, ex in enumerate(ds.as_numpy_iterator()):
    yield index, ex["key"], ex["caption"], ex["codes"]


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
