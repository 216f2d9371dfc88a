"""CLIP weights in the two layouts users have, to and from cm3jax's parameters.

- Hugging Face `CLIPModel`: a directory with `config.json` and `model.safetensors` (read and
  written; `preprocessor_config.json`, when there, gives the pixel mean and std).
- OpenAI / open_clip state dicts: a `.pt` (a plain state dict, an open_clip training checkpoint
  with `state_dict`, or OpenAI's TorchScript archive) or a `.safetensors` file (read). Heads are
  not stored in these, so they are width / `head_width` (64 in every released model). The MLP
  activation (QuickGELU in OpenAI's weights and open_clip's `-quickgelu` models, GELU in most
  open_clip models) is read where it is recorded: the class of a TorchScript archive's
  activation modules, the `quick_gelu` of the model config in an `open_clip_config.json` beside
  the file (open_clip's Hugging Face Hub layout), or for a training checkpoint the `model` and
  `force_quick_gelu` of its run's `params.txt`. Elsewhere the caller names it.

Tensors are numpy arrays here; torch is imported only to read a `.pt`. Linear weights are
[out, in] in PyTorch and [in, out] (split into heads where attention uses them) in cm3jax.
"""

import io
import json
import os
import re
from typing import Any, Optional

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.retrieval.bpe import open_clip_file
from cm3jax.retrieval.clip import ACTIVATIONS, OPENAI_MEAN, OPENAI_STD, ClipConfig

HF_CONFIG, HF_WEIGHTS, HF_PREPROCESSOR = "config.json", "model.safetensors", "preprocessor_config.json"
HF_ACTIVATIONS = ("quick_gelu", "gelu")
OPEN_CLIP_CONFIG = "open_clip_config.json"  # beside the weights in open_clip's Hub layout
OPEN_CLIP_RUN_PARAMS = "params.txt"  # of an open_clip training run, above its checkpoints/
TORCH_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu"}  # by PyTorch module class
ACTIVATION_MODULES = ("transformer.resblocks.0.mlp.gelu", "visual.transformer.resblocks.0.mlp.gelu")
LAYER_KEYS = ("ln_1", "ln_2", "query_kernel", "query_bias", "key_kernel", "key_bias",
              "value_kernel", "value_bias", "out_kernel", "out_bias", "fc_kernel", "fc_bias",
              "proj_kernel", "proj_bias")


def load(path: str, head_width: int = 64, activation: str = "") -> tuple[ClipConfig, dict]:
  """(config, float32 numpy parameters) of a CLIP in either layout; one-line errors otherwise.
  `activation` ("gelu" or "quick_gelu") is the MLP's where the checkpoint does not record it;
  where it does, a given one must agree."""
  if activation and activation not in ACTIVATIONS:
    raise ConfigError(f"activation={activation!r} is not one of {list(ACTIVATIONS)}")
  if files.isdir(path):
    if not files.exists(os.path.join(path, HF_CONFIG)):
      raise ConfigError(f"{path} holds no {HF_CONFIG}: not a Hugging Face CLIPModel directory")
    cfg, params = load_hf(path)
    _activation(path, (cfg.activation, os.path.join(path, HF_CONFIG)), activation)
    return cfg, params
  if not files.exists(path):
    raise ConfigError(f"no CLIP checkpoint at {path}")
  state, recorded = read_checkpoint(path)
  if any(k.startswith("visual.layer1.") for k in state):  # it has a visual.conv1 too
    raise ConfigError(f"{path} is a CLIP with a ResNet image tower; only ViT towers are supported")
  if "visual.conv1.weight" in state:
    return from_openai(state, _activation(path, recorded, activation), head_width)
  if "vision_model.embeddings.patch_embedding.weight" in state:
    raise ConfigError(f"{path} holds Hugging Face CLIP tensors; pass the directory with its "
                      f"{HF_CONFIG} instead")
  raise ConfigError(f"{path} is not a CLIP checkpoint of a known layout (OpenAI / open_clip or "
                    f"Hugging Face); its first keys: {sorted(state)[:3]}")


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], Optional[tuple[str, str]]]:
  """A state-dict file's tensors, and (activation, where it is recorded) or None where neither
  the file nor the files open_clip writes beside it record the activation."""
  data = files.read_bytes(path)
  if path.endswith(".safetensors"):
    from safetensors.numpy import load
    return dict(load(data)), _hub_config_activation(path)
  import torch
  try:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    recorded = _hub_config_activation(path)
  except RuntimeError:  # OpenAI's released .pt files are TorchScript archives
    archive = torch.jit.load(io.BytesIO(data), map_location="cpu")
    state, recorded = archive.state_dict(), _module_activation(archive, path)
  if isinstance(state, dict) and "state_dict" in state:  # an open_clip training checkpoint
    state, recorded = state["state_dict"], _training_run_activation(path)
  if not isinstance(state, dict):
    raise ConfigError(f"{path} does not hold a state dict (found {type(state).__name__})")
  return {re.sub(r"^module\.", "", k): v.float().numpy() for k, v in state.items()
          if hasattr(v, "numpy")}, recorded


# The MLP activation, which OpenAI / open_clip state dicts do not hold.

def _activation(path: str, recorded: Optional[tuple[str, str]], given: str) -> str:
  if recorded is None:
    if not given:
      raise ConfigError(
          f"{path} does not record its MLP activation (open_clip trains with GELU unless the "
          "model config sets quick_gelu, as its -quickgelu models and OpenAI's weights do): pass "
          "activation 'gelu' or 'quick_gelu' (build_memory's and build_neighbours' "
          f"--clip_activation), or put open_clip's {OPEN_CLIP_CONFIG} beside it")
    return given
  found, where = recorded
  if given and given != found:
    raise ConfigError(f"{where} records the activation {found!r}; {given!r} was passed")
  return found


def _module_activation(archive, path: str) -> Optional[tuple[str, str]]:
  """From the class names a TorchScript archive keeps of its towers' activation modules."""
  modules = dict(archive.named_modules())
  classes = {getattr(modules.get(name), "original_name", None) for name in ACTIVATION_MODULES}
  if None in classes:
    return None
  unknown = classes - set(TORCH_ACTIVATIONS)
  if unknown or len(classes) > 1:
    raise ConfigError(f"{path} has the MLP activation modules {sorted(classes)}; cm3jax's CLIP "
                      f"takes one of {sorted(TORCH_ACTIVATIONS)} in both towers")
  return TORCH_ACTIVATIONS[classes.pop()], f"{path} (its {ACTIVATION_MODULES[0]} module)"


def _model_config_activation(model_cfg: dict, where: str) -> tuple[str, str]:
  """As open_clip builds a model config: QuickGELU where `quick_gelu` is true, else GELU."""
  for tower in ("vision_cfg", "text_cfg"):
    act_kwargs = model_cfg.get(tower, {}).get("act_kwargs")
    if act_kwargs:
      raise ConfigError(f"{where} sets {tower}.act_kwargs={act_kwargs}; cm3jax's CLIP has exact "
                        "GELU and QuickGELU only")
  return ("quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"), where


def _read_json(path: str) -> dict:
  try:
    found = files.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is not readable JSON: {e}") from None
  if not isinstance(found, dict):
    raise ConfigError(f"{path} holds a {type(found).__name__}, not a JSON object")
  return found


def _hub_config_activation(path: str) -> Optional[tuple[str, str]]:
  config = os.path.join(os.path.dirname(files.absolute(path)), OPEN_CLIP_CONFIG)
  if not files.exists(config):
    return None
  return _model_config_activation(_read_json(config).get("model_cfg", {}), config)


def _training_run_activation(path: str) -> Optional[tuple[str, str]]:
  """From RUN/params.txt of RUN/checkpoints/epoch_N.pt: `force_quick_gelu`, else the quick_gelu
  of the built-in open_clip config `model` names (None for a model open_clip does not ship)."""
  run_params = os.path.join(os.path.dirname(os.path.dirname(files.absolute(path))),
                            OPEN_CLIP_RUN_PARAMS)
  if not files.exists(run_params):
    return None
  lines = files.read_text(run_params).splitlines()
  params = dict(line.split(": ", 1) for line in lines if ": " in line)
  if params.get("force_quick_gelu") == "True":
    return "quick_gelu", f"{run_params} (force_quick_gelu)"
  model = params.get("model", "").replace("/", "-")  # as open_clip names its configs
  model_config = open_clip_file(os.path.join("model_configs", f"{model}.json"))
  if not files.exists(model_config):
    return None
  return _model_config_activation(_read_json(model_config),
                                  f"{run_params} (model {model})")


# OpenAI / open_clip.

def _count_layers(state: dict, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
  return max(found) + 1 if found else 0


def _heads(width: int, head_width: int, tower: str) -> int:
  if width % head_width:
    raise ConfigError(f"the {tower} width {width} is not a multiple of head_width={head_width}")
  return width // head_width


def from_openai(state: dict[str, np.ndarray], activation: str, head_width: int = 64
                ) -> tuple[ClipConfig, dict]:
  conv = state["visual.conv1.weight"]  # [W, 3, P, P]
  vision_width, patch = conv.shape[0], conv.shape[-1]
  grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
  text_width = state["ln_final.weight"].shape[0]
  vocab_size = state["token_embedding.weight"].shape[0]
  cfg = ClipConfig(
      embed_dim=state["visual.proj"].shape[1], image_size=grid * patch, patch_size=patch,
      vision_width=vision_width,
      vision_layers=_count_layers(state, "visual.transformer.resblocks."),
      vision_heads=_heads(vision_width, head_width, "image tower"),
      vision_mlp_dim=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      context_length=state["positional_embedding"].shape[0], vocab_size=vocab_size,
      text_width=text_width, text_layers=_count_layers(state, "transformer.resblocks."),
      text_heads=_heads(text_width, head_width, "text tower"),
      text_mlp_dim=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
      eot_id=vocab_size - 1, activation=activation)

  def blocks(prefix, layers, heads):
    per_layer = []
    for i in range(layers):
      get = lambda name, i=i: state[f"{prefix}{i}.{name}"]
      q, k, v = np.split(get("attn.in_proj_weight"), 3)
      qb, kb, vb = np.split(get("attn.in_proj_bias"), 3)
      per_layer.append(_block(heads, ln_1=(get("ln_1.weight"), get("ln_1.bias")),
                              ln_2=(get("ln_2.weight"), get("ln_2.bias")), q=(q, qb), k=(k, kb),
                              v=(v, vb), out=(get("attn.out_proj.weight"),
                                              get("attn.out_proj.bias")),
                              fc=(get("mlp.c_fc.weight"), get("mlp.c_fc.bias")),
                              proj=(get("mlp.c_proj.weight"), get("mlp.c_proj.bias"))))
    return _stack(per_layer)

  ln = lambda name: {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}
  params = {
      "visual": {
          "patch_kernel": conv.transpose(2, 3, 1, 0),
          "class_embedding": state["visual.class_embedding"],
          "positional_embedding": state["visual.positional_embedding"],
          "ln_pre": ln("visual.ln_pre"),
          "transformer": blocks("visual.transformer.resblocks.", cfg.vision_layers,
                                cfg.vision_heads),
          "ln_post": ln("visual.ln_post"),
          "proj": state["visual.proj"],
      },
      "text": {
          "token_embedding": state["token_embedding.weight"],
          "positional_embedding": state["positional_embedding"],
          "transformer": blocks("transformer.resblocks.", cfg.text_layers, cfg.text_heads),
          "ln_final": ln("ln_final"),
          "text_projection": state["text_projection"],
      },
      "logit_scale": state["logit_scale"].reshape(()),
  }
  return cfg, _float32(params)


# Hugging Face.

def _block(heads: int, ln_1, ln_2, q, k, v, out, fc, proj) -> dict:
  """One layer from PyTorch tensors: (weight [out, in], bias) pairs and LayerNorm pairs."""
  W = q[0].shape[1]
  K = W // heads
  split = lambda w, b: (w.T.reshape(W, heads, K), b.reshape(heads, K))
  (qk, qb), (kk, kb), (vk, vb) = split(*q), split(*k), split(*v)
  return {"ln_1": {"scale": ln_1[0], "bias": ln_1[1]}, "ln_2": {"scale": ln_2[0], "bias": ln_2[1]},
          "query_kernel": qk, "query_bias": qb, "key_kernel": kk, "key_bias": kb,
          "value_kernel": vk, "value_bias": vb,
          "out_kernel": out[0].T.reshape(heads, K, W), "out_bias": out[1],
          "fc_kernel": fc[0].T, "fc_bias": fc[1], "proj_kernel": proj[0].T, "proj_bias": proj[1]}


def _stack(per_layer: list[dict]) -> dict:
  """Per-layer trees -> one tree with a leading layers axis (the scanned layout)."""
  if isinstance(per_layer[0], dict):
    return {k: _stack([layer[k] for layer in per_layer]) for k in per_layer[0]}
  return np.stack(per_layer)


def _float32(tree):
  if isinstance(tree, dict):
    return {k: _float32(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def _hf_tower_config(section: dict, tower: str) -> dict:
  act = section.get("hidden_act", "quick_gelu")
  if act not in HF_ACTIVATIONS:
    raise ConfigError(f"{tower}_config.hidden_act={act!r} is not one of {list(HF_ACTIVATIONS)}")
  return section


def load_hf(directory: str) -> tuple[ClipConfig, dict]:
  hf = files.read_json(os.path.join(directory, HF_CONFIG))
  if hf.get("model_type") != "clip":
    raise ConfigError(f"{directory}/{HF_CONFIG} has model_type={hf.get('model_type')!r}, "
                      f"not 'clip'")
  text = _hf_tower_config(hf.get("text_config", {}), "text")
  vision = _hf_tower_config(hf.get("vision_config", {}), "vision")
  if text.get("hidden_act", "quick_gelu") != vision.get("hidden_act", "quick_gelu"):
    raise ConfigError("the text and vision towers use different activations; cm3jax's CLIP "
                      "takes one")
  weights = os.path.join(directory, HF_WEIGHTS)
  if not files.exists(weights):
    raise ConfigError(f"{directory} holds no {HF_WEIGHTS}")
  from safetensors.numpy import load
  state = dict(load(files.read_bytes(weights)))
  vocab_size = text["vocab_size"]
  eot = text.get("eos_token_id", 2)
  # transformers pools at the highest id when eos_token_id is 2 (configs older than 4.31).
  eot_id = vocab_size - 1 if eot == 2 else eot
  mean, std = OPENAI_MEAN, OPENAI_STD
  preprocessor = os.path.join(directory, HF_PREPROCESSOR)
  if files.exists(preprocessor):
    pre = files.read_json(preprocessor)
    mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
  cfg = ClipConfig(
      embed_dim=hf["projection_dim"], image_size=vision["image_size"],
      patch_size=vision["patch_size"], vision_width=vision["hidden_size"],
      vision_layers=vision["num_hidden_layers"], vision_heads=vision["num_attention_heads"],
      vision_mlp_dim=vision["intermediate_size"],
      context_length=text["max_position_embeddings"], vocab_size=vocab_size,
      text_width=text["hidden_size"], text_layers=text["num_hidden_layers"],
      text_heads=text["num_attention_heads"], text_mlp_dim=text["intermediate_size"],
      eot_id=eot_id, activation=text.get("hidden_act", "quick_gelu"),
      layer_norm_eps=float(text.get("layer_norm_eps", 1e-5)), image_mean=mean, image_std=std)

  def blocks(prefix, layers, heads):
    per_layer = []
    for i in range(layers):
      pair = lambda name, i=i: (state[f"{prefix}{i}.{name}.weight"],
                                state[f"{prefix}{i}.{name}.bias"])
      per_layer.append(_block(heads, ln_1=pair("layer_norm1"), ln_2=pair("layer_norm2"),
                              q=pair("self_attn.q_proj"), k=pair("self_attn.k_proj"),
                              v=pair("self_attn.v_proj"), out=pair("self_attn.out_proj"),
                              fc=pair("mlp.fc1"), proj=pair("mlp.fc2")))
    return _stack(per_layer)

  ln = lambda name: {"scale": state[f"{name}.weight"], "bias": state[f"{name}.bias"]}
  vis, txt = "vision_model.", "text_model."
  params = {
      "visual": {
          "patch_kernel": state[vis + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
          "class_embedding": state[vis + "embeddings.class_embedding"],
          "positional_embedding": state[vis + "embeddings.position_embedding.weight"],
          "ln_pre": ln(vis + "pre_layrnorm"),
          "transformer": blocks(vis + "encoder.layers.", cfg.vision_layers, cfg.vision_heads),
          "ln_post": ln(vis + "post_layernorm"),
          "proj": state["visual_projection.weight"].T,
      },
      "text": {
          "token_embedding": state[txt + "embeddings.token_embedding.weight"],
          "positional_embedding": state[txt + "embeddings.position_embedding.weight"],
          "transformer": blocks(txt + "encoder.layers.", cfg.text_layers, cfg.text_heads),
          "ln_final": ln(txt + "final_layer_norm"),
          "text_projection": state["text_projection.weight"].T,
      },
      "logit_scale": state["logit_scale"].reshape(()),
  }
  return cfg, _float32(params)


def hf_config(cfg: ClipConfig) -> dict[str, Any]:
  tower = lambda width, layers, heads, mlp: dict(
      hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=mlp, hidden_act=cfg.activation, layer_norm_eps=cfg.layer_norm_eps)
  text = tower(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp_dim)
  text.update(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length,
              eos_token_id=cfg.eot_id, bos_token_id=None, pad_token_id=None)
  vision = tower(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_dim)
  vision.update(image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=3)
  return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": cfg.embed_dim,
          "text_config": text, "vision_config": vision}


def save_hf(cfg: ClipConfig, params: dict, directory: str):
  """Writes `config.json`, `preprocessor_config.json` and `model.safetensors` (float32)."""
  from safetensors.numpy import save
  p = _float32(params)
  vis, txt = "vision_model.", "text_model."
  state = {"logit_scale": p["logit_scale"].reshape(())}

  def blocks(prefix, tree, layers):
    for i in range(layers):
      layer = {k: v[i] if not isinstance(v, dict) else {n: a[i] for n, a in v.items()}
               for k, v in tree.items()}
      W = layer["query_kernel"].shape[0]
      put = lambda name, w, b, i=i: state.update({f"{prefix}{i}.{name}.weight": w,
                                                   f"{prefix}{i}.{name}.bias": b})
      for name, ln in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2")):
        put(name, layer[ln]["scale"], layer[ln]["bias"])
      for name in ("query", "key", "value"):
        put(f"self_attn.{name[0]}_proj", layer[f"{name}_kernel"].reshape(W, W).T,
            layer[f"{name}_bias"].reshape(W))
      put("self_attn.out_proj", layer["out_kernel"].reshape(W, W).T, layer["out_bias"])
      put("mlp.fc1", layer["fc_kernel"].T, layer["fc_bias"])
      put("mlp.fc2", layer["proj_kernel"].T, layer["proj_bias"])

  v, t = p["visual"], p["text"]
  state[vis + "embeddings.patch_embedding.weight"] = v["patch_kernel"].transpose(3, 2, 0, 1)
  state[vis + "embeddings.class_embedding"] = v["class_embedding"]
  state[vis + "embeddings.position_embedding.weight"] = v["positional_embedding"]
  for name, key in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
    state[vis + name + ".weight"], state[vis + name + ".bias"] = v[key]["scale"], v[key]["bias"]
  blocks(vis + "encoder.layers.", v["transformer"], cfg.vision_layers)
  state["visual_projection.weight"] = v["proj"].T
  state[txt + "embeddings.token_embedding.weight"] = t["token_embedding"]
  state[txt + "embeddings.position_embedding.weight"] = t["positional_embedding"]
  blocks(txt + "encoder.layers.", t["transformer"], cfg.text_layers)
  state[txt + "final_layer_norm.weight"] = t["ln_final"]["scale"]
  state[txt + "final_layer_norm.bias"] = t["ln_final"]["bias"]
  state["text_projection.weight"] = t["text_projection"].T
  files.makedirs(directory)
  files.write_atomic(os.path.join(directory, HF_WEIGHTS),
                     save({k: np.array(a, order="C") for k, a in state.items()}))
  files.write_atomic(os.path.join(directory, HF_CONFIG), json.dumps(hf_config(cfg), indent=2))
  files.write_atomic(os.path.join(directory, HF_PREPROCESSOR), json.dumps(
      {"image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
       "size": {"shortest_edge": cfg.image_size},
       "crop_size": {"height": cfg.image_size, "width": cfg.image_size}}, indent=2))
