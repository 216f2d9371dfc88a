r"""The MIPS engines side by side on one synthetic bank; prints a table.

  python -m benchmarks.retrieval                  # 1M x 512, 1,024 queries (about 2 GB)
  python -m benchmarks.retrieval --bank=100000    # a quick look

The bank is unit vectors around 4,096 random centres (a clustered bank, like document
embeddings); queries are perturbed bank vectors. For each engine: build seconds, queries/s at
k=2 (the two documents retrieved per query), the index's memory, and recall@2 against the
faiss_flat's exact float32 result (the share of its top 2 found).
"""

import resource
import time

import numpy as np
from absl import app, flags

from cm3jax.retrieval import mips

_BANK = flags.DEFINE_integer("bank", 1_000_000, "Bank vectors.")
_DIM = flags.DEFINE_integer("dim", 512, "Embedding dimension.")
_QUERIES = flags.DEFINE_integer("queries", 1024, "Queries, searched as one batch.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed searches per engine (best is reported).")
K = 2


def unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_bank(n: int, dim: int, queries: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  centres = unit(rng.standard_normal((4096, dim), np.float32))
  bank = np.empty((n, dim), np.float32)
  for start in range(0, n, 100_000):  # in chunks: one float32 copy of the bank at a time
    rows = min(100_000, n - start)
    noise = rng.standard_normal((rows, dim), np.float32) * 0.04
    bank[start:start + rows] = unit(centres[rng.integers(4096, size=rows)] + noise)
  picked = rng.choice(n, queries, replace=False)
  return bank, unit(bank[picked] + rng.standard_normal((queries, dim), np.float32) * 0.02)


def index_bytes(engine: str, index) -> int:
  if engine == "exact":
    return index._bank.nbytes
  if engine == "faiss_flat":
    return index.index.ntotal * index.index.d * 4
  # codes and ids in the inverted lists (refining also reads the bank, kept outside the index)
  return index.index.ntotal * (index.pq_bytes + 8)


ENGINES = [  # (row name, engine, options); the first is exact in float32, the reference
    ("faiss_flat", "faiss_flat", {}),
    ("exact (JAX, float16 bank)", "exact", dict(block_rows=131072)),
    ("faiss_ivfpq nlist 4096, 64 B, nprobe 64", "faiss_ivfpq",
     dict(nlist=4096, pq_bytes=64, nprobe=64)),
]
REFINES = (8, 32)  # IVF-PQ rows again, the best refine * k rescored exactly (the same index)


def main(_):
  n, dim, q = _BANK.value, _DIM.value, _QUERIES.value
  bank, queries = synthetic_bank(n, dim, q)
  ids = np.arange(n, dtype=np.int64)
  print(f"bank {n} x {dim}, {q} queries, k={K}; peak RSS before the indexes "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
  rows, truth = [], None

  def measure(name, engine, index, build):
    nonlocal truth
    best = float("inf")
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      _, found = index.search(queries, K)
      best = min(best, time.perf_counter() - start)
    if truth is None:
      truth = found
    recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)])
    rows.append((name, build, q / best, index_bytes(engine, index) / 2**20, recall))

  for name, engine, options in ENGINES:
    start = time.perf_counter()
    vectors = bank.astype(np.float16) if engine == "exact" else bank
    index = mips.make_index(engine, vectors, ids, **options)
    index.search(queries[:8], K)  # compile / warm up
    build = time.perf_counter() - start
    measure(name, engine, index, build)
    if engine == "faiss_ivfpq":
      for refine in REFINES:
        index.refine = refine
        measure(f"{name}, best {refine * K} rescored exactly", engine, index, build)
    del index
  flat_qps = rows[0][2]
  print("\n| engine | build s | queries/s | vs faiss_flat | index MiB | recall@2 vs faiss_flat |")
  print("|---|---|---|---|---|---|")
  for name, build, qps, mib, recall in rows:
    print(f"| {name} | {build:.1f} | {qps:,.0f} | {qps / flat_qps:.2f}x | {mib:,.0f} | "
          f"{recall:.3f} |")


if __name__ == "__main__":
  app.run(main)
