"""Embed every record of a split's code shards into a memory bank of document vectors.

The library of `python -m cm3jax.build_memory` (cm3jax/build_memory.py)."""

import collections
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from cm3jax.config import ConfigError
from cm3jax.core import files, provenance
from cm3jax.data import code_shards
from cm3jax.retrieval import memory, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer


def build(r: retriever.Retriever, vqgan: ImageTokenizer, codes_dir: str, split: str, out: str,
          batch_size: int = 256) -> dict:
  """Writes (or resumes) the bank, one shard per code file of the split (this host's files:
  host, host + hosts, ...), and returns its manifest."""
  if batch_size < 1:
    raise ConfigError(f"--batch_size={batch_size} must be at least 1")
  manifest_path = os.path.join(out, memory.MANIFEST)
  codes_manifest = code_shards.read_manifest(codes_dir, split)
  settings = made_by(r, vqgan, codes_dir, split)
  if files.exists(manifest_path):
    manifest = memory.read_manifest(out)
    provenance.check(manifest, settings, f"memory bank {out}", memory.REMEDY)
    return manifest
  files.makedirs(out)
  _, shard_records = code_shards.shard_files(codes_dir, split)
  shards = len(shard_records)
  host, hosts = jax.process_index(), jax.process_count()
  done = memory.done_shards(out)
  provenance.start(memory.settings_path(out), settings,
                   f"the {len(done)} shards of memory bank {out}", bool(done), memory.REMEDY)
  mine = [s for s in range(host, shards, hosts) if s not in done]
  print(f"cm3jax.build_memory: {codes_manifest['records']} {split} records in {shards} code "
        f"files; this host embeds {len(range(host, shards, hosts))}, "
        f"{len(range(host, shards, hosts)) - len(mine)} already done", flush=True)
  for shard, rows in memory.file_records(codes_dir, split, mine):
    memory.write_documents(out, shard, [caption for _, _, caption, _ in rows],
                           np.stack([c for _, _, _, c in rows]) if rows else
                           np.zeros((0, codes_manifest["tokens_per_image"]), np.int32),
                           codes_manifest["codebook_size"])
    skipped: collections.Counter = collections.Counter()
    ok = list(memory.usable(rows, vqgan.cfg.n_embed, skipped))
    vectors = [np.zeros((0, r.cfg.embed_dim), np.float32)]
    for start in range(0, len(ok), batch_size):
      chunk = ok[start:start + batch_size]
      images = vqgan.decode(np.stack([c for _, _, _, c in chunk]))
      vectors.append(r.embed_documents([t for _, _, t, _ in chunk], images))
    memory.write_shard(out, shard, np.concatenate(vectors),
                       np.array([i for i, _, _, _ in ok], np.int64), dict(skipped))
    print(f"bank shard {shard + 1}/{shards}: {len(ok)} vectors"
          + (f", skipped {dict(skipped)}" if skipped else ""), flush=True)
  if hosts > 1:
    multihost_utils.sync_global_devices("cm3jax.build_memory: shards")
  total = collections.Counter()
  count = 0
  for shard in range(shards):
    total.update(memory.shard_skipped(out, shard))
    with files.open_file(memory.shard_path(out, shard), "rb") as f, np.load(f) as shard_arrays:
      count += len(shard_arrays["ids"])
  manifest = {"retriever": r.source, "retriever_path": r.path, **settings,
              provenance.FINGERPRINT: provenance.fingerprint(settings), "records": count,
              "shards": shards, "shard_records": shard_records, "skipped": dict(total)}
  if host == 0:
    files.write_json(manifest_path, manifest)
  return manifest


def made_by(r: retriever.Retriever, vqgan: ImageTokenizer, codes_dir: str, split: str) -> dict:
  """A bank's made_by (cm3jax/core/provenance.py): the retriever's and the VQGAN's weights (and the
  retriever's towers) and the code shards it embeds."""
  return {"retriever_fingerprint": r.fingerprint, **r.towers, "dim": r.cfg.embed_dim,
          "vqgan": vqgan.fingerprint, "split": split,
          **memory.codes_identity(codes_dir, code_shards.read_manifest(codes_dir, split))}
