"""Retrieved documents per record, computed offline, and the file the CM3 stream reads them from.

The strategy of CM3Leon §2.1 (relevance, modality, diversity): a record queries the bank twice,
by its text (with query dropout: a share of its text tokens dropped before encoding) and by its
image. Candidates come best first from each query in turn (text, image, text, image, ...); a
candidate is skipped when it is the record itself, when its relevance to the query is above
`max_relevance` (a near-duplicate), or when it repeats a document picked already (its relevance
to that document is above `max_relevance`: the same record, or another of the same content).
The first `per_record` survivors are the record's neighbours, -1 where fewer survive. A bank
whose documents repeat (the shapes data draws each scene many times) needs enough candidates
to reach past a query's own duplicates.

`NEIGHBOURS/SPLIT-NNNNN.npz` shards hold `keys` (the records' code-shard keys, bytes [n]) and
`ids` (int64 [n, per_record]: record indices of the bank's split), written whole so that a build
resumes after the last one; `NEIGHBOURS/SPLIT.settings.json`, written before the first, records
what made them (the split's made_by, cm3jax/core/provenance.py: the bank and its fingerprint, the
retriever's and the VQGAN's, the code shards, per_record and the strategy's settings), and a
resume compares it; `NEIGHBOURS/SPLIT.json`, written last, holds the made_by, its fingerprint
and the counts.
"""

import os

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files

REMEDY = ("run with the bank, VQGAN, codes and settings they were made with, or write to a new "
          "--out")


def pick(query_ids_Q: np.ndarray, text_scores_QxC: np.ndarray, text_ids_QxC: np.ndarray,
         image_scores_QxC: np.ndarray, image_ids_QxC: np.ndarray, documents_NxE: np.ndarray,
         per_record: int, max_relevance: float = 0.9) -> np.ndarray:
  """int64 [Q, per_record]: each query's neighbours by the strategy above (-1: none left).
  `documents_NxE`: the bank's vectors by record id, to tell a candidate that repeats a document
  picked already (relevance to it above `max_relevance`)."""
  Q, C = text_ids_QxC.shape
  out = np.full((Q, per_record), -1, np.int64)
  documents = np.asarray(documents_NxE, np.float32)
  for q in range(Q):
    picked = []
    for rank in range(C):
      for scores, ids in ((text_scores_QxC, text_ids_QxC), (image_scores_QxC, image_ids_QxC)):
        candidate = int(ids[q, rank])
        if (len(picked) < per_record and candidate >= 0 and candidate != query_ids_Q[q]
            and scores[q, rank] <= max_relevance
            and not (documents[picked] @ documents[candidate] > max_relevance).any()):
          picked.append(candidate)
    out[q, :len(picked)] = picked
  return out


def drop_tokens(tokens_BxC: np.ndarray, eot_id: int, rate: float, rng: np.random.Generator
                ) -> np.ndarray:
  """Query dropout: each text token before a row's end-of-text token is dropped with
  probability `rate`; the survivors close up and the row is zero-padded again."""
  out = np.zeros_like(tokens_BxC)
  for row, tokens in enumerate(tokens_BxC):
    end = int(np.argmax(tokens == eot_id))
    keep = rng.random(end) >= rate
    kept = np.concatenate([tokens[:end][keep], [eot_id]])
    out[row, :len(kept)] = kept
  return out


def shard_path(directory: str, split: str, shard: int) -> str:
  return os.path.join(directory, f"{split}-{shard:05d}.npz")


def manifest_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.json")


def settings_path(directory: str, split: str) -> str:
  """What made a split's shards (cm3jax/core/provenance.py), for resuming."""
  return os.path.join(directory, f"{split}.settings.json")


def write_shard(directory: str, split: str, shard: int, keys_N: np.ndarray, ids_NxM: np.ndarray):
  """One shard, whole or not at all."""
  path = shard_path(directory, split, shard)
  with files.atomic_path(path) as tmp, files.open_file(tmp, "wb") as f:
    np.savez(f, keys=keys_N, ids=ids_NxM.astype(np.int64))


def done_shards(directory: str, split: str) -> set[int]:
  prefix = f"{split}-"
  return {int(name[len(prefix):-4]) for name in files.listdir(directory)
          if name.startswith(prefix) and name.endswith(".npz")}


def finish(directory: str, split: str, info: dict):
  files.write_json(manifest_path(directory, split), info)


def read_manifest(directory: str, split: str) -> dict:
  path = manifest_path(directory, split)
  if not files.exists(path):
    raise ConfigError(f"{directory} holds no complete neighbours of the {split} split "
                      f"({os.path.basename(path)} is missing): run python -m "
                      "cm3jax.build_neighbours first")
  return files.read_json(path)


def read(directory: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(keys [N], ids [N, M], manifest) of a split's complete neighbours."""
  path = manifest_path(directory, split)
  manifest = read_manifest(directory, split)
  keys, ids = [], []
  for shard in range(manifest["shards"]):
    with (files.open_file(shard_path(directory, split, shard), "rb") as f,
          np.load(f) as shard_file):
      keys.append(shard_file["keys"])
      ids.append(shard_file["ids"])
  keys_N, ids_NxM = np.concatenate(keys), np.concatenate(ids)
  if len(keys_N) != manifest["records"]:
    raise ConfigError(f"the neighbours of {split} in {directory} hold {len(keys_N)} records; "
                      f"{os.path.basename(path)} says {manifest['records']}")
  return keys_N, ids_NxM, manifest
