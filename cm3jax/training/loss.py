"""Weighted next-token cross entropy (docs/design.md, "Objective"): sums, so microbatches and
hosts add up exactly.

Two ways to the same sums: from logits (`cross_entropy_sums`), or fused with the LM head
(`head_cross_entropy`), which never holds the [tokens, vocab] logits: it scans over chunks of
tokens and computes each chunk's gradients in the forward pass, so nothing is recomputed. Both
get log Z and the argmax from one pass over the logits.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

SUM_KEYS = ("loss", "z_loss", "correct", "weight")


def cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss_coef: float = 0.0):
  """Weighted sums of the cross entropy, the z-loss, the correct predictions and the weights.

  Targets with weight 0 (sentinels, padding) contribute nothing. Divide by `weight` to get the
  mean over weighted targets.
  """
  V = logits_BxLxV.shape[-1]
  sums, _ = _sums_and_log_z(logits_BxLxV.reshape(-1, V).astype(jnp.float32),
                            targets_BxL.reshape(-1), weights_BxL.reshape(-1).astype(jnp.float32),
                            z_loss_coef)
  return sums


def _sums_and_log_z(logits_NxV, targets_N, weights_N, z_loss_coef):
  """The sums of `cross_entropy_sums` and log Z."""
  log_z_N, argmax_N = _log_z_and_argmax(logits_NxV)
  target_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
  sums = {"loss": jnp.sum((log_z_N - target_N) * weights_N),
          "z_loss": z_loss_coef * jnp.sum(jnp.square(log_z_N) * weights_N),
          "correct": jnp.sum((argmax_N == targets_N) * weights_N),
          "weight": jnp.sum(weights_N)}
  return sums, log_z_N


@jax.custom_jvp
def _log_z_and_argmax(logits_NxV):
  """log Z and the argmax (first index of ties) of each row, in one pass over the logits: a
  reduction that carries (running max, sum of exponentials below it, index of the max)."""
  V = logits_NxV.shape[-1]

  def combine(a, b):
    (max_a, sum_a, arg_a), (max_b, sum_b, arg_b) = a, b
    max_ab = jnp.maximum(max_a, max_b)
    sum_ab = sum_a * jnp.exp(max_a - max_ab) + sum_b * jnp.exp(max_b - max_ab)
    a_first = (max_a > max_b) | ((max_a == max_b) & (arg_a < arg_b))
    return max_ab, sum_ab, jnp.where(a_first, arg_a, arg_b)

  # A finite lowest maximum: exp(-inf - -inf) would be nan where two initial values meet.
  init = (jnp.finfo(logits_NxV.dtype).min, jnp.zeros((), logits_NxV.dtype), jnp.int32(V))
  max_N, sum_N, argmax_N = jax.lax.reduce(
      (logits_NxV, jnp.ones_like(logits_NxV),
       jax.lax.broadcasted_iota(jnp.int32, logits_NxV.shape, 1)), init, combine, (1,))
  return max_N + jnp.log(sum_N), argmax_N


@_log_z_and_argmax.defjvp
def _log_z_and_argmax_jvp(primals, tangents):
  (logits_NxV,), (dlogits_NxV,) = primals, tangents
  log_z_N, argmax_N = _log_z_and_argmax(logits_NxV)
  softmax_NxV = jnp.exp(logits_NxV - log_z_N[:, None])
  return (log_z_N, argmax_N), (jnp.sum(softmax_NxV * dlogits_NxV, axis=-1),
                               np.zeros(argmax_N.shape, jax.dtypes.float0))


def head_cross_entropy(x_BxLxD, head_DxV, targets_BxL, weights_BxL, z_loss_coef: float,
                       chunk: int):
  """(objective, sums) of the logits x @ head, for `chunk` positions of every row at a time
  (the batch axis stays whole, and sharded, inside a chunk), never for all at once.

  The sums are `cross_entropy_sums`'; differentiate the objective (loss + z_loss sums), the only
  output with a gradient. Logits are float32 accumulations of the operands' dtype, as in the model.
  """
  B, L, D = x_BxLxD.shape
  if L % chunk:
    raise ValueError(f"sequence length {L} does not divide into chunks of {chunk} positions")
  by_chunk = lambda a: a.reshape(B, L // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)
  objective, sums = _fused(by_chunk(x_BxLxD), head_DxV, by_chunk(targets_BxL),
                           by_chunk(weights_BxL.astype(jnp.float32)), z_loss_coef)
  return objective, sums


def _chunk_pass(head_DxV, z_loss_coef, dhead_DxV, chunk):
  """One chunk: its sums and the gradients of its objective (loss + z-loss) in x and head."""
  x_BxCxD, targets_BxC, weights_BxC = chunk
  x_CxD = x_BxCxD.reshape(-1, x_BxCxD.shape[-1])
  targets_C, weights_C = targets_BxC.reshape(-1), weights_BxC.reshape(-1)
  logits_CxV = jnp.einsum("cd,dv->cv", x_CxD, head_DxV, preferred_element_type=jnp.float32)
  sums, log_z_C = _sums_and_log_z(logits_CxV, targets_C, weights_C, z_loss_coef)
  # d/dlogits of w * (log Z - target) + c * w * (log Z)^2 = w * (1 + 2c log Z) * p - w * onehot,
  # one elementwise pass from the float32 logits to the operand dtype (no scatter of the onehot).
  scale_C = weights_C * (1.0 + 2.0 * z_loss_coef * log_z_C)
  onehot_CxV = jnp.arange(logits_CxV.shape[-1])[None, :] == targets_C[:, None]
  dlogits_CxV = (jnp.exp(logits_CxV - log_z_C[:, None]) * scale_C[:, None]
                 - jnp.where(onehot_CxV, weights_C[:, None], 0.0)).astype(x_CxD.dtype)
  dx_CxD = jnp.einsum("cv,dv->cd", dlogits_CxV, head_DxV, preferred_element_type=jnp.float32)
  dhead_DxV = dhead_DxV + jnp.einsum("cd,cv->dv", x_CxD, dlogits_CxV,
                                     preferred_element_type=jnp.float32)
  return dhead_DxV, (sums, dx_CxD.astype(x_CxD.dtype).reshape(x_BxCxD.shape))


def _forward(x_NxBxCxD, head_DxV, targets_NxBxC, weights_NxBxC, z_loss_coef):
  step = functools.partial(_chunk_pass, head_DxV, z_loss_coef)
  dhead_DxV, (sums, dx_NxBxCxD) = jax.lax.scan(
      step, jnp.zeros(head_DxV.shape, jnp.float32), (x_NxBxCxD, targets_NxBxC, weights_NxBxC))
  sums = jax.tree.map(jnp.sum, sums)
  return (sums["loss"] + sums["z_loss"], sums), (dx_NxBxCxD, dhead_DxV.astype(head_DxV.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(x_NxBxCxD, head_DxV, targets_NxBxC, weights_NxBxC, z_loss_coef):
  return _forward(x_NxBxCxD, head_DxV, targets_NxBxC, weights_NxBxC, z_loss_coef)[0]


def _fused_fwd(x_NxBxCxD, head_DxV, targets_NxBxC, weights_NxBxC, z_loss_coef):
  return _forward(x_NxBxCxD, head_DxV, targets_NxBxC, weights_NxBxC, z_loss_coef)


def _fused_bwd(z_loss_coef, grads, cotangents):
  del z_loss_coef
  dx_NxBxCxD, dhead_DxV = grads
  g = cotangents[0]  # of the objective; the sums are metrics
  return ((g * dx_NxBxCxD).astype(dx_NxBxCxD.dtype), (g * dhead_DxV).astype(dhead_DxV.dtype),
          None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)
