"""benchmarks/gpu_compile.py's accounting of a compiled step's kernels, on CPU-compiled HLO."""

import jax
import jax.numpy as jnp

from benchmarks import gpu_compile


def kernels(f, *args):
  return list(gpu_compile.Module(jax.jit(f).lower(*args).compile().as_text()).kernels())


def test_a_matmul_counts_its_flops_and_operands():
  [(repeats, kind, _, moved, flops)] = kernels(lambda a, b: a @ b, jnp.ones((64, 128)),
                                               jnp.ones((128, 32)))
  assert (repeats, kind, flops) == (1, "matmul", 2 * 64 * 128 * 32)
  assert moved == 4 * (64 * 128 + 128 * 32 + 64 * 32)


def test_a_gather_reads_the_rows_it_takes_not_the_table():
  [(_, kind, _, moved, _)] = kernels(lambda t, i: jnp.take(t, i, axis=0) * 2,
                                     jnp.ones((4096, 256)), jnp.arange(8))
  assert kind == "other"
  assert moved == 4 * (8 * 256 * 2 + 8)  # rows read and written, and the indices


def test_an_update_in_place_moves_the_update_only():
  moved = [m for _, _, label, m, _ in kernels(
      lambda buf, u, i: jax.lax.dynamic_update_slice(buf, jnp.sin(u), (i, 0)),
      jnp.ones((4096, 256)), jnp.ones((8, 256)), 3) if "dynamic_update_slice" in label]
  assert moved == [4 * (8 * 256 * 2 + 1)]


def test_a_loop_body_counts_once_per_trip():
  body = [k for k in kernels(lambda x: jax.lax.fori_loop(0, 5, lambda i, x: jnp.sin(x) * 2, x),
                             jnp.ones((1000,))) if "while/body" in k[2]]
  assert body and all(repeats == 5 for repeats, *_ in body)
  assert max(moved for *_, moved, _ in body) == 4 * 1000 * 2
