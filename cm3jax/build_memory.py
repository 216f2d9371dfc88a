"""Embed every record of a split's code shards into a memory bank of document vectors.

  python -m cm3jax.build_memory --retriever=workdirs/clip --codes=workdirs/tiny/codes \
      --vqgan=workdirs/tiny/vqgan --out=workdirs/tiny/memory

A record's image is its codes decoded by the VQGAN (the picture the token model sees); its
vector is the mean of the L2-normalised text and image embeddings, normalised again. Records
whose caption is empty or not UTF-8, or whose codes the VQGAN does not have, are counted and
left out. Bank shards are written whole, so a second run resumes after the last one; a resume or
a reuse by another retriever or VQGAN, of other codes or with another --shard_size is refused
(cm3jax/provenance.py). With --multihost each host embeds shards host, host + hosts, ...
(cm3jax/retrieval/memory.py).
"""

import collections
import itertools
import os

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from cm3jax import cli, provenance
from cm3jax.config import ConfigError
from cm3jax.data import code_shards
from cm3jax.retrieval import memory, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer

SHARD_SIZE = 4096  # records per bank shard, by default


def build(r: retriever.Retriever, vqgan: ImageTokenizer, codes_dir: str, split: str, out: str,
          shard_size: int = SHARD_SIZE, batch_size: int = 256) -> dict:
  """Writes (or resumes) the bank and returns its manifest."""
  if shard_size < 1 or batch_size < 1:
    raise ConfigError(f"--shard_size={shard_size} and --batch_size={batch_size} must be at "
                      "least 1")
  manifest_path = os.path.join(out, memory.MANIFEST)
  codes_manifest = code_shards.read_manifest(codes_dir, split)
  settings = made_by(r, vqgan, codes_dir, split, shard_size)
  if os.path.exists(manifest_path):
    manifest = memory.read_manifest(out)
    provenance.check(manifest, settings, f"memory bank {out}", memory.REMEDY)
    return manifest
  os.makedirs(out, exist_ok=True)
  shards = -(-codes_manifest["records"] // shard_size)
  host, hosts = jax.process_index(), jax.process_count()
  done = memory.done_shards(out)
  provenance.start(memory.settings_path(out), settings,
                   f"the {len(done)} shards of memory bank {out}", bool(done), memory.REMEDY)
  mine = [s for s in range(shards) if s % hosts == host]
  print(f"cm3jax.build_memory: {codes_manifest['records']} {split} records in {shards} bank "
        f"shards; this host: {len(mine)}, {len(set(mine) & done)} already written", flush=True)
  stream = memory.records(codes_dir, split)
  for shard in range(shards):
    rows = list(itertools.islice(stream, shard_size))
    if shard not in mine or shard in done:
      continue
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
    with np.load(memory.shard_path(out, shard)) as f:
      count += len(f["ids"])
  manifest = {"retriever": r.source, "retriever_path": r.path, **settings,
              provenance.FINGERPRINT: provenance.fingerprint(settings), "records": count,
              "shards": shards, "skipped": dict(total)}
  if host == 0:
    provenance.write_json(manifest_path, manifest)
  return manifest


def made_by(r: retriever.Retriever, vqgan: ImageTokenizer, codes_dir: str, split: str,
            shard_size: int) -> dict:
  """A bank's made_by (cm3jax/provenance.py): the retriever's and the VQGAN's weights (and the
  retriever's towers), the code
  shards it embeds and the shard size (a bank shard's records)."""
  return {"retriever_fingerprint": r.fingerprint, **r.towers, "dim": r.cfg.embed_dim,
          "vqgan": vqgan.fingerprint, "split": split,
          **memory.codes_identity(codes_dir, code_shards.read_manifest(codes_dir, split)),
          "shard_size": shard_size}


def _define_flags():
  flags.DEFINE_string("retriever", None, "A train_retriever workdir, a Hugging Face CLIPModel "
                      "directory or an OpenAI / open_clip state dict.")
  flags.DEFINE_string("codes", None, "Code shards (cm3jax.tokenize_images --out).")
  flags.DEFINE_string("vqgan", None, "The VQGAN workdir that wrote the codes.")
  flags.DEFINE_string("out", None, "Directory of the memory bank.")
  flags.DEFINE_string("split", "train", "Split of the code shards to embed.")
  flags.DEFINE_integer("shard_size", SHARD_SIZE, "Records per bank shard.")
  flags.DEFINE_integer("batch_size", 256, "Documents embedded per call.")
  flags.DEFINE_integer("head_width", 64, "Head width of a state-dict CLIP (heads are not stored).")
  flags.DEFINE_string("clip_activation", "", "MLP activation of a state-dict CLIP that does "
                      "not record it: gelu or quick_gelu.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first; each host "
                    "embeds its share of the shards.")


def main(FLAGS):
  for name in ("retriever", "codes", "vqgan", "out"):
    if not getattr(FLAGS, name):
      raise ConfigError(f"--{name} is required")
  r = retriever.load(FLAGS.retriever, FLAGS.head_width, FLAGS.clip_activation)
  manifest = build(r, ImageTokenizer.load(FLAGS.vqgan), FLAGS.codes, FLAGS.split, FLAGS.out,
                   FLAGS.shard_size, FLAGS.batch_size)
  skipped = ", ".join(f"{n} {why}" for why, n in manifest["skipped"].items()) or "none"
  print(f"memory bank {FLAGS.out}: {manifest['records']} documents of {manifest['dim']} dims "
        f"from {manifest['split']}; skipped: {skipped}")


if __name__ == "__main__":
  cli.run("build_memory", _define_flags, main)
