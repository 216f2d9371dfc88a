"""The CM3Leon token model: an OPT-style decoder with no biases, no dropout and no LayerNorm affines.

Switches in `ModelConfig` add what CM3, OPT and fairseq decoders have (biases, LayerNorm affines,
post-LayerNorm layers, fairseq's sinusoidal positions, a scaled or normalised embedding, tied or
narrower word embeddings); at their defaults the parameters and the function are CM3Leon's.

Shapes are in names: B batch, L length, D d_model, H heads, K head_dim, F mlp_dim, V vocab,
E word embedding width (d_model unless word_embed_dim is set), T cache slots (S of them read).
Every parameter and the main activations carry logical axis names; `cm3jax.core.sharding` maps
them onto the device mesh.

`Decoder` has three entry points, each with one return type: logits (training and evaluation),
the final hidden states with the LM head (a loss fused with the head), and `decode`, which takes
and returns a typed `KVCache` (docs/design.md, "Token model").
"""

import dataclasses
import functools
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3jax.config import ConfigError, dataclass_from_dict

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "nothing_saveable", "dots_with_no_batch_dims_saveable",
                  "dots_saveable", "everything_saveable")
ATTENTION_IMPLS = ("auto", "cudnn", "xla")
POSITIONS = ("learned", "sinusoidal")
LAYER_NORM_EPS = 1e-5
# fairseq's sinusoidal table (and OPT's learned one) start real positions at row padding_idx + 1,
# with fairseq's padding_idx of 1.
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the decoder; `configs/*.py` set them under `config.model`."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  max_seq_len: int
  activation: str = "relu"
  dtype: str = "bfloat16"
  scan_layers: bool = True
  remat_policy: str = "nothing_saveable"
  zero_init_residual: bool = True
  init_std: float = 0.006
  pos_init_std: float = 0.0002
  attention: str = "auto"
  # The switches (docs/design.md, "Token model switches"); the defaults are CM3Leon's.
  bias: bool = False                  # biases on the attention projections and the MLP
  layer_norm_affine: bool = False     # a scale and a bias on every LayerNorm
  pre_layer_norm: bool = True         # False: post-LayerNorm layers and no final LayerNorm
  positions: str = "learned"          # or "sinusoidal": fairseq's, at row position + 2
  scale_embeddings: bool = False      # token embeddings times sqrt(d_model), as fairseq does
  embed_layer_norm: bool = False      # a LayerNorm on the summed embeddings
  tie_embeddings: bool = False        # the LM head is the token embedding, transposed
  word_embed_dim: int = 0             # E != d_model: project_in / project_out (OPT-350m); 0: D

  # Fields that fix the parameters or the function they compute; a checkpoint restores only
  # into a config that agrees on all of them.
  ARCHITECTURE = ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim", "max_seq_len",
                  "activation", "scan_layers", "bias", "layer_norm_affine", "pre_layer_norm",
                  "positions", "scale_embeddings", "embed_layer_norm", "tie_embeddings",
                  "word_embed_dim")

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim", "max_seq_len"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
    if self.d_model % self.num_heads:
      raise ConfigError(f"model.num_heads={self.num_heads} does not divide "
                        f"model.d_model={self.d_model}")
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
    _check_choice("attention", self.attention, ATTENTION_IMPLS)
    _check_choice("positions", self.positions, POSITIONS)
    for name in ("bias", "layer_norm_affine", "pre_layer_norm", "scale_embeddings",
                 "embed_layer_norm", "tie_embeddings", "scan_layers", "zero_init_residual"):
      if not isinstance(getattr(self, name), bool):
        raise ConfigError(f"model.{name} must be True or False, got {getattr(self, name)!r}")
    if (not isinstance(self.word_embed_dim, int) or isinstance(self.word_embed_dim, bool)
        or self.word_embed_dim < 0):
      raise ConfigError(f"model.word_embed_dim must be 0 (d_model) or a positive integer, "
                        f"got {self.word_embed_dim!r}")
    if self.positions == "sinusoidal" and self.d_model < 4:
      raise ConfigError(f"model.positions='sinusoidal' needs model.d_model >= 4, got {self.d_model}")

  @classmethod
  def architecture(cls) -> dict[str, Any]:
    """The ARCHITECTURE fields, each with its default (None where it has none): what a
    checkpoint saved before a field existed had."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {name: (None if defaults[name] is dataclasses.MISSING else defaults[name])
            for name in cls.ARCHITECTURE}

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> "ModelConfig":
    return dataclass_from_dict(cls, fields, "model")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def embed_dim(self) -> int:
    """E, the width of the token embeddings and of the LM head's input."""
    return self.word_embed_dim or self.d_model

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def attention_impl(self) -> str:
    if self.attention != "auto":
      return self.attention
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and self.dtype in ("bfloat16", "float16") else "xla"


def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f"model.{name}={value!r} is not one of {list(choices)}")


def truncated_normal(std: float):
  """Normal(0, std) cut at 3 std, as in the CM3Leon paper (std of the untruncated normal)."""
  return nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)


def layer_norm(x: jax.Array) -> jax.Array:
  """Non-affine LayerNorm, computed in float32 and returned in the input dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + LAYER_NORM_EPS)).astype(x.dtype)


class Norm(nn.Module):
  """LayerNorm with a scale and a bias (model.layer_norm_affine), computed in float32."""

  @nn.compact
  def __call__(self, x):
    D = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (D,), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                      (D,), jnp.float32)
    return (layer_norm(x.astype(jnp.float32)) * scale + bias).astype(x.dtype)


def norm(cfg: ModelConfig, name: str | None = None):
  """The LayerNorm the config asks for: a Norm module (named `name`, or by its attribute in a
  setup), or the parameter-free function."""
  return Norm(name=name) if cfg.layer_norm_affine else layer_norm


def sinusoidal_positions(positions_BxL: jax.Array, d: int) -> jax.Array:
  """fairseq's SinusoidalPositionalEmbedding at table rows positions + POSITION_OFFSET:
  [sin | cos] of half = d // 2 frequencies 10000^(-i / (half - 1)), a zero column if d is odd."""
  half = d // 2
  freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  angle_BxLxhalf = (positions_BxL + POSITION_OFFSET).astype(jnp.float32)[..., None] * freq
  table = [jnp.sin(angle_BxLxhalf), jnp.cos(angle_BxLxhalf)]
  if d % 2:
    table.append(jnp.zeros_like(angle_BxLxhalf[..., :1]))
  return jnp.concatenate(table, -1)


def _weight(module: nn.Module, name: str, shape, axes, init):
  """A float32 parameter with logical axis names, cast to the compute dtype for use."""
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
  return _compute(module.cfg, w)


def _compute(cfg: ModelConfig, w):
  """w cast to the compute dtype, unless it is in it already: the sampler's weights are (cast
  once), and its weight-only int8 ones (cm3jax/sampling/quantize.py), whose dtype is their
  scales', cannot be cast."""
  return w if w.dtype == cfg.compute_dtype else w.astype(cfg.compute_dtype)


def _bias(module: nn.Module, name: str, y, axes):
  """y plus a zero-initialised bias over y's trailing `axes`, if the config has biases."""
  if not module.cfg.bias:
    return y
  shape = y.shape[y.ndim - len(axes):]
  return y + _weight(module, name, shape, axes, nn.initializers.zeros)


def _residual_out_init(cfg: ModelConfig):
  return nn.initializers.zeros if cfg.zero_init_residual else truncated_normal(cfg.init_std)


ACT_HEADS = ("act_batch", "act_len", "act_heads", "act_kv")
CACHE_AXES = ("layers", "act_batch", "act_len", "act_heads", "act_kv")


@flax.struct.dataclass
class KVCache:
  """What decoding keeps between steps: the keys and values of every layer at T slots (in the
  compute dtype; one [layers, B, T, H, K] array each for scanned layers, else a tuple of
  [B, T, H, K] arrays, one per layer, which decoding updates in place), which slots of each row
  hold real tokens (False for left padding), and the slot the next tokens go to."""
  k: Any
  v: Any
  valid_BxT: jax.Array
  index: jax.Array


def init_cache(cfg: ModelConfig, valid_BxT: jax.Array) -> KVCache:
  """An empty KV cache of T = valid_BxT.shape[1] slots; valid_BxT[b, t] says whether slot t of row
  b will hold a real token."""
  B, T = valid_BxT.shape
  shape = (B, T, cfg.num_heads, cfg.head_dim)
  zeros = lambda axes, shape: nn.with_logical_constraint(jnp.zeros(shape, cfg.compute_dtype), axes)
  if cfg.scan_layers:
    kv = [zeros(CACHE_AXES, (cfg.num_layers, *shape)) for _ in "kv"]
  else:
    kv = [tuple(zeros(CACHE_AXES[1:], shape) for _ in range(cfg.num_layers)) for _ in "kv"]
  return KVCache(k=kv[0], v=kv[1], valid_BxT=valid_BxT, index=jnp.zeros((), jnp.int32))


class Attention(nn.Module):
  """Causal self-attention. Training passes nothing more, or `segments_BxL` (attend within a
  segment only); decoding passes this layer's (keys, values) cache `kv`, which slots are valid
  and the slot `index` the keys and values of x go to, and attends to the valid slots among the
  first `read_slots` (a static int that covers every slot written so far; None: all T)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, kv=None, segments_BxL=None, valid_BxT=None, index=None,
               read_slots=None):
    cfg = self.cfg
    D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim
    init = truncated_normal(cfg.init_std)

    def project(name):
      w_DxHxK = _weight(self, name, (D, H, K), ("embed", "heads", "kv"), init)
      y_BxLxHxK = _bias(self, f"{name}_bias", jnp.einsum("bld,dhk->blhk", x_BxLxD, w_DxHxK),
                        ("heads", "kv"))
      return nn.with_logical_constraint(y_BxLxHxK, ACT_HEADS)

    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = project("query"), project("key"), project("value")
    if kv is None and segments_BxL is None:
      o_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, is_causal=True, implementation=cfg.attention_impl())
    elif kv is None:
      same_BxLxL = segments_BxL[:, :, None] == segments_BxL[:, None, :]
      o_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask=same_BxLxL[:, None], is_causal=True,
          implementation="xla")
    else:
      k_BxTxHxK, v_BxTxHxK = kv
      # The cache holds the compute dtype (init_cache), as the keys and values do.
      k_BxTxHxK = jax.lax.dynamic_update_slice(k_BxTxHxK, k_BxLxHxK, (0, index, 0, 0))
      v_BxTxHxK = jax.lax.dynamic_update_slice(v_BxTxHxK, v_BxLxHxK, (0, index, 0, 0))
      kv = (k_BxTxHxK, v_BxTxHxK)
      S, L = read_slots or k_BxTxHxK.shape[1], x_BxLxD.shape[1]
      causal_LxS = jnp.arange(S)[None, :] <= index + jnp.arange(L)[:, None]
      mask_Bx1xLxS = (causal_LxS[None] & valid_BxT[:, None, :S])[:, None]
      o_BxLxHxK = jax.nn.dot_product_attention(
          q_BxLxHxK, k_BxTxHxK[:, :S], v_BxTxHxK[:, :S], mask=mask_Bx1xLxS,
          implementation="xla")
    o_BxLxHxK = nn.with_logical_constraint(o_BxLxHxK, ACT_HEADS)
    w_HxKxD = _weight(self, "out", (H, K, D), ("heads", "kv", "embed"), _residual_out_init(cfg))
    out_BxLxD = jnp.einsum("blhk,hkd->bld", o_BxLxHxK, w_HxKxD)
    return _bias(self, "out_bias", out_BxLxD, ("embed",)), kv


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    D, F = cfg.d_model, cfg.mlp_dim
    wi_DxF = _weight(self, "wi", (D, F), ("embed", "mlp"), truncated_normal(cfg.init_std))
    # Recomputed from its input in the backward pass: otherwise autodiff keeps intermediates
    # of the activation (exact GELU's erf term: one more [B, L, F] write and read).
    activation = jax.checkpoint(ACTIVATIONS[cfg.activation])
    h_BxLxF = activation(_bias(self, "wi_bias", jnp.einsum("bld,df->blf", x_BxLxD, wi_DxF),
                               ("mlp",)))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("act_batch", "act_len", "act_mlp"))
    wo_FxD = _weight(self, "wo", (F, D), ("mlp", "embed"), _residual_out_init(cfg))
    return _bias(self, "wo_bias", jnp.einsum("blf,fd->bld", h_BxLxF, wo_FxD), ("embed",))


RESIDUAL_AXES = ("act_batch", "act_len", "act_embed")


class Block(nn.Module):
  """Transformer layer, pre-LayerNorm (or post-, model.pre_layer_norm=False): (x, this layer's kv
  cache, what attention may see) -> (x, kv), the carry / scanned-input signature that nn.scan
  stacks (see Attention)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, kv, segments_BxL, valid_BxT, index, read_slots=None):
    cfg, pre = self.cfg, self.cfg.pre_layer_norm
    attn_norm, mlp_norm = norm(cfg, "attn_norm"), norm(cfg, "mlp_norm")
    h_BxLxD, kv = Attention(cfg, name="attn")(attn_norm(x_BxLxD) if pre else x_BxLxD, kv,
                                              segments_BxL, valid_BxT, index, read_slots)
    x_BxLxD = x_BxLxD + h_BxLxD if pre else attn_norm(x_BxLxD + h_BxLxD)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES)
    h_BxLxD = Mlp(cfg, name="mlp")(mlp_norm(x_BxLxD) if pre else x_BxLxD)
    x_BxLxD = x_BxLxD + h_BxLxD if pre else mlp_norm(x_BxLxD + h_BxLxD)
    return nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES), kv


class Decoder(nn.Module):
  """The token model. Three entry points, each with one return type:

    model.apply(v, tokens_BxL)                    float32 logits [B, L, V] (training, evaluation)
    model.apply(v, tokens_BxL, method="hidden")   final hidden states [B, L, E] and the LM head
                                                  [E, V], for a loss fused with the head
    model.apply(v, tokens_BxL, positions_BxL, cache, read_slots, method="decode")
                                                  logits of the last position [B, V] and the
                                                  updated KVCache

  Training may pass positions and segment ids [B, L]: attention then stays inside each segment
  (a packed document)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    D, E, V = cfg.d_model, cfg.embed_dim, cfg.vocab_size
    param = lambda name, init, axes, shape: self.param(
        name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    self.embed = param("embed", truncated_normal(cfg.init_std), ("vocab", "embed"), (V, E))
    if cfg.positions == "learned":
      self.pos_embed = param("pos_embed", truncated_normal(cfg.pos_init_std), ("pos", "embed"),
                             (cfg.max_seq_len, D))
    if not cfg.tie_embeddings:
      self.lm_head = param("lm_head", nn.initializers.zeros, ("embed", "vocab"), (E, V))
    if cfg.word_embed_dim:
      self.project_in = param("project_in", truncated_normal(cfg.init_std),
                              ("word_embed", "embed"), (E, D))
      self.project_out = param("project_out", truncated_normal(cfg.init_std),
                               ("embed", "word_embed"), (D, E))
    self.embed_norm = norm(cfg) if cfg.embed_layer_norm else (lambda x: x)
    self.final_norm = norm(cfg) if cfg.pre_layer_norm else (lambda x: x)
    block = Block
    if cfg.remat_policy != "none":  # affects differentiation only, so decoding is unchanged
      # Argument 6 (self is 0) is read_slots, a Python int that slices the cache.
      block = nn.remat(Block, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                       prevent_cse=not cfg.scan_layers, static_argnums=(6,))
    if cfg.scan_layers:
      self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                            length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]  # named layers_0, layers_1, ...

  def _trunk(self, tokens_BxL, positions_BxL, kv, segments_BxL=None, valid_BxT=None, index=None,
             read_slots=None):
    """Embeddings, then every layer: the residual stream [B, L, D] and the updated (k, v)."""
    cfg = self.cfg
    if positions_BxL is None:
      positions_BxL = jnp.arange(tokens_BxL.shape[1])[None, :]
    x_BxLxE = jnp.take(self.embed, tokens_BxL, axis=0)
    if cfg.scale_embeddings:
      x_BxLxE = x_BxLxE * math.sqrt(cfg.d_model)
    x_BxLxD = x_BxLxE @ self.project_in if cfg.word_embed_dim else x_BxLxE
    if cfg.positions == "learned":
      x_BxLxD = x_BxLxD + jnp.take(self.pos_embed, positions_BxL, axis=0)
    else:
      x_BxLxD = x_BxLxD + sinusoidal_positions(positions_BxL, cfg.d_model)
    x_BxLxD = self.embed_norm(x_BxLxD.astype(cfg.compute_dtype))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, RESIDUAL_AXES)
    if cfg.scan_layers:
      return self.layers(x_BxLxD, kv, segments_BxL, valid_BxT, index, read_slots)
    per_layer = []
    for i, layer in enumerate(self.layers):
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      x_BxLxD, layer_kv = layer(x_BxLxD, layer_kv, segments_BxL, valid_BxT, index, read_slots)
      per_layer.append(layer_kv)
    if kv is None:
      return x_BxLxD, None
    return x_BxLxD, tuple(tuple(layer[j] for layer in per_layer) for j in (0, 1))

  def _head(self):
    head_ExV = self.embed.T if self.cfg.tie_embeddings else self.lm_head
    return _compute(self.cfg, head_ExV)

  def _final(self, x_BxLxD):
    """The final LayerNorm (pre-LN models) and the projection to E: the LM head's input."""
    x_BxLxD = self.final_norm(x_BxLxD)
    if self.cfg.word_embed_dim:
      return x_BxLxD @ _compute(self.cfg, self.project_out)
    return x_BxLxD

  def _logits(self, x_BxLxD):
    # bf16 operands, float32 result: the softmax over V needs more than bf16's 8 mantissa bits.
    logits_BxLxV = jnp.einsum("ble,ev->blv", self._final(x_BxLxD), self._head(),
                              preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_len", "act_vocab"))

  def __call__(self, tokens_BxL, positions_BxL=None, segments_BxL=None):
    """float32 logits [B, L, V]."""
    x_BxLxD, _ = self._trunk(tokens_BxL, positions_BxL, None, segments_BxL)
    return self._logits(x_BxLxD)

  def hidden(self, tokens_BxL, positions_BxL=None, segments_BxL=None):
    """The final hidden states [B, L, E] (normalised, projected) and the LM head [E, V]."""
    x_BxLxD, _ = self._trunk(tokens_BxL, positions_BxL, None, segments_BxL)
    return self._final(x_BxLxD), self._head()

  def decode(self, tokens_BxL, positions_BxL, cache: KVCache, read_slots: int | None = None):
    """Writes the tokens' keys and values at cache.index: (logits [B, V] of the last position,
    the updated cache). Attention reads the first `read_slots` slots of the cache (static; at
    least cache.index + L), or all of them."""
    x_BxLxD, (k, v) = self._trunk(tokens_BxL, positions_BxL, (cache.k, cache.v),
                                  valid_BxT=cache.valid_BxT, index=cache.index,
                                  read_slots=read_slots)
    logits_BxV = self._logits(x_BxLxD[:, -1:])[:, 0]
    return logits_BxV, cache.replace(k=k, v=v, index=cache.index + tokens_BxL.shape[1])


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Scanned parameters (one `layers` tree with a leading L axis) -> `layers_0..layers_{L-1}`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


def stack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of `unstack_layers`."""
  layers = [params[f"layers_{i}"] for i in range(num_layers)]
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return out


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs of one training token (forward + backward, no remat recompute).

  6 per matmul weight (the LM head and any word-embedding projections included, the embedding
  lookups not), plus causal attention:
  QK^T and AV cost 4·L·D per token forward over the full square, half of it under the causal
  mask, times 3 for forward + backward.
  """
  D, E, F = cfg.d_model, cfg.embed_dim, cfg.mlp_dim
  projections = 2 * D * E if cfg.word_embed_dim else 0
  matmul_weights = cfg.num_layers * (4 * D * D + 2 * D * F) + E * cfg.vocab_size + projections
  return 6.0 * matmul_weights + 6.0 * cfg.num_layers * seq_len * D
