"""Export a cm3jax checkpoint to PyTorch, and import an OPT checkpoint into cm3jax
(docs/design.md, "Export").

The library of `python -m cm3jax.export` (cm3jax/export.py)."""

import contextlib
import json
import os
import shutil
import struct
import time
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, files, sharding
from cm3jax.core import model as model_lib
from cm3jax.core.paths import input_paths
from cm3jax.core.vocab import BOS, EOS, PAD, Vocab
from cm3jax.io import fairseq_io, torch_layout
from cm3jax.sampling import engine
from cm3jax.training import faults, train, trainer
from cm3jax.vqgan import torch_io
from cm3jax.vqgan.tokenizer import ImageTokenizer

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16")}


def opt_config(cfg: model_lib.ModelConfig, dtype: str) -> dict:
  """transformers' OPTConfig of `cfg`, or a ConfigError naming the switch OPT lacks."""
  if cfg.positions != "learned":
    raise ConfigError(f"model.positions={cfg.positions!r}: OPT has learned positions only")
  if cfg.scale_embeddings:
    raise ConfigError("model.scale_embeddings=True: OPT does not scale its embeddings")
  torch_layout.layout(cfg, torch_layout.OPT_NAMES)  # refuses what OPT's keys cannot hold
  return {
      "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "word_embed_proj_dim": cfg.embed_dim,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "ffn_dim": cfg.mlp_dim, "max_position_embeddings": cfg.max_seq_len,
      "activation_function": ACTIVATIONS[cfg.activation],
      "do_layer_norm_before": cfg.pre_layer_norm, "enable_bias": cfg.bias,
      "layer_norm_elementwise_affine": cfg.layer_norm_affine,
      "tie_word_embeddings": cfg.tie_embeddings,
      "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
      "init_std": cfg.init_std, "bos_token_id": BOS, "pad_token_id": PAD, "eos_token_id": EOS,
      "torch_dtype": dtype, "use_cache": True,
  }


def model_config_from_opt(opt: dict) -> dict:
  """The `config.model` fields of an OPT config.json (transformers' defaults where it is
  silent), or a ConfigError naming what cm3jax lacks."""
  if opt.get("model_type") != "opt":
    raise ConfigError(f"unsupported architecture {opt.get('model_type')!r}: cm3jax imports OPT "
                      "(OPTForCausalLM) checkpoints")
  pre_layer_norm = opt.get("do_layer_norm_before", True)
  if pre_layer_norm and opt.get("_remove_final_layer_norm", False):
    raise ConfigError("unsupported OPT variant: _remove_final_layer_norm=true (a pre-LayerNorm "
                      "model without its final LayerNorm)")
  activation = opt.get("activation_function", "relu")
  if activation not in ACTIVATIONS.values():
    raise ConfigError(f"unsupported OPT variant: activation {activation!r} (cm3jax has "
                      f"{sorted(ACTIVATIONS.values())})")
  word_embed_dim = opt.get("word_embed_proj_dim", opt["hidden_size"])
  return dict(vocab_size=opt["vocab_size"], num_layers=opt["num_hidden_layers"],
              d_model=opt["hidden_size"], num_heads=opt["num_attention_heads"],
              mlp_dim=opt["ffn_dim"], max_seq_len=opt["max_position_embeddings"],
              activation={v: k for k, v in ACTIVATIONS.items()}[activation],
              bias=opt.get("enable_bias", True),
              layer_norm_affine=opt.get("layer_norm_elementwise_affine", True),
              pre_layer_norm=pre_layer_norm, positions="learned", scale_embeddings=False,
              embed_layer_norm=False, tie_embeddings=opt.get("tie_word_embeddings", True),
              word_embed_dim=0 if word_embed_dim == opt["hidden_size"] else word_embed_dim)


def write_safetensors(path: str, items, dtype: str):
  """A safetensors file written tensor by tensor: the header from the shapes, then each tensor
  fetched, converted and written in turn, so at most one is in host memory."""
  np_dtype, st_dtype = DTYPES[dtype]
  items = list(items)
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, shape, _ in items:
    size = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
    header[key] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with files.open_file(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for key, shape, fetch in items:
      tensor = fetch()
      if tensor.shape != tuple(shape):
        raise AssertionError(f"{key}: {tensor.shape} != {shape}")
      f.write(np.ascontiguousarray(tensor.astype(np_dtype)).tobytes())


MODEL_CARD = '''# {name}

A CM3Leon-style causal-masked multimodal model trained with cm3jax, exported to the
`transformers` OPT layout ({switches}, {activation}): {layers} layers of
width {d_model}, {heads} heads, {params:,} parameters, {dtype}, trained for {step} steps.

- `config.json`, `model.safetensors`: load with `OPTForCausalLM.from_pretrained`.
- `tokenizer/tokenizer.model` (sentencepiece) and `tokenizer/vocab.json`: the vocabulary layout.
  Ids below `text_size` are sentencepiece ids; then `<break>`, `<eoss>`, the sentinels, and
  image code `c` is id `image_offset + c`.
- `vqgan/`: the image tokenizer (taming-transformers / Chameleon layout, safetensors + config).

A document is `</s> caption <break> image codes`. To draw an image, prompt with
`</s> caption <break>` and allow only image codes:

```python
import json, os, torch
import sentencepiece as spm
from transformers import OPTForCausalLM

out = "{out}"
layout = json.load(open(os.path.join(out, "tokenizer", "vocab.json")))["layout"]
codes = json.load(open(os.path.join(out, "vqgan", "config.json")))
tokens_per_image = (codes["ddconfig"]["resolution"] // 2 ** (len(codes["ddconfig"]["ch_mult"]) - 1)) ** 2
sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer", "tokenizer.model"))
model = OPTForCausalLM.from_pretrained(out).eval()
prompt = torch.tensor([[2] + sp.encode("{caption}") + [layout["break"]]])
first = layout["image_offset"]
others = [i for i in range(model.config.vocab_size) if not first <= i < first + codes["n_embed"]]
with torch.no_grad():
  generated = model.generate(prompt, do_sample=True, top_p=0.9, max_new_tokens=tokens_per_image,
                             min_new_tokens=tokens_per_image, suppress_tokens=others)
image_codes = generated[0, prompt.shape[1]:] - first  # decode these with the VQGAN in vqgan/
print(image_codes.tolist())
```
'''


def export(workdir: str, out: str, dtype: str = "float32") -> str:
  """Writes the export of the latest checkpoint in `workdir` to `out` (which must not exist)."""
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not one of {list(DTYPES)}")
  out = files.absolute(out)
  if files.exists(out):
    raise ConfigError(f"{out} exists; choose a new --out (an export never overwrites)")
  step = checkpoint.latest_step(workdir)
  config = checkpoint.saved_config(workdir, step)
  vocab = checkpoint.load_vocab(workdir, step)
  cfg = model_lib.ModelConfig.from_dict(config["model"])
  vocab.check_fits(cfg.vocab_size)
  hf_config = opt_config(cfg, dtype)
  params = checkpoint.restore_params(workdir, step, engine.abstract_params(
      cfg, engine.default_mesh()), host=True)
  vqgan_dir = input_paths(config["cm3"], workdir).vqgan_workdir

  files.makedirs(os.path.dirname(out))
  if not files.is_uri(out):  # a URI's staging directory is a local temporary one
    _remove_stale_staging(os.path.dirname(out))
  with files.staged_directory(out, STAGING_PREFIX) as staging:
    files.write_json(os.path.join(staging, STAGING_OWNER), faults.this_process("cm3jax.export"))
    files.write_json(os.path.join(staging, "config.json"), hf_config)
    files.write_json(os.path.join(staging, "generation_config.json"), {
        "bos_token_id": BOS, "eos_token_id": [EOS, vocab.eoss_id], "pad_token_id": PAD})
    write_safetensors(os.path.join(staging, "model.safetensors"),
                      torch_layout.tensors(params, cfg, torch_layout.OPT_NAMES), dtype)
    files.write_atomic(os.path.join(staging, "tokenizer", "tokenizer.model"), vocab.spm_model)
    vocab.save(os.path.join(staging, "tokenizer", "vocab.json"))
    _export_vqgan(vqgan_dir, os.path.join(staging, "vqgan"))
    files.write_atomic(os.path.join(staging, "README.md"), MODEL_CARD.format(
        name=os.path.basename(out), activation=ACTIVATIONS[cfg.activation],
        switches=_describe(cfg),
        layers=cfg.num_layers, d_model=cfg.d_model, heads=cfg.num_heads,
        params=model_lib.num_params(params), dtype=dtype, step=step, out=out,
        caption="a red circle above a blue square"))
    files.remove(os.path.join(staging, STAGING_OWNER))
  return out


def _describe(cfg: model_lib.ModelConfig) -> str:
  return ", ".join([
      "biases" if cfg.bias else "bias-free",
      "affine LayerNorm" if cfg.layer_norm_affine else "non-affine LayerNorm",
      "pre-LayerNorm" if cfg.pre_layer_norm else "post-LayerNorm",
      *(["tied embeddings"] if cfg.tie_embeddings else []),
      *([f"{cfg.embed_dim}-wide word embeddings"] if cfg.word_embed_dim else [])])


STAGING_PREFIX, STAGING_OWNER = ".export-", ".owner"
STALE_UNOWNED_S = 3600  # a staging directory with no owner file yet, this old, is abandoned


def _remove_stale_staging(parent: str):
  """Removes the staging directories of exports whose process ended before finishing (a killed
  export leaves the whole weights there)."""
  for staging in files.glob(os.path.join(parent, STAGING_PREFIX + "*")):
    owner = faults.read_owner(os.path.join(staging, STAGING_OWNER))
    if owner is None or owner == {}:  # written before its owner file: look at its age
      age_s = time.time() - os.path.getmtime(staging)  # local file: staging directory
      stale = age_s > STALE_UNOWNED_S
    else:
      stale = faults.gone(owner)
    if stale:
      shutil.rmtree(staging, ignore_errors=True)  # local file: staging directory
      print(f"removed {staging}, left by an export that did not finish")


def _export_vqgan(vqgan_workdir: str, directory: str):
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  torch_io.export_torch_vqgan(tokenizer.params, tokenizer.cfg, directory)


@contextlib.contextmanager
def opt_tensors(directory: str) -> Iterator[tuple[set[str], Callable[[str], np.ndarray]]]:
  """The keys of model.safetensors or pytorch_model.bin and a reader of one tensor as float32;
  both formats are mapped, not loaded, so only the tensors read are in memory."""
  path = os.path.join(directory, "model.safetensors")
  if files.exists(path):
    from safetensors import safe_open
    try:
      f = safe_open(path, framework="flax")
      keys = set(f.keys())
    except Exception as e:
      raise torch_layout.unreadable(path, e) from None

    def get(key):
      try:
        return np.asarray(f.get_tensor(key), np.float32)
      except Exception as e:
        raise torch_layout.unreadable(path, e) from None
    yield keys, get
    return
  path = os.path.join(directory, "pytorch_model.bin")
  if not files.exists(path):
    raise ConfigError(f"{directory} has neither model.safetensors nor pytorch_model.bin")
  state = torch_layout.torch_state(path)
  yield set(state), lambda key: state[key].float().numpy()


def write_imported(workdir: str, config, vocab: Vocab | None,
                   load_params: Callable[[dict, Callable], dict]) -> int:
  """Writes a step-0 checkpoint of `config` into a new `workdir` whose parameters are
  `load_params(shapes, place)`: the tree of parameter shapes, and `place(path, leaf)`, which
  puts one leaf on the devices (see torch_layout.params_from_tensors). Returns the parameter
  count; on any failure nothing is left behind."""
  s = trainer.setup(config)
  if checkpoint.newest_step(workdir) is not None:
    raise ConfigError(f"{workdir} already holds checkpoints; import into a new --workdir")
  made = not files.exists(workdir)
  workdir = checkpoint.prepare_workdir(workdir)
  ckpts = train.checkpoints(workdir, config, vocab)
  try:
    with sharding.use_mesh(s.mesh):
      state = s.init_state(jax.random.PRNGKey(config.seed))
      shardings = jax.tree.map(lambda x: x.sharding, state.params)
      shapes = jax.tree.map(lambda x: x.shape, state.params)

      def place(path, leaf):
        target = shardings
        for k in path:
          target = target[k]
        return jax.device_put(leaf, target)

      params = load_params(shapes, place)
      if jax.tree.structure(params) != jax.tree.structure(state.params):
        raise AssertionError(f"the layout builds {jax.tree.structure(params)}, the model has "
                             f"{jax.tree.structure(state.params)}")
      state = state.replace(params=params)
      ckpts.save(0, state)
      ckpts.wait()
  except BaseException:
    ckpts.close()
    with contextlib.suppress(OSError):
      files.rmtree(workdir if made else checkpoint.directory(workdir))
    raise
  ckpts.close()
  return model_lib.num_params(params)


def _read_json(path: str) -> dict:
  try:
    return files.read_json(path)
  except ValueError as e:
    raise ConfigError(f"{path} is not JSON: {e}") from None


def imported_config(config, model: dict, overrides: dict | None = None):
  """`config` with the checkpoint's architecture `model` (config.model fields) and its context:
  seq_len lowered to the checkpoint's positions where the config's exceeds them. `overrides`,
  the --config.FIELD values given on the command line, may not contradict the checkpoint: one
  that does is a ConfigError naming it."""
  overrides = overrides or {}
  for field, value in overrides.items():
    name = field.removeprefix("model.")
    if field != name and name in model and value != model[name]:
      raise ConfigError(f"--config.{field}={value}: the checkpoint has {name}={model[name]} (an "
                        "import takes the architecture from the checkpoint)")
  context = model["max_seq_len"]
  if overrides.get("seq_len", 0) > context:
    raise ConfigError(f"--config.seq_len={overrides['seq_len']} exceeds the checkpoint's "
                      f"{context} positions")
  config = config.copy_and_resolve_references()
  config.model.update(model)
  config.seq_len = min(config.seq_len, context)
  return config


def import_opt(source: str, workdir: str, config, overrides: dict | None = None):
  """Writes a step-0 checkpoint of `config` (model section and context from the OPT config; see
  `imported_config` for `overrides`) into `workdir`: (parameters, the config written)."""
  path = os.path.join(source, "config.json")
  if not files.exists(path):
    raise ConfigError(f"{source} has no config.json")
  config = imported_config(config, model_config_from_opt(_read_json(path)), overrides)
  vocab = None
  vocab_path = os.path.join(source, "tokenizer", "vocab.json")
  if files.exists(vocab_path):
    vocab = Vocab.load(vocab_path)
    vocab.check_fits(config.model.vocab_size, vocab_path)
  cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
  with opt_tensors(source) as (keys, get):
    return write_imported(workdir, config, vocab, lambda shapes, place: (
        torch_layout.params_from_tensors(keys, get, cfg, torch_layout.OPT_NAMES, shapes,
                                         place))), config


def import_cm3(path: str, dict_path: str, spm_path: str, workdir: str, config,
               image_token: str = fairseq_io.DEFAULT_IMAGE_TOKEN,
               sentinel_token: str = fairseq_io.DEFAULT_SENTINEL_TOKEN,
               overrides: dict | None = None):
  """Writes a step-0 checkpoint of `config` (model section and context from the fairseq
  checkpoint, vocabulary from the dictionary and sentencepiece model; see `imported_config` for
  `overrides`) into `workdir`: (parameters, vocabulary ids without a fairseq row, the config
  written)."""
  model, vocab, rows, keys, get = fairseq_io.import_fairseq(path, dict_path, spm_path,
                                                           image_token, sentinel_token)
  config = imported_config(config, model, overrides)
  cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
  count = write_imported(workdir, config, vocab, lambda shapes, place: (
      torch_layout.params_from_tensors(keys, get, cfg, torch_layout.FAIRSEQ_NAMES, shapes, place)))
  return count, fairseq_io.missing_rows(rows, vocab), config
