"""Train the VQGAN image tokenizer on the built-in shapes dataset.

The library of `python -m cm3jax.train_vqgan` (cm3jax/train_vqgan.py)."""

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm3jax import data
from cm3jax.config import ConfigError, check_ranges
from cm3jax.core import checkpoint, sharding
from cm3jax.training import loop
from cm3jax.vqgan import losses
from cm3jax.vqgan.model import VQGAN, VQGANConfig, model_output_to_images

# Fields that do not change the parameters' shapes or meaning may differ on resume.
ARCHITECTURE = tuple(f.name for f in dataclasses.fields(VQGANConfig) if f.name != "beta")


@flax.struct.dataclass
class VQGANState:
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  code_usage: jax.Array  # Moving average of how often each code is chosen, per image position.
  rng: jax.Array


def load_images(config, split: str) -> np.ndarray:
  from cm3jax.data import shapes_tfds  # TensorFlow is needed by the data only.
  return shapes_tfds.load(config.data, config.data_dir, split)["image"]


@dataclasses.dataclass(frozen=True)
class Setup:
  cfg: VQGANConfig
  mesh: jax.sharding.Mesh
  abstract_state: VQGANState
  batch_sharding: Any
  init_state: Callable
  train_step: Callable  # (state, images) -> (state, metrics); GAN terms from disc_start on.
  reconstruct: Callable  # (params, images) -> (reconstructions, codes)


def setup(config) -> Setup:
  if "vqgan" not in config:
    raise ConfigError("this config has no vqgan section: train_vqgan takes configs/vqgan_*.py")
  check_ranges(config)
  cfg = VQGANConfig.from_dict(config.vqgan.to_dict())
  mesh = sharding.make_mesh(config.mesh)
  batch_devices = sharding.batch_devices(mesh)
  if config.batch_size % batch_devices:
    raise ConfigError(f"batch_size={config.batch_size} does not divide over the "
                      f"{batch_devices} batch devices of the mesh")
  if config.recon_loss not in ("l1", "l2"):
    raise ConfigError(f"recon_loss={config.recon_loss!r} is not one of ['l1', 'l2']")
  if config.perceptual not in ("none", *losses.FEATURE_NETWORKS):
    raise ConfigError(f"perceptual={config.perceptual!r} is not one of "
                      f"{['none', *losses.FEATURE_NETWORKS]}")
  model = VQGAN(cfg)
  disc = losses.PatchDiscriminator(ch=config.disc_ch, num_layers=config.disc_layers)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(config.warmup_steps, 1),
      max(config.num_train_steps, config.warmup_steps + 1),
      config.learning_rate * config.end_lr_ratio)
  tx = optax.adam(schedule, b1=config.b1, b2=config.b2)
  disc_tx = optax.adam(config.disc_learning_rate, b1=config.b1, b2=config.b2)
  perceptual = (losses.perceptual_loss_fn(config.perceptual, cfg.resolution)
                if config.perceptual != "none" else None)
  size = cfg.resolution

  def init_state(rng):
    model_rng, disc_rng = jax.random.split(rng)
    images = jnp.zeros((1, size, size, cfg.in_channels))
    params = model.init(model_rng, images)["params"]
    disc_params = disc.init(disc_rng, images)["params"]
    return VQGANState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params),
                      code_usage=jnp.full((cfg.n_embed,), 1.0 / cfg.n_embed), rng=rng)

  def forward(params, images):
    recon, codes, vq_loss, z = model.apply({"params": params}, images)
    err = recon - images
    rec = jnp.mean(jnp.abs(err)) if config.recon_loss == "l1" else jnp.mean(jnp.square(err))
    nll = rec + (config.perceptual_weight * perceptual(images, recon) if perceptual else 0.0)
    return nll + vq_loss, (recon, codes, z, {"recon_loss": rec, "vq_loss": vq_loss})

  def train_step(state, images, use_gan: bool):
    if use_gan:
      def with_gan(params):
        total, aux = forward(params, images)
        return (total, -jnp.mean(disc.apply({"params": state.disc_params}, aux[0]))), aux
      (_, g_loss), vjp, aux = jax.vjp(with_gan, state.params, has_aux=True)
      nll_grads, = vjp((jnp.ones(()), jnp.zeros(())))
      gan_grads, = vjp((jnp.zeros(()), jnp.ones(())))
      last = lambda g: g["decoder"]["conv_out"]["kernel"]
      weight = config.disc_weight * losses.adaptive_gan_weight(last(nll_grads), last(gan_grads))
      grads = jax.tree.map(lambda a, b: a + weight * b, nll_grads, gan_grads)
    else:
      grads, aux = jax.grad(forward, has_aux=True)(state.params, images)
    recon, codes, z, metrics = aux
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
    if use_gan:
      def d_loss(dp):
        real = disc.apply({"params": dp}, images)
        fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
        return losses.hinge_d_loss(real, fake)
      disc_loss, disc_grads = jax.value_and_grad(d_loss)(state.disc_params)
      disc_updates, disc_opt_state = disc_tx.update(disc_grads, state.disc_opt_state)
      disc_params = optax.apply_updates(state.disc_params, disc_updates)
      metrics.update(gan_loss=g_loss, gan_weight=weight, disc_loss=disc_loss)

    counts = jnp.zeros(cfg.n_embed).at[codes.ravel()].add(1.0) / codes.size
    usage = config.usage_decay * state.code_usage + (1 - config.usage_decay) * counts
    params, usage = _restart_dead_codes(config, cfg, params, usage, z, state.step,
                                        jax.random.fold_in(state.rng, state.step))
    metrics.update(psnr=psnr(images, recon), learning_rate=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              disc_params=disc_params, disc_opt_state=disc_opt_state,
                              code_usage=usage)
    return new_state, metrics

  def reconstruct(params, images):
    recon, codes, _, _ = model.apply({"params": params}, images)
    return jnp.clip(recon, -1.0, 1.0), codes

  abstract_state = sharding.sharded_shapes(init_state, mesh, jax.random.PRNGKey(0))  # replicated
  state_sharding = sharding.shardings_of(abstract_state)
  replicated = sharding.replicated(mesh)
  images_sharding = sharding.batch_sharding(mesh)
  step_fns = {use_gan: jax.jit(functools.partial(train_step, use_gan=use_gan),
                               in_shardings=(state_sharding, images_sharding),
                               out_shardings=(state_sharding, replicated), donate_argnums=0)
              for use_gan in (False, True)}
  return Setup(
      cfg=cfg, mesh=mesh, abstract_state=abstract_state, batch_sharding=images_sharding,
      init_state=jax.jit(init_state, out_shardings=state_sharding),
      train_step=lambda state, images, step: step_fns[config.disc_start >= 0
                                                      and step >= config.disc_start](state, images),
      reconstruct=jax.jit(reconstruct, in_shardings=(state_sharding.params, images_sharding)))


def _restart_dead_codes(config, cfg, params, usage, z, step, rng):
  """Every `restart_every` steps before `restart_until`, codes chosen less than
  `dead_code_threshold` times as often as a uniform codebook would choose them move onto encoder
  outputs of this batch. The last steps run without restarts, so every code can settle."""
  if not config.restart_every:
    return params, usage
  due = (step % config.restart_every == 0) & (step < config.restart_until)
  dead = (usage < config.dead_code_threshold / cfg.n_embed) & due
  flat_z = z.reshape(-1, z.shape[-1])
  picks = flat_z[jax.random.randint(rng, (cfg.n_embed,), 0, len(flat_z))]
  codebook = params["quantize"]["embedding"]
  params = flax.core.copy(params, {"quantize": {"embedding": jnp.where(dead[:, None], picks,
                                                                        codebook)}})
  return params, jnp.where(dead, 1.0 / cfg.n_embed, usage)


def psnr(images, recon):
  """Mean over images of the PSNR of [-1, 1] images (peak-to-peak 2)."""
  mse = jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - images), axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def evaluate(s: Setup, params, images_uint8: np.ndarray, batch_size: int) -> tuple[dict, np.ndarray]:
  """PSNR, codebook usage and code perplexity over `images_uint8`, plus a grid of originals
  (top) over reconstructions (bottom)."""
  n = len(images_uint8) - len(images_uint8) % batch_size
  histogram = np.zeros(s.cfg.n_embed)
  psnrs, recons = [], []
  for i in range(0, n, batch_size):
    images = jnp.asarray(images_uint8[i:i + batch_size], jnp.float32) / 127.5 - 1.0
    recon, codes = s.reconstruct(params, jax.device_put(images, s.batch_sharding))
    psnrs.append(float(psnr(images, recon)))
    histogram += np.bincount(np.asarray(codes).ravel(), minlength=s.cfg.n_embed)
    if i == 0:
      recons = model_output_to_images(recon[:8])
  p = histogram / histogram.sum()
  nonzero = p[p > 0]
  grid = np.concatenate([np.concatenate(list(images_uint8[:len(recons)]), 1),
                         np.concatenate(list(recons), 1)], 0)
  return {"psnr": float(np.mean(psnrs)), "codebook_usage": float(np.mean(histogram > 0)),
          "code_perplexity": float(np.exp(-np.sum(nonzero * np.log(nonzero))))}, grid


FINITE_METRICS = ("recon_loss", "vq_loss")  # a step where either is not finite stops the run


def train(config, workdir: str) -> list[dict[str, float]]:
  """Trains to config.num_train_steps, resuming from `workdir`; returns the logged metrics.
  Raises NonFinite at a non-finite step and Preempted after saving on SIGTERM."""
  with loop.workdir_held(workdir, "cm3jax.train_vqgan") as workdir:
    return _train(config, workdir)


def _train(config, workdir: str) -> list[dict[str, float]]:
  s = setup(config)
  ckpts = checkpoint.Checkpoints(workdir, config, {"vqgan": dict.fromkeys(ARCHITECTURE)})
  train_images = load_images(config, config.train_split)
  eval_images = load_images(config, "validation")[:config.eval_images]
  with sharding.use_mesh(s.mesh), contextlib.closing(ckpts):
    state = loop.restored_or_new(
        ckpts, s.abstract_state, s.init_state, config.seed, "cm3jax.train_vqgan",
        f"{s.cfg.tokens_per_image} codes of {s.cfg.n_embed} per image", workdir)

    def train_step(state, step):
      rows = data.batch_indices(config.seed, step, config.batch_size, len(train_images))
      images = jnp.asarray(train_images[rows], jnp.float32) / 127.5 - 1.0
      return s.train_step(state, jax.device_put(images, s.batch_sharding), step)

    def summarize(means, steps, seconds):
      return {**means, "images_per_s": steps * config.batch_size / seconds}

    def evaluate_and_show(state, done, progress):
      summary, grid = evaluate(s, state.params, eval_images, config.batch_size)
      progress.image(done, "eval/reconstructions", grid)
      return summary

    return loop.run(loop.Trainer(train_step=train_step, summarize=summarize,
                                 evaluate=evaluate_and_show, finite_metrics=FINITE_METRICS),
                    state, config, workdir, ckpts)
