"""Maximum inner product search over a memory bank: one interface, two engines.

  exact        blocked top-k on device in JAX: the bank's rows sharded over the mesh's batch
               devices, scored block by block against the queries, a running top-k kept
               (`jax.lax.approx_max_k` on TPU when `recall_target` < 1)
  faiss_flat   faiss `IndexFlatIP`, exact, on the host CPU
  faiss_ivfpq  faiss `IndexIVFPQ` (inner product): a coarse quantiser of `nlist` cells and
               product-quantised residuals of `pq_bytes` bytes per vector; `nprobe` cells are
               searched, and with `refine` = r the r * k best by the codes are scored again
               exactly against the bank's own vectors (float16 on the host, or a memory-mapped
               array). For banks too large for float32 in memory.

`make_index(engine, bank_NxE, ids_N)` builds one; `index.search(queries_QxE, k)` returns the
scores [Q, k] (float32, best first) and the bank ids [Q, k] (int64) of the k best rows.
"""

import dataclasses
import functools
from typing import Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import sharding

ENGINES = ("exact", "faiss_flat", "faiss_ivfpq")


class Index(Protocol):
  def search(self, queries_QxE: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def _check(bank_NxE: np.ndarray, ids_N: np.ndarray):
  if bank_NxE.ndim != 2 or len(bank_NxE) == 0:
    raise ConfigError(f"a memory bank is a non-empty [N, E] array; got shape {bank_NxE.shape}")
  if ids_N.shape != (len(bank_NxE),):
    raise ConfigError(f"{len(bank_NxE)} bank vectors but {ids_N.shape} ids")


def _check_queries(queries_QxE: np.ndarray, dim: int, k: int, size: int):
  if queries_QxE.ndim != 2 or queries_QxE.shape[1] != dim:
    raise ConfigError(f"queries must be [Q, {dim}] for this bank; got {queries_QxE.shape}")
  if not 1 <= k <= size:
    raise ConfigError(f"k={k} must be between 1 and the bank's {size} vectors")


@functools.partial(jax.jit, static_argnames=("k", "recall_target"))
def _blocked_top_k(queries_QxE, bank_BxRxE, valid_BxR, k: int, recall_target: float):
  """Top k of queries @ bank.T, bank in B blocks of R rows: (scores [Q, k], rows [Q, k])."""
  Q, R = queries_QxE.shape[0], bank_BxRxE.shape[1]

  def top(scores, k):
    if recall_target < 1.0:
      return jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    return jax.lax.top_k(scores, k)

  def add_block(best, block):
    best_scores_QxK, best_rows_QxK = best
    rows_R, valid_R, index = block
    scores_QxR = jnp.einsum("qe,re->qr", queries_QxE, rows_R.astype(queries_QxE.dtype),
                            preferred_element_type=jnp.float32)
    scores_QxR = jnp.where(valid_R[None], scores_QxR, -jnp.inf)
    block_scores, block_rows = top(scores_QxR, min(k, R))
    scores = jnp.concatenate([best_scores_QxK, block_scores], 1)
    rows = jnp.concatenate([best_rows_QxK, block_rows + index * R], 1)
    merged_scores, picked = jax.lax.top_k(scores, k)
    return (merged_scores, jnp.take_along_axis(rows, picked, 1)), None

  init = (jnp.full((Q, k), -jnp.inf, jnp.float32), jnp.zeros((Q, k), jnp.int32))
  blocks = (bank_BxRxE, valid_BxR, jnp.arange(bank_BxRxE.shape[0]))
  (scores_QxK, rows_QxK), _ = jax.lax.scan(add_block, init, blocks)
  return scores_QxK, rows_QxK


@dataclasses.dataclass
class ExactIndex:
  """The bank on device in `block_rows`-row blocks, each block's rows split over the mesh's
  batch devices; float16 banks stay float16 on device and are scored in float32."""
  bank_NxE: np.ndarray
  ids_N: np.ndarray
  mesh: Optional[jax.sharding.Mesh] = None
  block_rows: int = 65536
  recall_target: float = 1.0  # < 1: approx_max_k within blocks, on TPU only

  def __post_init__(self):
    _check(self.bank_NxE, self.ids_N)
    N, E = self.bank_NxE.shape
    mesh = self.mesh or sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    devices = sharding.batch_devices(mesh)
    R = -(-min(self.block_rows, N) // devices) * devices
    B = -(-N // R)
    padded = np.zeros((B * R, E), self.bank_NxE.dtype)
    padded[:N] = self.bank_NxE
    valid = np.arange(B * R) < N
    rows = sharding.batch_sharding(mesh, axis=1)
    self._bank = jax.device_put(padded.reshape(B, R, E), rows)
    self._valid = jax.device_put(valid.reshape(B, R), rows)
    on_tpu = jax.default_backend() == "tpu"
    self._recall_target = self.recall_target if on_tpu else 1.0

  def search(self, queries_QxE, k):
    _check_queries(queries_QxE, self.bank_NxE.shape[1], k, len(self.ids_N))
    scores, rows = _blocked_top_k(jnp.asarray(queries_QxE, jnp.float32), self._bank, self._valid,
                                  k, self._recall_target)
    return np.asarray(scores), self.ids_N[np.asarray(rows)]


def _faiss():
  try:
    import faiss
  except ImportError:
    raise ConfigError("the faiss engines need faiss-cpu: pip install -r requirements.txt"
                      ) from None
  return faiss


@dataclasses.dataclass
class FaissIndex:
  """faiss_flat, or faiss_ivfpq with `nlist` cells, `pq_bytes` bytes per vector, `nprobe`
  cells searched and `refine` times k candidates rescored exactly (0: none); IVF-PQ trains on
  at most `train_rows` rows of the bank."""
  bank_NxE: np.ndarray
  ids_N: np.ndarray
  engine: str = "faiss_flat"
  nlist: int = 1024
  pq_bytes: int = 32
  nprobe: int = 16
  refine: int = 0
  train_rows: int = 100_000
  seed: int = 0

  def __post_init__(self):
    _check(self.bank_NxE, self.ids_N)
    faiss = _faiss()
    N, E = self.bank_NxE.shape
    vectors = np.ascontiguousarray(self.bank_NxE, np.float32)
    if self.engine == "faiss_flat":
      self.index = faiss.IndexFlatIP(E)
    else:
      if E % self.pq_bytes:
        raise ConfigError(f"pq_bytes={self.pq_bytes} does not divide the bank's dimension {E}")
      if N < self.nlist:
        raise ConfigError(f"faiss_ivfpq with nlist={self.nlist} needs at least as many vectors; "
                          f"the bank has {N}")
      self.quantizer = faiss.IndexFlatIP(E)
      self.index = faiss.IndexIVFPQ(self.quantizer, E, self.nlist, self.pq_bytes, 8,
                                    faiss.METRIC_INNER_PRODUCT)
      sample = np.random.default_rng(self.seed).permutation(N)[:self.train_rows]
      self.index.train(vectors[np.sort(sample)])
      self.index.nprobe = self.nprobe
    self.index.add(vectors)

  def search(self, queries_QxE, k):
    _check_queries(queries_QxE, self.bank_NxE.shape[1], k, len(self.ids_N))
    queries = np.ascontiguousarray(queries_QxE, np.float32)
    if self.engine == "faiss_ivfpq" and self.refine:
      _, candidates = self.index.search(queries, min(k * self.refine, len(self.ids_N)))
      rows_QxC = np.maximum(candidates, 0)
      exact = np.einsum("qe,qce->qc", queries, self.bank_NxE[rows_QxC].astype(np.float32))
      exact[candidates < 0] = -np.inf
      best = np.argsort(-exact, axis=1, kind="stable")[:, :k]
      scores = np.take_along_axis(exact, best, 1)
      rows = np.where(np.isfinite(scores), np.take_along_axis(candidates, best, 1), -1)
    else:
      scores, rows = self.index.search(queries, k)
    # faiss marks a slot it could not fill (fewer than k vectors in the probed cells) with -1.
    return scores, np.where(rows >= 0, self.ids_N[np.maximum(rows, 0)], -1)


def make_index(engine: str, bank_NxE: np.ndarray, ids_N: np.ndarray, **options) -> Index:
  if engine == "exact":
    return ExactIndex(bank_NxE, ids_N, **options)
  if engine in ("faiss_flat", "faiss_ivfpq"):
    return FaissIndex(bank_NxE, ids_N, engine, **options)
  raise ConfigError(f"engine={engine!r} is not one of {list(ENGINES)}")
