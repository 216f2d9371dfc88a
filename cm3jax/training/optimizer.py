"""AdamW with linear warm-up, then linear or cosine decay, and global-norm clipping."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from cm3jax.config import ConfigError

DECAYS = ("linear", "cosine")
EMBEDDING_PARAMS = ("embed", "pos_embed")


def learning_rate_schedule(opt_config, num_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Step -> learning rate: rises linearly to peak_lr over warmup_steps (reaching it at the last
  warm-up step, never 0), then decays to end_lr_ratio·peak_lr at num_steps."""
  if opt_config.decay not in DECAYS:
    raise ConfigError(f"optimizer.decay={opt_config.decay!r} is not one of {list(DECAYS)}")
  peak = opt_config.peak_lr
  end = peak * opt_config.end_lr_ratio
  warmup = opt_config.warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    frac = jnp.clip((step - warmup) / max(num_steps - warmup, 1), 0.0, 1.0)
    if opt_config.decay == "cosine":
      decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      decayed = peak + (end - peak) * frac
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def _decay_mask(decay_embeddings: bool):
  def mask(params):
    def decays(path, leaf):
      is_embedding = any(getattr(k, "key", None) in EMBEDDING_PARAMS for k in path)
      return leaf.ndim >= 2 and (decay_embeddings or not is_embedding)
    return jax.tree_util.tree_map_with_path(decays, params)
  return mask


def make_optimizer(opt_config, num_steps: int):
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = learning_rate_schedule(opt_config, num_steps)
  clip = (optax.clip_by_global_norm(opt_config.clip_norm) if opt_config.clip_norm
          else optax.identity())
  adamw = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                      weight_decay=opt_config.weight_decay,
                      mask=_decay_mask(opt_config.decay_embeddings))
  return optax.chain(clip, adamw), schedule
