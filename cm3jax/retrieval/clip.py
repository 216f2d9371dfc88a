"""CLIP, the retriever of CM3Leon: a ViT image tower and a causal text tower in the OpenAI layout.

Image tower: patches by a bias-free linear map (OpenAI's `conv1`), a class token, learned
positions, `ln_pre`, pre-LayerNorm residual blocks, `ln_post` on the class token, a bias-free
projection. Text tower: token and learned position embeddings, causal pre-LayerNorm blocks,
`ln_final`, pooled at the first end-of-text token, a bias-free projection. Unlike the token model,
LayerNorms are affine and the blocks' projections carry biases, as in every released CLIP.

Shapes are in names: B batch, S image side, N patches + 1, C context length, W width, H heads,
K head_dim, F MLP width, E embedding. Parameters carry the token model's logical axis names, so
`cm3jax.core.sharding` places them on the same mesh (docs/design.md, "Retrieval").
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3jax.config import ConfigError, dataclass_from_dict

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # the OpenAI weights
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)  # OpenAI clamps the learned temperature here


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """The two towers' sizes. `eot_id` ends a text and is where the text tower pools; the
  imported OpenAI and open_clip models use the highest id of their vocabulary."""
  embed_dim: int
  image_size: int
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  vision_mlp_dim: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  text_mlp_dim: int
  eot_id: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  image_mean: tuple = OPENAI_MEAN  # of [0, 1] RGB pixels, per channel
  image_std: tuple = OPENAI_STD
  dtype: str = "float32"

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.type is int and (not isinstance(value, int) or isinstance(value, bool) or (
          value <= 0 and f.name != "eot_id")):
        raise ConfigError(f"clip.{f.name} must be a positive integer, got {value!r}")
    if self.image_size % self.patch_size:
      raise ConfigError(f"clip.patch_size={self.patch_size} does not divide "
                        f"clip.image_size={self.image_size}")
    for tower in ("vision", "text"):
      width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
      if width % heads:
        raise ConfigError(f"clip.{tower}_heads={heads} does not divide clip.{tower}_width={width}")
    if not 0 <= self.eot_id < self.vocab_size:
      raise ConfigError(f"clip.eot_id={self.eot_id} is outside the vocabulary of "
                        f"{self.vocab_size}")
    if self.activation not in ACTIVATIONS:
      raise ConfigError(f"clip.activation={self.activation!r} is not one of {list(ACTIVATIONS)}")
    if self.dtype not in DTYPES:
      raise ConfigError(f"clip.dtype={self.dtype!r} is not one of {list(DTYPES)}")
    if len(self.image_mean) != 3 or len(self.image_std) != 3:
      raise ConfigError("clip.image_mean and clip.image_std hold one value per RGB channel")

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "ClipConfig":
    fields = dict(fields)
    for name in ("image_mean", "image_std"):
      if name in fields:
        fields[name] = tuple(float(v) for v in fields[name])
    return dataclass_from_dict(cls, fields, "clip")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


def _param(module: nn.Module, name: str, shape, axes, init):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class LayerNorm(nn.Module):
  """Affine LayerNorm over the last axis, computed in float32."""
  eps: float

  @nn.compact
  def __call__(self, x):
    W = x.shape[-1]
    scale = _param(self, "scale", (W,), ("embed",), nn.initializers.ones)
    bias = _param(self, "bias", (W,), ("embed",), nn.initializers.zeros)
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


class Block(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)); scanned over layers (carry x, no outputs)."""
  width: int
  heads: int
  mlp_dim: int
  causal: bool
  cfg: ClipConfig

  @nn.compact
  def __call__(self, x_BxLxW, _):
    W, H, F = self.width, self.heads, self.mlp_dim
    K = W // H
    dtype = DTYPES[self.cfg.dtype]
    std = W ** -0.5
    cast = lambda p: p.astype(dtype)
    h_BxLxW = LayerNorm(self.cfg.layer_norm_eps, name="ln_1")(x_BxLxW)

    def project(name):
      w_WxHxK = _param(self, f"{name}_kernel", (W, H, K), ("embed", "heads", "kv"), _normal(std))
      b_HxK = _param(self, f"{name}_bias", (H, K), ("heads", "kv"), nn.initializers.zeros)
      return jnp.einsum("blw,whk->blhk", h_BxLxW, cast(w_WxHxK)) + cast(b_HxK)

    o_BxLxHxK = jax.nn.dot_product_attention(project("query"), project("key"), project("value"),
                                             is_causal=self.causal)
    w_HxKxW = _param(self, "out_kernel", (H, K, W), ("heads", "kv", "embed"), _normal(std))
    b_W = _param(self, "out_bias", (W,), ("embed",), nn.initializers.zeros)
    x_BxLxW = x_BxLxW + jnp.einsum("blhk,hkw->blw", o_BxLxHxK, cast(w_HxKxW)) + cast(b_W)

    h_BxLxW = LayerNorm(self.cfg.layer_norm_eps, name="ln_2")(x_BxLxW)
    wi_WxF = _param(self, "fc_kernel", (W, F), ("embed", "mlp"), _normal(std))
    bi_F = _param(self, "fc_bias", (F,), ("mlp",), nn.initializers.zeros)
    h_BxLxF = ACTIVATIONS[self.cfg.activation](jnp.einsum("blw,wf->blf", h_BxLxW, cast(wi_WxF))
                                               + cast(bi_F))
    wo_FxW = _param(self, "proj_kernel", (F, W), ("mlp", "embed"), _normal(F ** -0.5))
    bo_W = _param(self, "proj_bias", (W,), ("embed",), nn.initializers.zeros)
    x_BxLxW = x_BxLxW + jnp.einsum("blf,fw->blw", h_BxLxF, cast(wo_FxW)) + cast(bo_W)
    return nn.with_logical_constraint(x_BxLxW, ("act_batch", "act_len", "act_embed")), None


def transformer(cfg: ClipConfig, width: int, heads: int, mlp_dim: int, layers: int, causal: bool,
                name: str) -> nn.Module:
  """`layers` Blocks as one scanned module: parameters stacked on a leading `layers` axis."""
  return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})(
                     width, heads, mlp_dim, causal, cfg, name=name)


class VisionTower(nn.Module):
  cfg: ClipConfig

  @nn.compact
  def __call__(self, pixels_BxSxSx3):
    """Normalised pixels -> unnormalised image embeddings [B, E]."""
    cfg = self.cfg
    P, G, W = cfg.patch_size, cfg.grid, cfg.vision_width
    dtype = DTYPES[cfg.dtype]
    B = pixels_BxSxSx3.shape[0]
    patches = pixels_BxSxSx3.reshape(B, G, P, G, P, 3).transpose(0, 1, 3, 2, 4, 5)
    patches_BxGGxPP3 = patches.reshape(B, G * G, P * P * 3).astype(dtype)
    # OpenAI's conv1 (stride = kernel = patch, no bias) as one matmul; [P, P, 3, W] is Flax's HWIO.
    w_PxPx3xW = _param(self, "patch_kernel", (P, P, 3, W), (None, None, None, "embed"),
                       _normal((P * P * 3) ** -0.5))
    x_BxGGxW = jnp.einsum("bnp,pw->bnw", patches_BxGGxPP3,
                          w_PxPx3xW.reshape(P * P * 3, W).astype(dtype))
    cls_W = _param(self, "class_embedding", (W,), ("embed",), _normal(W ** -0.5))
    pos_NxW = _param(self, "positional_embedding", (G * G + 1, W), ("pos", "embed"),
                     _normal(W ** -0.5))
    x_BxNxW = jnp.concatenate([jnp.broadcast_to(cls_W.astype(dtype), (B, 1, W)), x_BxGGxW], 1)
    x_BxNxW = LayerNorm(cfg.layer_norm_eps, name="ln_pre")(x_BxNxW + pos_NxW.astype(dtype))
    x_BxNxW, _ = transformer(cfg, W, cfg.vision_heads, cfg.vision_mlp_dim, cfg.vision_layers,
                             causal=False, name="transformer")(x_BxNxW, None)
    pooled_BxW = LayerNorm(cfg.layer_norm_eps, name="ln_post")(x_BxNxW[:, 0])
    proj_WxE = _param(self, "proj", (W, cfg.embed_dim), ("embed", None), _normal(W ** -0.5))
    return jnp.einsum("bw,we->be", pooled_BxW, proj_WxE.astype(dtype)).astype(jnp.float32)


class TextTower(nn.Module):
  cfg: ClipConfig

  @nn.compact
  def __call__(self, tokens_BxC):
    """Token ids [B, C], each row holding `eot_id` -> unnormalised text embeddings [B, E]."""
    cfg = self.cfg
    W, C = cfg.text_width, tokens_BxC.shape[1]
    dtype = DTYPES[cfg.dtype]
    embed_VxW = _param(self, "token_embedding", (cfg.vocab_size, W), ("vocab", "embed"),
                       _normal(0.02))
    pos_CxW = _param(self, "positional_embedding", (cfg.context_length, W), ("pos", "embed"),
                     _normal(0.01))
    x_BxCxW = (jnp.take(embed_VxW, tokens_BxC, axis=0) + pos_CxW[:C]).astype(dtype)
    x_BxCxW, _ = transformer(cfg, W, cfg.text_heads, cfg.text_mlp_dim, cfg.text_layers,
                             causal=True, name="transformer")(x_BxCxW, None)
    x_BxCxW = LayerNorm(cfg.layer_norm_eps, name="ln_final")(x_BxCxW)
    eot_B = jnp.argmax(tokens_BxC == cfg.eot_id, axis=1)  # the first end-of-text token
    pooled_BxW = jnp.take_along_axis(x_BxCxW, eot_B[:, None, None], axis=1)[:, 0]
    proj_WxE = _param(self, "text_projection", (W, cfg.embed_dim), ("embed", None),
                      _normal(W ** -0.5))
    return jnp.einsum("bw,we->be", pooled_BxW, proj_WxE.astype(dtype)).astype(jnp.float32)


def l2_normalize(x_BxE: jax.Array) -> jax.Array:
  return x_BxE * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x_BxE), -1, keepdims=True), 1e-12))


class CLIP(nn.Module):
  """The dual encoder. Entry points, each with one return type:

    model.apply(v, pixels, tokens)                  (image [B, E], text [B, E]) L2-normalised
    model.apply(v, pixels, method="encode_image")   image embeddings [B, E], not normalised
    model.apply(v, tokens, method="encode_text")    text embeddings [B, E], not normalised
    model.apply(v, method="temperature")            the logit scale exp(t), clamped at 100

  Pixels are [B, S, S, 3] already normalised (`normalize_pixels`)."""
  cfg: ClipConfig

  def setup(self):
    self.visual = VisionTower(self.cfg)
    self.text = TextTower(self.cfg)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), (),
                                  jnp.float32)

  def encode_image(self, pixels_BxSxSx3):
    return self.visual(pixels_BxSxSx3)

  def encode_text(self, tokens_BxC):
    return self.text(tokens_BxC)

  def temperature(self):
    return jnp.exp(jnp.minimum(self.logit_scale, LOGIT_SCALE_MAX))

  def __call__(self, pixels_BxSxSx3, tokens_BxC):
    return l2_normalize(self.visual(pixels_BxSxSx3)), l2_normalize(self.text(tokens_BxC))


def normalize_pixels(cfg: ClipConfig, images_uint8) -> jax.Array:
  """uint8 RGB images [B, S, S, 3] -> the image tower's input (per-channel mean and std)."""
  x = jnp.asarray(images_uint8, jnp.float32) / 255.0
  return (x - jnp.asarray(cfg.image_mean)) / jnp.asarray(cfg.image_std)


def init_params(cfg: ClipConfig, rng: jax.Array):
  """Boxed parameters (nn.Partitioned leaves carry logical axis names)."""
  pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  tokens = jnp.full((1, cfg.context_length), cfg.eot_id, jnp.int32)
  return CLIP(cfg).init(rng, pixels, tokens)["params"]


def contrastive_loss(image_BxE: jax.Array, text_BxE: jax.Array, temperature: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE of L2-normalised embeddings (pair i is row i): (loss, accuracy of the
  image->text and text->image picks, averaged)."""
  logits_BxB = temperature * image_BxE @ text_BxE.T
  labels_B = jnp.arange(logits_BxB.shape[0])
  log_i2t = jax.nn.log_softmax(logits_BxB, axis=1)
  log_t2i = jax.nn.log_softmax(logits_BxB, axis=0)
  loss = -0.5 * (jnp.mean(log_i2t[labels_B, labels_B]) + jnp.mean(log_t2i[labels_B, labels_B]))
  accuracy = 0.5 * (jnp.mean(jnp.argmax(logits_BxB, 1) == labels_B)
                    + jnp.mean(jnp.argmax(logits_BxB, 0) == labels_B))
  return loss, accuracy
