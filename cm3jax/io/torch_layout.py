"""Where each cm3jax parameter lives in the PyTorch decoders cm3jax exchanges weights with:
transformers' OPT (`OPT_NAMES`) and fairseq's transformer_lm, CM3's own (`FAIRSEQ_NAMES`). Both
are the same decoder under different key names (docs/design.md, "Export").

A layout is a list of `Entry`: the PyTorch key (with `{i}` for the layer), the parameter's path
in an unscanned cm3jax tree (a layer's under `layers_{i}`) and the conversion between the two
shapes. Export reads it one way (`tensors`), import the other (`params_from_tensors`).
"""

import dataclasses
from typing import Callable, Iterator

import jax
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import model as model_lib


@dataclasses.dataclass(frozen=True)
class Names:
  """The key names of one PyTorch decoder family."""
  prefix: str           # of the decoder's own tensors
  final_norm: str       # the LayerNorm after the last layer (pre-LN models)
  embed_norm: str       # the LayerNorm on the embeddings
  project_in: str
  project_out: str
  lm_head: str          # the output projection, a full key
  ignored: tuple[str, ...] = ()  # keys a checkpoint may hold that carry no parameter


OPT_NAMES = Names(prefix="model.decoder.", final_norm="final_layer_norm", embed_norm="",
                  project_in="project_in", project_out="project_out", lm_head="lm_head.weight")
FAIRSEQ_NAMES = Names(prefix="decoder.", final_norm="layer_norm", embed_norm="layernorm_embedding",
                      project_in="project_in_dim", project_out="project_out_dim",
                      lm_head="decoder.output_projection.weight",
                      ignored=("decoder.version", "decoder.embed_positions._float_tensor"))


@dataclasses.dataclass(frozen=True)
class Entry:
  key: str              # `{i}` stands for the layer
  path: tuple[str, ...]  # in a layer's tree for layer entries, else in the top-level tree
  kind: str             # see CONVERSIONS
  per_layer: bool = False


def layout(cfg: model_lib.ModelConfig, names: Names) -> list[Entry]:
  """Every tensor of `cfg`'s decoder in the family `names`, or a ConfigError naming the switch
  the family cannot represent."""
  p = names.prefix
  entries = [Entry(p + "embed_tokens.weight", ("embed",), "same")]
  if cfg.positions == "learned":
    entries.append(Entry(p + "embed_positions.weight", ("pos_embed",), "positions"))
  if cfg.word_embed_dim:
    entries += [Entry(f"{p}{names.project_in}.weight", ("project_in",), "linear"),
                Entry(f"{p}{names.project_out}.weight", ("project_out",), "linear")]

  def layer_norm(key, path, per_layer=False):
    if not cfg.layer_norm_affine:
      return []
    return [Entry(f"{key}.weight", (*path, "scale"), "same", per_layer),
            Entry(f"{key}.bias", (*path, "bias"), "same", per_layer)]

  if cfg.embed_layer_norm:
    if not names.embed_norm:
      raise ConfigError("model.embed_layer_norm=True: an OPT decoder has no LayerNorm on its "
                        "embeddings")
    entries += layer_norm(p + names.embed_norm, ("embed_norm",))
  if cfg.pre_layer_norm:
    entries += layer_norm(p + names.final_norm, ("final_norm",))
  layer = p + "layers.{i}."
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
    kind = "heads_out" if ours == "out" else "heads_in"
    entries.append(Entry(f"{layer}self_attn.{theirs}.weight", ("attn", ours), kind, True))
    if cfg.bias:
      bias_kind = "same" if ours == "out" else "heads_bias"
      entries.append(Entry(f"{layer}self_attn.{theirs}.bias", ("attn", f"{ours}_bias"), bias_kind,
                           True))
  for ours, theirs in (("wi", "fc1"), ("wo", "fc2")):
    entries.append(Entry(f"{layer}{theirs}.weight", ("mlp", ours), "linear", True))
    if cfg.bias:
      entries.append(Entry(f"{layer}{theirs}.bias", ("mlp", f"{ours}_bias"), "same", True))
  entries += layer_norm(layer + "self_attn_layer_norm", ("attn_norm",), True)
  entries += layer_norm(layer + "final_layer_norm", ("mlp_norm",), True)
  if not cfg.tie_embeddings:
    entries.append(Entry(names.lm_head, ("lm_head",), "linear"))
  return entries


def _heads(cfg):
  return cfg.num_heads, cfg.head_dim


# kind -> (cm3jax array -> PyTorch array, PyTorch array -> cm3jax array, cm3jax shape -> PyTorch's)
CONVERSIONS: dict[str, tuple[Callable, Callable, Callable]] = {
    "same": (lambda x, cfg: x, lambda t, cfg: t, lambda s, cfg: tuple(s)),
    "linear": (lambda x, cfg: x.T, lambda t, cfg: t.T, lambda s, cfg: tuple(s)[::-1]),
    # [D, H, K] <-> [H*K, D]
    "heads_in": (lambda x, cfg: x.reshape(x.shape[0], -1).T,
                 lambda t, cfg: t.T.reshape(t.shape[1], *_heads(cfg)),
                 lambda s, cfg: (s[1] * s[2], s[0])),
    # [H, K] <-> [H*K]
    "heads_bias": (lambda x, cfg: x.reshape(-1), lambda t, cfg: t.reshape(_heads(cfg)),
                   lambda s, cfg: (s[0] * s[1],)),
    # [H, K, D] <-> [D, H*K]
    "heads_out": (lambda x, cfg: x.reshape(-1, x.shape[-1]).T,
                  lambda t, cfg: t.T.reshape(*_heads(cfg), t.shape[0]),
                  lambda s, cfg: (s[2], s[0] * s[1])),
    # The learned table's POSITION_OFFSET leading rows are never read (padding_idx + 1 = 2).
    "positions": (lambda x, cfg: np.pad(x, ((model_lib.POSITION_OFFSET, 0), (0, 0))),
                  lambda t, cfg: t[model_lib.POSITION_OFFSET:],
                  lambda s, cfg: (s[0] + model_lib.POSITION_OFFSET, s[1])),
}


def unreadable(path: str, e: Exception) -> ConfigError:
  # safetensors and torch raise their own types for damaged files
  return ConfigError(f"cannot read {path}: {str(e).strip().splitlines()[0][:200]}")


def torch_state(path: str, allowed=()) -> dict:
  """A torch.save'd dictionary, memory-mapped where the file allows it; `allowed` names the
  classes beyond tensors and plain containers it may hold."""
  import torch
  try:
    with torch.serialization.safe_globals(list(allowed)):
      try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
      except RuntimeError as e:
        if "mmap" not in str(e):  # an old, non-zip file cannot be mapped
          raise
        return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise unreadable(path, e) from None


def _get_path(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _layer_tree(params, cfg, i):
  if cfg.scan_layers:
    return jax.tree.map(lambda x: x[i], params["layers"])
  return params[f"layers_{i}"]


def tensors(params, cfg: model_lib.ModelConfig,
            names: Names) -> Iterator[tuple[str, tuple, Callable[[], np.ndarray]]]:
  """(PyTorch key, shape, () -> float32 numpy tensor) for every tensor, fetched only when
  called (so an export holds one tensor in host memory at a time)."""
  shapes = jax.tree.map(lambda x: x.shape, params)
  for entry in layout(cfg, names):
    to_torch, _, torch_shape = CONVERSIONS[entry.kind]
    layers = range(cfg.num_layers) if entry.per_layer else [None]
    for i in layers:
      if i is None:
        tree = lambda: params
        shape = _get_path(shapes, entry.path)
      else:
        tree = lambda i=i: _layer_tree(params, cfg, i)
        shape = _get_path(shapes["layers"], entry.path)[1:] if cfg.scan_layers else (
            _get_path(shapes[f"layers_{i}"], entry.path))
      fetch = lambda tree=tree, entry=entry, to_torch=to_torch: to_torch(
          np.asarray(jax.device_get(_get_path(tree(), entry.path)), np.float32), cfg)
      yield entry.key.format(i=i), torch_shape(shape, cfg), fetch


def params_from_tensors(keys: set[str], get: Callable[[str], np.ndarray],
                        cfg: model_lib.ModelConfig, names: Names, shapes,
                        place: Callable[[tuple, np.ndarray], jax.Array]) -> dict:
  """The cm3jax parameter tree (scanned or not, as `cfg` says) from a checkpoint holding the
  tensors `keys`, each read by `get(key)` as a float32 numpy array. `shapes` is the tree of
  cm3jax shapes; `place(path, leaf)` puts each finished leaf where it belongs (a device), so
  host memory holds one leaf at a time. A missing, misshapen or unexpected tensor is a
  ConfigError naming it."""
  entries = layout(cfg, names)
  expected = {e.key.format(i=i) for e in entries
              for i in (range(cfg.num_layers) if e.per_layer else [None])}
  extra = sorted(keys - expected - set(names.ignored)
                 - ({names.lm_head} if cfg.tie_embeddings else set()))
  if extra:
    raise ConfigError(f"the checkpoint holds {extra[0]}, which this configuration has no "
                      f"place for ({len(extra)} such tensors)")

  def take(key, shape, kind):
    if key not in keys:
      raise ConfigError(f"the checkpoint has no {key}")
    tensor = get(key)
    want = CONVERSIONS[kind][2](shape, cfg)
    if tuple(tensor.shape) != want:
      raise ConfigError(f"{key} is {tuple(tensor.shape)}, the config says {want}")
    return CONVERSIONS[kind][1](tensor, cfg)

  params: dict = {}

  def put(tree, path, leaf):
    for k in path[:-1]:
      tree = tree.setdefault(k, {})
    tree[path[-1]] = leaf

  for entry in entries:
    if not entry.per_layer:
      put(params, entry.path, place(entry.path, np.ascontiguousarray(
          take(entry.key, _get_path(shapes, entry.path), entry.kind))))
    elif cfg.scan_layers:
      path = ("layers", *entry.path)
      shape = _get_path(shapes, path)
      stacked = np.empty(shape, np.float32)
      for i in range(cfg.num_layers):
        stacked[i] = take(entry.key.format(i=i), shape[1:], entry.kind)
      put(params, path, place(path, stacked))
    else:
      for i in range(cfg.num_layers):
        path = (f"layers_{i}", *entry.path)
        put(params, path, place(path, np.ascontiguousarray(
            take(entry.key.format(i=i), _get_path(shapes, path), entry.kind))))
  return params
