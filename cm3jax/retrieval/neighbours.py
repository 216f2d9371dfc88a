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

The neighbours follow the layout of the code shards: `NEIGHBOURS/SPLIT-NNNNN.tfrecord` belongs
to code file NNNNN of the split (in its manifest's `files` order) and holds, record for record in
that file's order, tf.train.Examples of `key` (the record's code-shard key), `ids` (int64
[per_record]: record indices of the bank's split, -1 for none) and the documents of its real
neighbours, best first: `captions` (bytes [k]) and `codes` (int64 [k * tokens_per_image]). The
CM3 stream reads each code file beside its neighbour file, so no host holds the bank or anyone
else's neighbours in memory. Host h of N writes the files of code files h, h + N, ..., each
whole (a temporary name, renamed), so that a build resumes after the ones it has;
`NEIGHBOURS/SPLIT.settings.json`, written before the first, records what made them (the split's
made_by, cm3jax/core/provenance.py: the bank and its fingerprint, the retriever's and the VQGAN's,
the code shards, per_record and the strategy's settings), and a resume compares it;
`NEIGHBOURS/SPLIT.json`, written last by process 0, holds the made_by, its fingerprint, the
records of each file (`shard_records`, as the code shards') and the counts.
"""

import os
from typing import Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.data import code_shards, tf_cpu

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
  return os.path.join(directory, f"{split}-{shard:05d}.tfrecord")


def manifest_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.json")


def settings_path(directory: str, split: str) -> str:
  """What made a split's shards (cm3jax/core/provenance.py), for resuming."""
  return os.path.join(directory, f"{split}.settings.json")


def serialize(key: bytes, ids_M: np.ndarray, captions: Sequence[bytes], codes_KxT: np.ndarray
              ) -> bytes:
  """One record's neighbours: their ids and the documents of the real ones (`captions`,
  `codes_KxT`, best first)."""
  tf = tf_cpu.tensorflow()
  feature = {
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
      "ids": tf.train.Feature(int64_list=tf.train.Int64List(value=ids_M.tolist())),
      "captions": tf.train.Feature(bytes_list=tf.train.BytesList(value=list(captions))),
      "codes": tf.train.Feature(int64_list=tf.train.Int64List(
          value=np.asarray(codes_KxT, np.int64).reshape(-1).tolist())),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parser(per_record: int, tokens_per_image: int):
  """A tf function: serialised neighbours -> {"key": string, "ids": int64 [per_record],
  "captions": string [k], "codes": int32 [k, tokens_per_image]}."""
  tf = tf_cpu.tensorflow()
  spec = {"key": tf.io.FixedLenFeature([], tf.string),
          "ids": tf.io.FixedLenFeature([per_record], tf.int64),
          "captions": tf.io.VarLenFeature(tf.string),
          "codes": tf.io.VarLenFeature(tf.int64)}

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    codes = tf.cast(tf.sparse.to_dense(ex["codes"]), tf.int32)
    return {"key": ex["key"], "ids": ex["ids"], "captions": tf.sparse.to_dense(ex["captions"]),
            "codes": tf.reshape(codes, [-1, tokens_per_image])}
  return parse


def write_shard(directory: str, split: str, shard: int, records: Sequence[bytes]):
  """The neighbours of one code file (`serialize`d, in its order), whole or not at all."""
  code_shards.write_records(shard_path(directory, split, shard), records)


def done_shards(directory: str, split: str) -> set[int]:
  prefix = f"{split}-"
  return {int(name[len(prefix):-len(".tfrecord")]) for name in files.listdir(directory)
          if name.startswith(prefix) and name.endswith(".tfrecord")
          and name[len(prefix):-len(".tfrecord")].isdigit()}


def finish(directory: str, split: str, info: dict):
  files.write_json(manifest_path(directory, split), info)


def read_manifest(directory: str, split: str) -> dict:
  path = manifest_path(directory, split)
  if not files.exists(path):
    raise ConfigError(f"{directory} holds no complete neighbours of the {split} split "
                      f"({os.path.basename(path)} is missing): run python -m "
                      "cm3jax.build_neighbours first")
  manifest = files.read_json(path)
  if "shard_records" not in manifest:
    raise ConfigError(f"the {split} neighbours in {directory} were made by an earlier cm3jax, "
                      "without the retrieved documents beside each code file: run python -m "
                      "cm3jax.build_neighbours --out=NEW_DIRECTORY")
  return manifest


def shard_paths(directory: str, split: str) -> list[str]:
  """The neighbour files of a complete split, one per code file, in the code files' order."""
  manifest = read_manifest(directory, split)
  paths = [shard_path(directory, split, s) for s in range(len(manifest["shard_records"]))]
  missing = [p for p in paths if not files.exists(p)]
  if missing:
    raise ConfigError(f"{directory} lacks {len(missing)} of the {len(paths)} {split} neighbour "
                      f"files its {split}.json lists ({os.path.basename(missing[0])} first)")
  return paths


def read(directory: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(keys [N], ids [N, M], manifest) of a split's complete neighbours, in file order."""
  tf = tf_cpu.tensorflow()
  manifest = read_manifest(directory, split)
  parse = parser(manifest["per_record"], manifest["tokens_per_image"])
  keys, ids = [], []
  for ex in tf.data.TFRecordDataset(shard_paths(directory, split)).map(parse).as_numpy_iterator():
    keys.append(ex["key"])
    ids.append(ex["ids"])
  keys_N = np.array(keys, object)
  ids_NxM = np.array(ids, np.int64).reshape(len(keys), manifest["per_record"])
  if len(keys_N) != manifest["records"]:
    raise ConfigError(f"the neighbours of {split} in {directory} hold {len(keys_N)} records; "
                      f"its {split}.json says {manifest['records']}")
  return keys_N, ids_NxM, manifest
