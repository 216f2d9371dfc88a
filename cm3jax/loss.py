"""Weighted next-token cross entropy (DESIGN §3): sums, so microbatches and hosts add up exactly."""

import jax
import jax.numpy as jnp

SUM_KEYS = ("loss", "z_loss", "correct", "weight")


def cross_entropy_sums(logits_BxLxV, targets_BxL, weights_BxL, z_loss_coef: float = 0.0):
  """Weighted sums of the cross entropy, the z-loss, the correct predictions and the weights.

  Targets with weight 0 (sentinels, padding) contribute nothing. Divide by `weight` to get the
  mean over weighted targets.
  """
  logits_BxLxV = logits_BxLxV.astype(jnp.float32)
  weights_BxL = weights_BxL.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  correct_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
  return {
      "loss": jnp.sum((log_z_BxL - target_logit_BxL) * weights_BxL),
      "z_loss": z_loss_coef * jnp.sum(jnp.square(log_z_BxL) * weights_BxL),
      "correct": jnp.sum(correct_BxL * weights_BxL),
      "weight": jnp.sum(weights_BxL),
  }
