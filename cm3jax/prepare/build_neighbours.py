"""Retrieve, offline, the documents each record of the code shards is trained with.

  python -m cm3jax.build_neighbours --retriever=workdirs/clip --memory=workdirs/tiny/memory \
      --codes=workdirs/tiny/codes --vqgan=workdirs/tiny/vqgan --out=workdirs/tiny/neighbours

Each record queries the bank by its text (query dropout) and by its image; the strategy and the
file format are in cm3jax/retrieval/neighbours.py. The CM3 stream reads the result with
cm3.retrieval.neighbours_dir. Shards are written whole, so a second run resumes after the last;
a resume or a reuse of neighbours made from another bank, VQGAN or codes, or with other
settings, is refused (cm3jax/core/provenance.py).
"""

import collections
import zlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from cm3jax.config import ConfigError
from cm3jax.core import files, provenance
from cm3jax.data import code_shards
from cm3jax.retrieval import memory, mips, neighbours, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer

SEED = 0  # of the query dropout


def build_split(r: retriever.Retriever, vqgan: ImageTokenizer, index: mips.Index,
                documents_NxE: np.ndarray, bank: dict, codes_dir: str, split: str, out: str,
                per_record: int = 4, candidates: int = 128,
                query_dropout: float = 0.2, max_relevance: float = 0.9, seed: int = SEED
                ) -> dict:
  """Writes (or resumes) one split's neighbour files, one per code file (this host's: host,
  host + hosts, ...), with the documents of each record's neighbours read from the bank, and
  returns the split's manifest (a complete split's, made as this run would make it, as it is).
  `index` searches the bank, whose vectors by record id are `documents_NxE`
  (`documents_by_id`)."""
  if not 0 <= query_dropout < 1:
    raise ConfigError(f"--query_dropout={query_dropout} must lie in [0, 1)")
  if per_record < 1 or candidates < per_record:
    raise ConfigError(f"--per_record={per_record} must be at least 1 and at most "
                      f"--candidates={candidates}")
  codes_manifest = code_shards.read_manifest(codes_dir, split)
  settings = made_by(vqgan.fingerprint, bank, codes_dir, split, per_record, candidates,
                     query_dropout, max_relevance, seed)
  if files.exists(neighbours.manifest_path(out, split)):
    info = neighbours.read_manifest(out, split)
    provenance.check(info, settings, f"the {split} neighbours in {out}", neighbours.REMEDY)
    return info
  _, shard_records = code_shards.shard_files(codes_dir, split)
  shards = len(shard_records)
  host, hosts = jax.process_index(), jax.process_count()
  files.makedirs(out)
  done = neighbours.done_shards(out, split)
  provenance.start(neighbours.settings_path(out, split), settings,
                   f"the {len(done)} {split} neighbour files in {out}", bool(done),
                   neighbours.REMEDY)
  bank_documents = memory.Documents(bank["path"], bank)
  in_bank = split == bank["split"]  # then a record is in the bank, and never its own neighbour
  mine = [s for s in range(host, shards, hosts) if s not in done]
  for shard, rows in memory.file_records(codes_dir, split, mine):
    ids = np.full((len(rows), per_record), -1, np.int64)
    ok = list(memory.usable(rows, vqgan.cfg.n_embed, collections.Counter()))  # the bank's count
    if ok:
      record_ids = np.array([i for i, _, _, _ in ok])
      images = vqgan.decode(np.stack([c for _, _, _, c in ok]))
      rng = np.random.default_rng([seed, zlib.crc32(split.encode()), shard])
      tokens = neighbours.drop_tokens(r.tokenize([t for _, _, t, _ in ok], r.cfg.context_length),
                                      r.cfg.eot_id, query_dropout, rng)
      text_scores, text_ids = index.search(r.embed_tokens(tokens), candidates)
      image_scores, image_ids = index.search(r.embed_images(images), candidates)
      query_ids = record_ids if in_bank else np.full(len(ok), -1)
      ids[record_ids - rows[0][0]] = neighbours.pick(query_ids, text_scores, text_ids,
                                                     image_scores, image_ids, documents_NxE,
                                                     per_record, max_relevance)
    captions, codes = bank_documents.get(ids[ids >= 0])
    ends = np.cumsum((ids >= 0).sum(1))
    neighbours.write_shard(out, split, shard, [
        neighbours.serialize(key, row, captions[end - k:end], codes[end - k:end])
        for (_, key, _, _), row, end, k in zip(rows, ids, ends, (ids >= 0).sum(1))])
    print(f"{split} neighbour file {shard + 1}/{shards}: {len(rows)} records", flush=True)
  if hosts > 1:
    multihost_utils.sync_global_devices(f"cm3jax.build_neighbours: {split}")
  info = {**settings, provenance.FINGERPRINT: provenance.fingerprint(settings),
          "records": codes_manifest["records"], "shards": shards, "shard_records": shard_records,
          "tokens_per_image": codes_manifest["tokens_per_image"]}
  if host == 0:
    neighbours.finish(out, split, info)
  return info


def made_by(vqgan_fingerprint: str, bank: dict, codes_dir: str, split: str, per_record: int,
            candidates: int, query_dropout: float, max_relevance: float, seed: int) -> dict:
  """A split's made_by (cm3jax/core/provenance.py): the bank (`bank`: its manifest and "path"), whose
  retriever embeds the queries, the VQGAN that draws the query images, the split's code shards
  and the settings of the strategy."""
  return {"split": split, **memory.codes_identity(codes_dir,
                                                  code_shards.read_manifest(codes_dir, split)),
          "bank": bank["path"], "bank_fingerprint": bank.get(provenance.FINGERPRINT),
          "bank_split": bank["split"], "retriever_fingerprint": bank["retriever_fingerprint"],
          "vqgan": vqgan_fingerprint, "per_record": per_record, "candidates": candidates,
          "query_dropout": query_dropout, "max_relevance": max_relevance, "seed": seed}


def build(r: retriever.Retriever, vqgan: ImageTokenizer, memory_dir: str, codes_dir: str,
          out: str, splits=("train", "validation"), engine: str = "exact", **options
          ) -> list[dict]:
  """Every split's neighbours from the bank in `memory_dir`, after checking that the bank was
  built by `r` from these codes; `options` go to `build_split`. Returns the splits' manifests."""
  vectors, ids, manifest = memory.load(memory_dir)
  memory.check_compatible(manifest, memory_dir, r)
  memory.check_covers(manifest, memory_dir, codes_dir)
  index = mips.make_index(engine, vectors, ids)
  bank = {**manifest, "path": files.absolute(memory_dir)}
  return [build_split(r, vqgan, index, documents_by_id(vectors, ids), bank, codes_dir, split, out,
                      **options) for split in splits]


def documents_by_id(vectors_NxE: np.ndarray, ids_N: np.ndarray) -> np.ndarray:
  """The bank's vectors as rows indexed by record id (zero rows for ids it skipped)."""
  out = np.zeros((int(ids_N.max(initial=-1)) + 1, vectors_NxE.shape[1]), vectors_NxE.dtype)
  out[ids_N] = vectors_NxE
  return out
