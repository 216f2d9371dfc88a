"""The image tokenizer of a train_vqgan workdir, for host-side use: uint8 images <-> codes."""

import functools
from typing import Optional

import jax
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, provenance, sharding
from cm3jax.vqgan.model import (VQGAN, VQGANConfig, abstract_params, images_to_model_input,
                                model_output_to_images)


def progress(vqgan_workdir: str) -> Optional[tuple[int, int]]:
  """(step of the newest VQGAN checkpoint, num_train_steps of its run), or None."""
  step = checkpoint.newest_step(vqgan_workdir)
  if step is None:
    return None
  return step, checkpoint.saved_config(vqgan_workdir, step)["num_train_steps"]


class ImageTokenizer:
  """A trained VQGAN, jitted over this process's devices, with checked inputs."""

  def __init__(self, cfg: VQGANConfig, params, step: int = 0):
    self.cfg, self.step = cfg, step
    # This process's devices: on several hosts the codes stage runs on process 0 alone.
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.local_devices())
    self.params = jax.device_put(params, sharding.replicated(mesh))
    self.devices = mesh.size
    batch = sharding.batch_sharding(mesh)
    self._batch = batch  # inputs are placed explicitly: under a training run's mesh a plain
    # array would be replicated on that mesh, which these jits refuse
    model = VQGAN(cfg)
    self._encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode),
                           in_shardings=(None, batch))
    self._decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQGAN.decode),
                           in_shardings=(None, batch))

  @classmethod
  def load(cls, vqgan_workdir: str) -> "ImageTokenizer":
    """The latest checkpoint of `python -m cm3jax.train_vqgan --workdir=vqgan_workdir`."""
    step = checkpoint.newest_step(vqgan_workdir)
    if step is None:
      raise ConfigError(f"no VQGAN checkpoints in {vqgan_workdir}: train one with "
                        "python -m cm3jax.train_vqgan")
    config = checkpoint.saved_config(vqgan_workdir, step)
    if "vqgan" not in config:
      raise ConfigError(f"{vqgan_workdir} is not a cm3jax.train_vqgan workdir (its checkpoints "
                        "hold another model)")
    cfg = VQGANConfig.from_dict(config["vqgan"])
    return cls(cfg, checkpoint.restore_params(vqgan_workdir, step, abstract_params(cfg), host=True),
               step)

  @functools.cached_property
  def fingerprint(self) -> str:
    """Names these weights: what is made from its codes or pictures records it."""
    return provenance.params_fingerprint(self.params)

  def _padded(self, x: np.ndarray) -> np.ndarray:
    padded = -(-len(x) // self.devices) * self.devices
    return np.concatenate([x, np.zeros((padded - len(x), *x.shape[1:]), x.dtype)])

  def encode(self, images) -> np.ndarray:
    """uint8 images [B, H, W, C] (grayscale and RGBA are converted) -> int32 codes [B, T]."""
    x = images_to_model_input(images, self.cfg.resolution)
    return np.asarray(self._encode(self.params, jax.device_put(self._padded(x), self._batch)))[:len(x)]

  def decode(self, codes) -> np.ndarray:
    """int codes [B, T] -> uint8 images [B, H, W, 3]."""
    codes = np.asarray(codes)
    if codes.ndim == 1:
      codes = codes[None]
    if not np.issubdtype(codes.dtype, np.integer):
      raise ConfigError(f"codes must be integers; got {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] != self.cfg.tokens_per_image:
      raise ConfigError(f"codes must be [batch, {self.cfg.tokens_per_image}]; got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= self.cfg.n_embed):
      raise ConfigError(f"codes must lie in [0, {self.cfg.n_embed}); got {codes.min()}.."
                        f"{codes.max()}")
    n = len(codes)
    out = self._decode(self.params,
                       jax.device_put(self._padded(codes.astype(np.int32)), self._batch))
    return model_output_to_images(out[:n])
