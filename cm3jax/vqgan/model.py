"""A VQGAN image tokenizer in the taming-transformers / Chameleon layout (docs/design.md,
"Export"), in Flax.

Images are NHWC in [-1, 1]. Module and parameter names follow the PyTorch state_dict keys
(`encoder.down.0.block.1.conv1.weight` is `encoder/down_0/block_1/conv1/kernel`), so weights move
between the two with a mechanical renaming (cm3jax/vqgan/torch_io.py).
"""

import dataclasses
import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.config import ConfigError, dataclass_from_dict


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  resolution: int = 256
  in_channels: int = 3
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()  # Resolutions with attention besides the middle block.
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 8192
  norm_groups: int = 32
  beta: float = 0.25  # Weight of the commitment loss.
  l2_normalized_codes: bool = False  # Match on the unit sphere (cosine similarity).

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
    if self.resolution % self.downsample_factor:
      raise ConfigError(f"vqgan resolution {self.resolution} is not a multiple of the "
                        f"downsampling factor {self.downsample_factor}")
    for width in {self.ch * m for m in self.ch_mult}:
      if width % self.norm_groups:
        raise ConfigError(f"vqgan channel width {width} does not divide into "
                          f"norm_groups={self.norm_groups}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_size(self) -> int:
    return self.resolution // self.downsample_factor

  @property
  def tokens_per_image(self) -> int:
    return self.latent_size**2

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "VQGANConfig":
    return dataclass_from_dict(cls, fields, "vqgan")


def _conv(features, name, kernel=3, stride=1, padding=1):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)) if padding else "VALID",
                 name=name)


def _norm(cfg: VQGANConfig, name):
  return nn.GroupNorm(num_groups=cfg.norm_groups, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  cfg: VQGANConfig
  out_ch: int

  @nn.compact
  def __call__(self, x_BxHxWxC):
    h = _conv(self.out_ch, "conv1")(nn.swish(_norm(self.cfg, "norm1")(x_BxHxWxC)))
    h = _conv(self.out_ch, "conv2")(nn.swish(_norm(self.cfg, "norm2")(h)))
    if x_BxHxWxC.shape[-1] != self.out_ch:
      x_BxHxWxC = _conv(self.out_ch, "nin_shortcut", kernel=1, padding=0)(x_BxHxWxC)
    return x_BxHxWxC + h


class AttnBlock(nn.Module):
  cfg: VQGANConfig

  @nn.compact
  def __call__(self, x_BxHxWxC):
    B, H, W, C = x_BxHxWxC.shape
    h = _norm(self.cfg, "norm")(x_BxHxWxC)
    q, k, v = (_conv(C, name, kernel=1, padding=0)(h).reshape(B, H * W, C)
               for name in ("q", "k", "v"))
    weights_BxQxK = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * C**-0.5, axis=-1)
    h = jnp.einsum("bqk,bkc->bqc", weights_BxQxK, v).reshape(B, H, W, C)
    return x_BxHxWxC + _conv(C, "proj_out", kernel=1, padding=0)(h)


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x_BxHxWxC):
    x_BxHxWxC = jnp.pad(x_BxHxWxC, ((0, 0), (0, 1), (0, 1), (0, 0)))  # right and bottom only
    return _conv(x_BxHxWxC.shape[-1], "conv", stride=2, padding=0)(x_BxHxWxC)


class Upsample(nn.Module):
  @nn.compact
  def __call__(self, x_BxHxWxC):
    x_BxHxWxC = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)  # nearest neighbour
    return _conv(x_BxHxWxC.shape[-1], "conv")(x_BxHxWxC)


class Level(nn.Module):
  """One resolution: res blocks (each followed by attention at attn_resolutions), then resampling."""
  cfg: VQGANConfig
  out_ch: int
  num_blocks: int
  attention: bool
  resample: str  # "downsample", "upsample" or "none"

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = ResnetBlock(self.cfg, self.out_ch, name=f"block_{i}")(x)
      if self.attention:
        x = AttnBlock(self.cfg, name=f"attn_{i}")(x)
    if self.resample == "downsample":
      x = Downsample(name="downsample")(x)
    elif self.resample == "upsample":
      x = Upsample(name="upsample")(x)
    return x


class Mid(nn.Module):
  cfg: VQGANConfig

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    x = ResnetBlock(self.cfg, C, name="block_1")(x)
    x = AttnBlock(self.cfg, name="attn_1")(x)
    return ResnetBlock(self.cfg, C, name="block_2")(x)


class Encoder(nn.Module):
  cfg: VQGANConfig

  @nn.compact
  def __call__(self, x_BxHxWx3):
    cfg = self.cfg
    h = _conv(cfg.ch, "conv_in")(x_BxHxWx3)
    res = cfg.resolution
    last = len(cfg.ch_mult) - 1
    for i, mult in enumerate(cfg.ch_mult):
      h = Level(cfg, cfg.ch * mult, cfg.num_res_blocks, res in cfg.attn_resolutions,
                "downsample" if i != last else "none", name=f"down_{i}")(h)
      res = res // 2 if i != last else res
    h = Mid(cfg, name="mid")(h)
    h = nn.swish(_norm(cfg, "norm_out")(h))
    return _conv(cfg.z_channels, "conv_out")(h)


class Decoder(nn.Module):
  cfg: VQGANConfig

  @nn.compact
  def __call__(self, z_BxhxwxZ):
    cfg = self.cfg
    h = _conv(cfg.ch * cfg.ch_mult[-1], "conv_in")(z_BxhxwxZ)
    h = Mid(cfg, name="mid")(h)
    res = cfg.latent_size
    for i in reversed(range(len(cfg.ch_mult))):
      h = Level(cfg, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                "upsample" if i != 0 else "none", name=f"up_{i}")(h)
      res = res * 2 if i != 0 else res
    h = nn.swish(_norm(cfg, "norm_out")(h))
    return _conv(cfg.in_channels, "conv_out")(h)


class VectorQuantizer(nn.Module):
  """Nearest codebook entry by argmin ||z||^2 + ||e||^2 - 2 z.e, with a straight-through gradient.

  Returns (quantized, codes, codebook loss + beta * commitment loss).
  """
  cfg: VQGANConfig

  @nn.compact
  def __call__(self, z_BxhxwxD):
    cfg = self.cfg
    codebook_NxD = self.param("embedding", _uniform_codebook, (cfg.n_embed, cfg.embed_dim))
    if cfg.l2_normalized_codes:
      z_BxhxwxD = _l2_normalize(z_BxhxwxD)
      codebook_NxD = _l2_normalize(codebook_NxD)
    codes_Bxhxw = nearest_codes(z_BxhxwxD, codebook_NxD)
    zq_BxhxwxD = codebook_NxD[codes_Bxhxw]
    codebook_loss = jnp.mean(jnp.square(zq_BxhxwxD - jax.lax.stop_gradient(z_BxhxwxD)))
    commitment_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(zq_BxhxwxD) - z_BxhxwxD))
    zq_BxhxwxD = z_BxhxwxD + jax.lax.stop_gradient(zq_BxhxwxD - z_BxhxwxD)
    return zq_BxhxwxD, codes_Bxhxw, codebook_loss + cfg.beta * commitment_loss

  def lookup(self, codes_Bxhxw):
    codebook_NxD = self.get_variable("params", "embedding")
    if self.cfg.l2_normalized_codes:
      codebook_NxD = _l2_normalize(codebook_NxD)
    return codebook_NxD[codes_Bxhxw]


def _uniform_codebook(key, shape):
  """taming's init: uniform in (-1/n, 1/n) for n codes."""
  return jax.random.uniform(key, shape, minval=-1.0 / shape[0], maxval=1.0 / shape[0])


def _l2_normalize(x):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))


def nearest_codes(z_BxhxwxD, codebook_NxD):
  distance = (jnp.sum(jnp.square(z_BxhxwxD), -1, keepdims=True) + jnp.sum(jnp.square(codebook_NxD), -1)
              - 2 * jnp.einsum("bhwd,nd->bhwn", z_BxhxwxD, codebook_NxD))
  return jnp.argmin(distance, axis=-1).astype(jnp.int32)


class VQGAN(nn.Module):
  """images [B, H, W, C] in [-1, 1] <-> int32 codes [B, tokens_per_image]."""
  cfg: VQGANConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.quant_conv = nn.Conv(cfg.embed_dim, (1, 1))
    self.quantize = VectorQuantizer(cfg)
    self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1))
    self.decoder = Decoder(cfg)

  def __call__(self, images_BxHxWxC):
    """For training: reconstructions, codes [B, T], the vector-quantisation loss, and the
    encoder outputs z [B, h, w, embed_dim] that the codes quantise."""
    z_BxhxwxD = self.quant_conv(self.encoder(images_BxHxWxC))
    zq, codes_Bxhxw, vq_loss = self.quantize(z_BxhxwxD)
    recon = self.decoder(self.post_quant_conv(zq))
    return recon, codes_Bxhxw.reshape(len(codes_Bxhxw), -1), vq_loss, z_BxhxwxD

  def encode(self, images_BxHxWxC):
    _, codes_Bxhxw, _ = self.quantize(self.quant_conv(self.encoder(images_BxHxWxC)))
    return codes_Bxhxw.reshape(len(codes_Bxhxw), -1)

  def decode(self, codes_BxT):
    side = self.cfg.latent_size
    zq = self.quantize.lookup(codes_BxT.reshape(-1, side, side))
    return self.decoder(self.post_quant_conv(zq))


def abstract_params(cfg: VQGANConfig):
  """The ShapeDtypeStructs of a VQGAN's parameters (nothing is computed)."""
  size = cfg.resolution
  shapes = jax.eval_shape(lambda: VQGAN(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, cfg.in_channels))))
  return shapes["params"]


def images_to_model_input(images, resolution: int) -> np.ndarray:
  """uint8 [B,] H, W[, C] images (or floats already in [-1, 1]) -> float32 [B, H, W, 3] in [-1, 1].

  Grayscale is repeated to RGB and RGBA loses its alpha channel; any other shape, size or dtype is
  a ConfigError that says what was expected.
  """
  images = np.asarray(images)
  if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3, 4)
                          and images.shape[0] == resolution):
    images = images[None]
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ConfigError(f"images must be [batch,] height, width[, channels]; got shape {images.shape}")
  channels = images.shape[-1]
  if channels == 1:
    images = np.repeat(images, 3, axis=-1)
  elif channels == 4:
    images = images[..., :3]
  elif channels != 3:
    raise ConfigError(f"images must have 1, 3 or 4 channels; got {channels}")
  if images.shape[1:3] != (resolution, resolution):
    raise ConfigError(f"images are {images.shape[1]}x{images.shape[2]}; this tokenizer takes "
                      f"{resolution}x{resolution} (resize or crop first)")
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  if np.issubdtype(images.dtype, np.floating):
    if images.size and (images.min() < -1.0 - 1e-3 or images.max() > 1.0 + 1e-3):
      raise ConfigError("float images must lie in [-1, 1]; pass uint8 for 0..255 pixels")
    return images.astype(np.float32)
  raise ConfigError(f"images must be uint8 or float; got {images.dtype}")


def model_output_to_images(images_BxHxWxC) -> np.ndarray:
  """[-1, 1] floats -> uint8 pixels."""
  return np.asarray(np.clip(np.round((np.asarray(images_BxHxWxC) + 1.0) * 127.5), 0, 255), np.uint8)
