"""Weighted next-token cross entropy (DESIGN §3): sums, so microbatches and hosts add up exactly.

Two ways to the same sums: from logits (`cross_entropy_sums`), or fused with the LM head
(`head_cross_entropy`), which never holds the [tokens, vocab] logits: it scans over chunks of
tokens and computes each chunk's gradients in the forward pass, so nothing is recomputed.
"""

import functools

import jax
import jax.numpy as jnp

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
  """The sums of `cross_entropy_sums` and log Z, in two passes over float32 logits: an argmax
  (which also gives the maximum) and the sum of exponentials."""
  argmax_N = jnp.argmax(logits_NxV, axis=-1)
  max_N = jax.lax.stop_gradient(jnp.take_along_axis(logits_NxV, argmax_N[:, None], -1)[:, 0])
  log_z_N = max_N + jnp.log(jnp.sum(jnp.exp(logits_NxV - max_N[:, None]), axis=-1))
  target_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
  sums = {"loss": jnp.sum((log_z_N - target_N) * weights_N),
          "z_loss": z_loss_coef * jnp.sum(jnp.square(log_z_N) * weights_N),
          "correct": jnp.sum((argmax_N == targets_N) * weights_N),
          "weight": jnp.sum(weights_N)}
  return sums, log_z_N


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
