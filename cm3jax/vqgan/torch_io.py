"""PyTorch VQGAN weights in the taming-transformers / Chameleon layout <-> Flax parameters.

The key `encoder.down.0.block.1.conv1.weight` is the Flax path `encoder/down_0/block_1/conv1/kernel`:
numbered ModuleList entries become `name_i`, conv weights turn from OIHW into HWIO, GroupNorm
weights are `scale`, and `quantize.embedding.weight` is the codebook `quantize/embedding`.
Needs only numpy and safetensors; torch only for `.ckpt` / `.pt` files.
"""

import io
import json
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.vqgan.model import VQGANConfig, _l2_normalize, abstract_params

# Training checkpoints also hold the discriminator and perceptual-loss weights under `loss.`.
IGNORED_PREFIXES = ("loss.",)
_NUMBERED = re.compile(r"^(down|up|block|attn)_(\d+)$")


def flax_path(key: str, ndim: int) -> tuple[str, ...]:
  parts = key.split(".")
  merged = []
  for part in parts[:-1]:
    if part.isdigit() and merged:
      merged[-1] = f"{merged[-1]}_{part}"
    else:
      merged.append(part)
  if merged[-2:] == ["quantize", "embedding"]:
    return tuple(merged)
  leaf = parts[-1]
  if leaf == "weight":
    leaf = "kernel" if ndim == 4 else "scale"
  return (*merged, leaf)


def torch_key(path: tuple[str, ...]) -> str:
  if path[-2:] == ("quantize", "embedding"):
    return ".".join(path) + ".weight"
  # List entries (`down.0`, `block.1`) are numbered; the middle block's `block_1` is a name.
  module = [p if parent == "mid" else _NUMBERED.sub(r"\1.\2", p)
            for parent, p in zip(("",) + path, path[:-1])]
  return ".".join(module + ["bias" if path[-1] == "bias" else "weight"])


def _to_flax(tensor: np.ndarray) -> np.ndarray:
  return tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor  # OIHW -> HWIO


def _to_torch(tensor: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(tensor.transpose(3, 2, 0, 1)) if tensor.ndim == 4 else tensor


def state_dict_to_params(state_dict: dict[str, np.ndarray], cfg: VQGANConfig) -> dict:
  """Flax parameters for `cfg` from a taming-layout state_dict, or a ConfigError naming every
  missing, unexpected or mis-shaped tensor."""
  expected = flax.traverse_util.flatten_dict(abstract_params(cfg))
  found, unexpected, misshaped = {}, [], []
  for key, tensor in state_dict.items():
    if key.startswith(IGNORED_PREFIXES):
      continue
    tensor = np.asarray(tensor, np.float32)
    path = flax_path(key, tensor.ndim)
    if path not in expected:
      unexpected.append(key)
      continue
    value = _to_flax(tensor)
    if value.shape != expected[path].shape:
      misshaped.append(f"{key} {tuple(tensor.shape)} (config: {_torch_shape(expected[path].shape)})")
      continue
    found[path] = value
  missing = [torch_key(p) for p in expected if p not in found]
  problems = [f"{name}: {', '.join(items[:4])}" + (f" and {len(items) - 4} more" if len(items) > 4 else "")
              for name, items in (("missing", missing), ("unexpected", unexpected),
                                  ("wrong shape", misshaped)) if items]
  if problems:
    raise ConfigError("the PyTorch VQGAN does not match the config: " + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(found)


def _torch_shape(shape):
  return tuple(shape[i] for i in (3, 2, 0, 1)) if len(shape) == 4 else tuple(shape)


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  return {torch_key(path): _to_torch(np.asarray(v, np.float32)) for path, v in flat.items()}


def load_state_dict(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Tensors of a `.safetensors` file, or of a `.ckpt`/`.pt`/`.pth` PyTorch file (its
  `state_dict` entry if it has one)."""
  if not files.exists(path):
    raise ConfigError(f"no such file: {path}")
  data = files.read_bytes(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load
    return load(data)
  import pickle
  import torch
  try:
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
  except pickle.UnpicklingError:
    raise ConfigError(f"{path} holds Python objects besides tensors; load it with "
                      "trust_pickle=True if you trust it, or save its state_dict as .safetensors") from None
  state = checkpoint.get("state_dict", checkpoint)
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def load_torch_vqgan(path: str, cfg: VQGANConfig, trust_pickle: bool = False) -> dict:
  return state_dict_to_params(load_state_dict(path, trust_pickle), cfg)


def taming_config(cfg: VQGANConfig) -> dict[str, Any]:
  """The model section of a taming / Chameleon VQGAN yaml, as JSON."""
  return {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": {
      "double_z": False, "z_channels": cfg.z_channels, "resolution": cfg.resolution,
      "in_channels": cfg.in_channels, "out_ch": cfg.in_channels, "ch": cfg.ch,
      "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
      "attn_resolutions": list(cfg.attn_resolutions), "dropout": 0.0},
      "cm3jax": json.loads(cfg.to_json())}


def export_torch_vqgan(params, cfg: VQGANConfig, directory: str):
  """Writes `model.safetensors` and `config.json` into `directory`, all or nothing.

  An l2-normalised codebook is written normalised: taming's plain lookup then decodes the same
  pixels, and its argmin over unit-norm codes picks the same codes."""
  from safetensors.numpy import save_file
  if cfg.l2_normalized_codes:
    codebook = _l2_normalize(jnp.asarray(params["quantize"]["embedding"]))
    params = flax.core.copy(params, {"quantize": {"embedding": codebook}})
  with files.staged_directory(directory, ".vqgan-export-", overwrite=True) as staging:
    save_file(params_to_state_dict(params), os.path.join(staging, "model.safetensors"))
    files.write_json(os.path.join(staging, "config.json"), taming_config(cfg))
