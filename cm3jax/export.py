"""Export a cm3jax checkpoint to PyTorch, and import an OPT checkpoint into cm3jax
(docs/design.md, "Export").

  python -m cm3jax.export --workdir=workdirs/tiny --out=exported/tiny [--dtype=bfloat16]
  python -m cm3jax.export --import_from=exported/tiny --workdir=workdirs/imported \
      --config=configs/tiny.py

The export writes OUT/ as `transformers.OPTForCausalLM.from_pretrained(OUT)` loads it
(config.json, model.safetensors, generation_config.json), OUT/vqgan/ (the image tokenizer in the
taming / Chameleon layout), OUT/tokenizer/ (tokenizer.model and vocab.json, the layout of the
multimodal vocabulary) and OUT/README.md, a model card with a PyTorch sampling snippet. Tensors
are gathered and written one at a time; OUT appears only when complete.

The import reads an OPT checkpoint (config.json and model.safetensors or pytorch_model.bin):
bias-free with non-affine LayerNorms, or a standard OPT whose biases are all 0 and LayerNorm
scales all 1 (anything else is refused), and writes a step-0 cm3jax checkpoint of --config with
the model section taken from the OPT config, ready to train and sample.
"""

import glob
import json
import os
import shutil
import struct
import tempfile
import time
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from absl import flags

from cm3jax import checkpoint, cli, data, faults, sampling, sharding, train, trainer
from cm3jax import model as model_lib
from cm3jax.config import ConfigError, load_config_file
from cm3jax.vqgan import torch_io
from cm3jax.vqgan.tokenizer import ImageTokenizer
from cm3jax.vocab import BOS, EOS, PAD, Vocab

ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
DTYPES = {"float32": (np.float32, "F32"), "bfloat16": (ml_dtypes.bfloat16, "BF16")}
POSITION_OFFSET = 2  # OPT's position table has 2 leading rows that real positions never use.


def opt_config(cfg: model_lib.ModelConfig, dtype: str) -> dict:
  return {
      "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "word_embed_proj_dim": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "ffn_dim": cfg.mlp_dim, "max_position_embeddings": cfg.max_seq_len,
      "activation_function": ACTIVATIONS[cfg.activation], "do_layer_norm_before": True,
      "enable_bias": False, "layer_norm_elementwise_affine": False, "tie_word_embeddings": False,
      "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0, "layerdrop": 0.0,
      "init_std": cfg.init_std, "bos_token_id": BOS, "pad_token_id": PAD, "eos_token_id": EOS,
      "torch_dtype": dtype, "use_cache": True,
  }


def model_config_from_opt(opt: dict) -> dict:
  """The `config.model` fields of an OPT config.json, or a ConfigError naming what cm3jax lacks."""
  if opt.get("model_type") != "opt":
    raise ConfigError(f"unsupported architecture {opt.get('model_type')!r}: cm3jax imports OPT "
                      "(OPTForCausalLM) checkpoints")
  checks = [(opt.get("do_layer_norm_before", True), "post-LayerNorm OPT (do_layer_norm_before=false)"),
            (opt.get("word_embed_proj_dim", opt["hidden_size"]) == opt["hidden_size"],
             "word_embed_proj_dim != hidden_size (project_in / project_out layers)"),
            (not opt.get("_remove_final_layer_norm", False), "no final LayerNorm"),
            (opt.get("activation_function", "relu") in ACTIVATIONS.values(),
             f"activation {opt.get('activation_function')!r}")]
  for ok, what in checks:
    if not ok:
      raise ConfigError(f"unsupported OPT variant: {what}")
  activation = {v: k for k, v in ACTIVATIONS.items()}[opt.get("activation_function", "relu")]
  return dict(vocab_size=opt["vocab_size"], num_layers=opt["num_hidden_layers"],
              d_model=opt["hidden_size"], num_heads=opt["num_attention_heads"],
              mlp_dim=opt["ffn_dim"], max_seq_len=opt["max_position_embeddings"],
              activation=activation)


def _layer(params, cfg: model_lib.ModelConfig, i: int):
  if cfg.scan_layers:
    return jax.tree.map(lambda x: x[i], params["layers"])
  return params[f"layers_{i}"]


def tensors(params, cfg: model_lib.ModelConfig) -> Iterator[tuple[str, tuple, Callable]]:
  """(OPT key, shape, () -> float32 numpy tensor) for every tensor, fetched only when called."""
  D, H, K, F, V = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
  get = lambda f: lambda: np.asarray(jax.device_get(f()), np.float32)
  prefix = "model.decoder."
  yield prefix + "embed_tokens.weight", (V, D), get(lambda: params["embed"])
  yield (prefix + "embed_positions.weight", (cfg.max_seq_len + POSITION_OFFSET, D),
         get(lambda: np.pad(np.asarray(params["pos_embed"], np.float32),
                            ((POSITION_OFFSET, 0), (0, 0)))))
  for i in range(cfg.num_layers):
    layer = lambda i=i: _layer(params, cfg, i)
    key = f"{prefix}layers.{i}."
    for name, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      yield (f"{key}self_attn.{theirs}.weight", (H * K, D),
             get(lambda name=name, layer=layer: layer()["attn"][name].reshape(D, H * K).T))
    yield (f"{key}self_attn.out_proj.weight", (D, H * K),
           get(lambda layer=layer: layer()["attn"]["out"].reshape(H * K, D).T))
    yield f"{key}fc1.weight", (F, D), get(lambda layer=layer: layer()["mlp"]["wi"].T)
    yield f"{key}fc2.weight", (D, F), get(lambda layer=layer: layer()["mlp"]["wo"].T)
  yield "lm_head.weight", (V, D), get(lambda: params["lm_head"].T)


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
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for key, shape, fetch in items:
      tensor = fetch()
      if tensor.shape != tuple(shape):
        raise AssertionError(f"{key}: {tensor.shape} != {shape}")
      f.write(np.ascontiguousarray(tensor.astype(np_dtype)).tobytes())


MODEL_CARD = '''# {name}

A CM3Leon-style causal-masked multimodal model trained with cm3jax, exported to the
`transformers` OPT layout (bias-free, non-affine LayerNorm, {activation}): {layers} layers of
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
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ConfigError(f"{out} exists; choose a new --out (an export never overwrites)")
  step = checkpoint.latest_step(workdir)
  config = checkpoint.saved_config(workdir, step)
  vocab = checkpoint.load_vocab(workdir, step)
  cfg = model_lib.ModelConfig.from_dict(config["model"])
  vocab.check_fits(cfg.vocab_size)
  params = checkpoint.restore_params(workdir, step, sampling.abstract_params(
      cfg, sampling.default_mesh()), host=True)
  vqgan_dir = data.input_paths(config["cm3"], workdir).vqgan_workdir

  os.makedirs(os.path.dirname(out), exist_ok=True)
  _remove_stale_staging(os.path.dirname(out))
  staging = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=STAGING_PREFIX)
  try:
    with open(os.path.join(staging, STAGING_OWNER), "w") as f:
      json.dump(faults.this_process("cm3jax.export"), f)
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(opt_config(cfg, dtype), f, indent=1)
    with open(os.path.join(staging, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": BOS, "eos_token_id": [EOS, vocab.eoss_id], "pad_token_id": PAD},
                f, indent=1)
    write_safetensors(os.path.join(staging, "model.safetensors"), tensors(params, cfg), dtype)
    os.makedirs(os.path.join(staging, "tokenizer"))
    with open(os.path.join(staging, "tokenizer", "tokenizer.model"), "wb") as f:
      f.write(vocab.spm_model)
    vocab.save(os.path.join(staging, "tokenizer", "vocab.json"))
    _export_vqgan(vqgan_dir, os.path.join(staging, "vqgan"))
    with open(os.path.join(staging, "README.md"), "w") as f:
      f.write(MODEL_CARD.format(
          name=os.path.basename(out), activation=ACTIVATIONS[cfg.activation],
          layers=cfg.num_layers, d_model=cfg.d_model, heads=cfg.num_heads,
          params=model_lib.num_params(params), dtype=dtype, step=step, out=out,
          caption="a red circle above a blue square"))
    os.remove(os.path.join(staging, STAGING_OWNER))
    os.rename(staging, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


STAGING_PREFIX, STAGING_OWNER = ".export-", ".owner"
STALE_UNOWNED_S = 3600  # a staging directory with no owner file yet, this old, is abandoned


def _remove_stale_staging(parent: str):
  """Removes the staging directories of exports whose process ended before finishing (a killed
  export leaves the whole weights there)."""
  for staging in glob.glob(os.path.join(parent, STAGING_PREFIX + "*")):
    owner = faults.read_owner(os.path.join(staging, STAGING_OWNER))
    if owner is None or owner == {}:  # written before its owner file: look at its age
      stale = time.time() - os.path.getmtime(staging) > STALE_UNOWNED_S
    else:
      stale = faults.gone(owner)
    if stale:
      shutil.rmtree(staging, ignore_errors=True)
      print(f"removed {staging}, left by an export that did not finish")


def _export_vqgan(vqgan_workdir: str, directory: str):
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  torch_io.export_torch_vqgan(tokenizer.params, tokenizer.cfg, directory)


def read_opt_tensors(directory: str) -> dict[str, np.ndarray]:
  """float32 tensors of model.safetensors or pytorch_model.bin."""
  path = os.path.join(directory, "model.safetensors")
  try:
    if os.path.exists(path):
      from safetensors import safe_open
      with safe_open(path, framework="flax") as f:
        return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}
    path = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(path):
      import torch
      state = torch.load(path, map_location="cpu", weights_only=True)
      return {k: v.float().numpy() for k, v in state.items()}
  except Exception as e:  # safetensors and torch raise their own types for damaged files
    raise ConfigError(f"cannot read {path}: {str(e).strip().splitlines()[0][:200]}") from None
  raise ConfigError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def params_from_opt(tensors: dict[str, np.ndarray], cfg: model_lib.ModelConfig) -> dict:
  """cm3jax parameters (scanned or not, as cfg says); biases must be 0 and LayerNorm scales 1."""
  for key in sorted(tensors):
    if key.endswith(".bias") and np.any(tensors[key] != 0):
      raise ConfigError(f"{key} is not zero: cm3jax's decoder has no biases")
    if "layer_norm" in key and key.endswith(".weight") and np.any(tensors[key] != 1):
      raise ConfigError(f"{key} is not one: cm3jax's LayerNorms have no scale")
  tensors = {k.removeprefix("model."): v for k, v in tensors.items()}
  D, H, K = cfg.d_model, cfg.num_heads, cfg.head_dim

  def take(key, shape):
    if key not in tensors:
      raise ConfigError(f"the checkpoint has no {key}")
    if tensors[key].shape != shape:
      raise ConfigError(f"{key} is {tensors[key].shape}, the config says {shape}")
    return tensors[key]

  embed = take("decoder.embed_tokens.weight", (cfg.vocab_size, D))
  params = {"embed": embed,
            "pos_embed": take("decoder.embed_positions.weight",
                              (cfg.max_seq_len + POSITION_OFFSET, D))[POSITION_OFFSET:],
            "lm_head": (tensors["lm_head.weight"] if "lm_head.weight" in tensors else embed).T}
  for i in range(cfg.num_layers):
    key = f"decoder.layers.{i}."
    proj = lambda name: take(f"{key}self_attn.{name}.weight", (H * K, D)).T.reshape(D, H, K)
    params[f"layers_{i}"] = {
        "attn": {"query": proj("q_proj"), "key": proj("k_proj"), "value": proj("v_proj"),
                 "out": take(f"{key}self_attn.out_proj.weight", (D, H * K)).T.reshape(H, K, D)},
        "mlp": {"wi": take(f"{key}fc1.weight", (cfg.mlp_dim, D)).T,
                "wo": take(f"{key}fc2.weight", (D, cfg.mlp_dim)).T}}
  params = jax.tree.map(np.ascontiguousarray, params)
  return model_lib.stack_layers(params, cfg.num_layers) if cfg.scan_layers else params


def import_opt(source: str, workdir: str, config) -> int:
  """Writes a step-0 checkpoint of `config` (model section from the OPT config) into `workdir`."""
  path = os.path.join(source, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{source} has no config.json")
  try:
    with open(path) as f:
      opt = json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path} is not JSON: {e}") from None
  config = config.copy_and_resolve_references()
  config.model.update(model_config_from_opt(opt))
  vocab = None
  vocab_path = os.path.join(source, "tokenizer", "vocab.json")
  if os.path.exists(vocab_path):
    vocab = Vocab.load(vocab_path)
    vocab.check_fits(config.model.vocab_size, vocab_path)
  s = trainer.setup(config)
  params = params_from_opt(read_opt_tensors(source), s.model_cfg)
  if checkpoint.newest_step(workdir) is not None:
    raise ConfigError(f"{workdir} already holds checkpoints; import into a new --workdir")
  made = not os.path.exists(workdir)
  workdir = checkpoint.prepare_workdir(workdir)
  ckpts = train.checkpoints(workdir, config, vocab)
  try:
    with sharding.use_mesh(s.mesh):
      state = s.init_state(jax.random.PRNGKey(config.seed))
      state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                                                        state.params)))
      ckpts.save(0, state)
      ckpts.wait()
  except BaseException:
    ckpts.close()
    shutil.rmtree(workdir if made else checkpoint.directory(workdir), ignore_errors=True)
    raise
  ckpts.close()
  return model_lib.num_params(params)


def _define_flags():
  flags.DEFINE_string("workdir", None, "A cm3jax.train workdir: exported from, or imported into.")
  flags.DEFINE_string("out", None, "Export: the directory to write (must not exist).")
  flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Export: dtype of the weights.")
  flags.DEFINE_string("import_from", None, "Import: an OPT checkpoint directory.")
  flags.DEFINE_string("config", None, "Import: the cm3jax config whose model section the OPT "
                      "config replaces (configs/*.py).")


def main(FLAGS):
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required")
  if FLAGS.import_from:
    if not FLAGS.config:
      raise ConfigError("--import_from needs --config (e.g. configs/tiny.py)")
    config = load_config_file(FLAGS.config)
    count = import_opt(FLAGS.import_from, FLAGS.workdir, config)
    with open(os.path.join(FLAGS.import_from, "config.json")) as f:
      model = model_config_from_opt(json.load(f))
    overrides = " ".join(f"--config.model.{k}={v}" for k, v in model.items()
                         if config.model[k] != v)
    print(f"imported {count:,} parameters into {FLAGS.workdir} (step 0); train it with\n"
          f"  python -m cm3jax.train --config={FLAGS.config} --workdir={FLAGS.workdir} {overrides}")
  else:
    if not FLAGS.out:
      raise ConfigError("--out is required (or --import_from to import)")
    print(f"exported {FLAGS.workdir} to {export(FLAGS.workdir, FLAGS.out, FLAGS.dtype)}")


if __name__ == "__main__":
  cli.run("export", _define_flags, main)
