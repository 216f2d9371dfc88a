"""The MIPS engines against a numpy reference, and their bad input."""

import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import sharding
from cm3jax.retrieval import mips


def bank(n, e, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, e)).astype(np.float32)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def reference(bank_NxE, ids_N, queries_QxE, k):
  scores = queries_QxE @ bank_NxE.astype(np.float32).T
  order = np.argsort(-scores, axis=1)[:, :k]
  return np.take_along_axis(scores, order, 1), ids_N[order]


@pytest.mark.parametrize("engine,options", [
    ("exact", dict(block_rows=64)),  # 1000 rows in 16 blocks, the last one partly padding
    ("exact", dict(block_rows=4096)),
    ("faiss_flat", {}),
])
def test_exact_engines_agree_with_numpy(engine, options):
  vectors, ids = bank(1000, 24), np.arange(1000, dtype=np.int64) * 7 + 3
  queries = bank(33, 24, seed=1)
  scores, found = mips.make_index(engine, vectors, ids, **options).search(queries, 5)
  ref_scores, ref_ids = reference(vectors, ids, queries, 5)
  np.testing.assert_array_equal(found, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_exact_search_over_a_mesh_of_devices_and_a_float16_bank():
  vectors, ids = bank(999, 16, dtype=np.float16), np.arange(999, dtype=np.int64)
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
  queries = bank(10, 16, seed=2)
  scores, found = mips.ExactIndex(vectors, ids, mesh=mesh, block_rows=100).search(queries, 3)
  ref_scores, ref_ids = reference(vectors, ids, queries, 3)
  np.testing.assert_array_equal(found, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_padding_rows_of_the_last_block_are_never_found():
  vectors = np.abs(bank(130, 8))  # every score below 0, so an all-zero padding row would win
  queries = -np.abs(bank(4, 8, seed=5))
  ids = np.arange(130, dtype=np.int64)
  scores, found = mips.ExactIndex(vectors, ids, block_rows=64).search(queries, 4)
  ref_scores, ref_ids = reference(vectors, ids, queries, 4)
  np.testing.assert_array_equal(found, ref_ids)
  assert (scores < 0).all()


def test_ivfpq_finds_most_true_neighbours():
  rng = np.random.default_rng(0)
  centres = bank(64, 32, seed=3)
  vectors = centres[rng.integers(64, size=5000)] + 0.05 * rng.standard_normal((5000, 32))
  vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
  ids = np.arange(5000, dtype=np.int64)
  queries = vectors[:200] + 0.01 * rng.standard_normal((200, 32)).astype(np.float32)
  index = mips.make_index("faiss_ivfpq", vectors, ids, nlist=64, pq_bytes=16, nprobe=8)
  _, found = index.search(queries, 10)
  _, truth = reference(vectors, ids, queries, 10)
  recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
  assert recall > 0.5
  assert np.mean(found[:, 0] == np.arange(200)) > 0.9
  index.refine = 4  # the best 40 by the codes, rescored exactly
  scores, refined = index.search(queries, 10)
  refined_recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(refined, truth)])
  assert refined_recall > max(recall, 0.9)
  np.testing.assert_allclose(scores, np.einsum("qe,qce->qc", queries, vectors[refined]), atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()


def test_bad_input_is_refused_in_one_line():
  vectors, ids = bank(10, 8), np.arange(10)
  with pytest.raises(ConfigError, match="not one of"):
    mips.make_index("annoy", vectors, ids)
  with pytest.raises(ConfigError, match="10 bank vectors but"):
    mips.make_index("exact", vectors, ids[:9])
  with pytest.raises(ConfigError, match=r"queries must be \[Q, 8\]"):
    mips.make_index("exact", vectors, ids).search(bank(2, 4), 1)
  with pytest.raises(ConfigError, match="k=11 must be between 1 and"):
    mips.make_index("faiss_flat", vectors, ids).search(bank(2, 8), 11)
  with pytest.raises(ConfigError, match="needs at least as many vectors"):
    mips.make_index("faiss_ivfpq", vectors, ids, nlist=16, pq_bytes=4)
  with pytest.raises(ConfigError, match="does not divide the bank's dimension"):
    mips.make_index("faiss_ivfpq", vectors, ids, nlist=2, pq_bytes=3)
