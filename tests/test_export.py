"""Export to transformers' OPTForCausalLM and import back, checked against transformers."""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, sharding
from cm3jax.core import model as model_lib
from cm3jax.core.vocab import EOS, PAD, Vocab
from cm3jax.data import shapes
from cm3jax.io import export
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import engine
from cm3jax.training import train, trainer
from tests.helpers import nontrivial, tiny_config


@pytest.fixture(scope="module")
def vocab():
  captions = [shapes.scene("train", i).caption() for i in range(1000)]
  return Vocab(train_tokenizer.train(captions, 300), num_sentinels=16, num_image_codes=64)


def make_workdir(path, vocab, vqgan_workdir, **model):
  """A cm3jax checkpoint with random non-trivial weights, its vocabulary and VQGAN."""
  model = {"max_seq_len": 96, **model}
  config = tiny_config(data="cm3", **{"cm3.vqgan_workdir": vqgan_workdir,
                                      "model.vocab_size": vocab.size,
                                      **{f"model.{k}": v for k, v in model.items()}})
  s = trainer.setup(config)
  ckpts = train.checkpoints(str(path), config, vocab)
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    params = nontrivial(jax.device_get(state.params), seed=3)
    state = state.replace(params=jax.device_put(params, jax.tree.map(lambda x: x.sharding,
                                                                      state.params)))
    ckpts.save(7, state)
    ckpts.wait()
  ckpts.close()
  return s.model_cfg, params


def jax_logits(cfg, params, tokens):
  return np.asarray(jax.jit(model_lib.Decoder(cfg).apply)({"params": params}, jnp.asarray(tokens)))


def assert_equals_transformers(hf, cfg, params, vocab):
  """cm3jax's logits equal `hf`'s to 1e-4, unpadded and on a left-padded batch, and 32 greedy
  text tokens (stopping at </s> or <eoss>) from cm3jax's sampler equal `generate`'s."""
  tokens = np.random.default_rng(0).integers(0, vocab.size, (3, 20))
  with torch.no_grad():
    got = hf(torch.from_numpy(tokens)).logits.numpy()
  np.testing.assert_allclose(got, jax_logits(cfg, params, tokens), atol=1e-4, rtol=0)
  lengths = [20, 13, 6]  # left-padded: real positions start at 0 in both
  padded, mask = np.full((3, 20), PAD), np.zeros((3, 20), int)
  for b, n in enumerate(lengths):
    padded[b, 20 - n:], mask[b, 20 - n:] = tokens[b, :n], 1
  with torch.no_grad():
    got = hf(torch.from_numpy(padded), attention_mask=torch.from_numpy(mask)).logits.numpy()
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(got[b, 20 - n:], jax_logits(cfg, params, tokens[b:b + 1, :n])[0],
                               atol=1e-4, rtol=0)

  prompts = [vocab.encode_document([c]) for c in ("a red circle", "a small blue square above")]
  ours = engine.Sampler(cfg, params, vocab).generate(
      [engine.Request(p, jax.random.PRNGKey(0)) for p in prompts], 32, "text",
      engine.SamplingConfig(greedy=True))
  allowed = engine.allowed_tokens(vocab, "text", cfg.vocab_size)
  for p, row in zip(prompts, ours):
    with torch.no_grad():
      theirs = hf.generate(torch.from_numpy(p[None].astype(np.int64)), do_sample=False,
                           max_new_tokens=32, eos_token_id=[EOS, vocab.eoss_id], pad_token_id=PAD,
                           suppress_tokens=np.flatnonzero(~allowed).tolist())[0, len(p):].numpy()
    theirs = np.pad(theirs, (0, 32 - len(theirs)), constant_values=PAD)
    np.testing.assert_array_equal(theirs, row)


@pytest.mark.parametrize("activation, scan", [  # gelu: only the activation's name differs
    ("relu", True), pytest.param("gelu", True, marks=pytest.mark.slow), ("gelu_tanh", False)])
def test_transformers_logits_and_greedy_tokens_equal_cm3jax(activation, scan, vocab,
                                                            vqgan_workdir, tmp_path):
  cfg, params = make_workdir(tmp_path / "run", vocab, vqgan_workdir, activation=activation,
                             scan_layers=scan)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  hf = transformers.OPTForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert_equals_transformers(hf, cfg, params, vocab)


@pytest.mark.parametrize("dtype, saved_as", [("float32", "model.safetensors"),
                                             ("bfloat16", "pytorch_model.bin")])
def test_jax_to_pytorch_to_jax_through_torch(vocab, vqgan_workdir, tmp_path, dtype, saved_as):
  """The export loaded by transformers, saved by torch (save_pretrained, or its state_dict as
  pytorch_model.bin) and imported: the parameters come back bitwise, rounded to `dtype`."""
  _, params = make_workdir(tmp_path / "run", vocab, vqgan_workdir)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"), dtype=dtype)
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  hf = transformers.OPTForCausalLM.from_pretrained(out, dtype=torch_dtype)
  saved = tmp_path / "torch"
  if saved_as == "model.safetensors":
    hf.save_pretrained(saved)
  else:
    saved.mkdir()
    torch.save(hf.state_dict(), saved / "pytorch_model.bin")
    shutil.copy(os.path.join(out, "config.json"), saved)
  assert sorted(f for f in os.listdir(saved) if f.startswith(("model", "pytorch"))) == [saved_as]
  shutil.copytree(os.path.join(out, "tokenizer"), saved / "tokenizer")
  export.import_opt(str(saved), str(tmp_path / "back"), tiny_config(data="cm3"))
  step = checkpoint.latest_step(str(tmp_path / "back"))
  config = checkpoint.saved_config(str(tmp_path / "back"), step)
  cfg = model_lib.ModelConfig.from_dict(config["model"])
  again = checkpoint.restore_params(str(tmp_path / "back"), step,
                                    engine.abstract_params(cfg, engine.default_mesh()))
  rounded = jax.tree.map(lambda p: np.asarray(jnp.asarray(p).astype(dtype), np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), rounded)
  assert checkpoint.load_vocab(str(tmp_path / "back"), step) == vocab


def test_bfloat16_export(vocab, vqgan_workdir, tmp_path):
  cfg, params = make_workdir(tmp_path / "run", vocab, vqgan_workdir)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"), dtype="bfloat16")
  header_size = int.from_bytes(open(os.path.join(out, "model.safetensors"), "rb").read(8), "little")
  header = json.loads(open(os.path.join(out, "model.safetensors"), "rb").read(8 + header_size)[8:])
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
  hf = transformers.OPTForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
  assert hf.lm_head.weight.dtype == torch.bfloat16
  np.testing.assert_array_equal(hf.lm_head.weight.detach().float().numpy(),
                                np.asarray(params["lm_head"].T.astype(jnp.bfloat16), np.float32))


def test_exported_vqgan_decodes_the_same_pixels_in_pytorch(vocab, vqgan_workdir, tmp_path):
  from cm3jax.vqgan.model import VQGANConfig
  from cm3jax.vqgan.tokenizer import ImageTokenizer
  from tests import torch_vqgan
  make_workdir(tmp_path / "run", vocab, vqgan_workdir)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  saved = json.load(open(os.path.join(out, "vqgan", "config.json")))
  cfg = VQGANConfig.from_dict(saved["cm3jax"])
  reference = torch_vqgan.VQModel(cfg).eval()
  from safetensors.torch import load_file
  reference.load_state_dict(load_file(os.path.join(out, "vqgan", "model.safetensors")))
  codes = np.random.default_rng(0).integers(0, cfg.n_embed, (2, cfg.tokens_per_image))
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  flax_images = tokenizer._decode(tokenizer.params, jnp.asarray(tokenizer._padded(codes)))[:2]
  with torch.no_grad():
    torch_images = reference.decode_code(torch.from_numpy(codes), cfg.latent_size)
  np.testing.assert_allclose(np.asarray(flax_images), torch_images.permute(0, 2, 3, 1).numpy(),
                             atol=1e-4, rtol=0)


def test_model_card_snippet_samples(vocab, vqgan_workdir, tmp_path, capsys):
  make_workdir(tmp_path / "run", vocab, vqgan_workdir)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  card = open(os.path.join(out, "README.md")).read()
  snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
  exec(compile(snippet, "README.md", "exec"), {})
  codes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert len(codes) == 16 and all(0 <= c < 64 for c in codes)  # 4x4 codes of 64


def _random_opt(tmp_path, vocab, **overrides):
  """A transformers OPT with every parameter random (biases, LayerNorm scales around 1 and
  biases), saved to tmp_path/opt."""
  fields = dict(vocab_size=vocab.size, hidden_size=36, num_hidden_layers=3, ffn_dim=52,
                num_attention_heads=3, max_position_embeddings=64, word_embed_proj_dim=36,
                enable_bias=True, layer_norm_elementwise_affine=True, activation_function="relu",
                pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS)
  config = transformers.OPTConfig(**(fields | overrides))
  torch.manual_seed(0)
  model = transformers.OPTForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "layer_norm.weight" in name else 0.0))
  model.save_pretrained(tmp_path / "opt")
  (tmp_path / "opt" / "tokenizer").mkdir()
  return model


def _imported(workdir):
  step = checkpoint.latest_step(workdir)
  cfg = model_lib.ModelConfig.from_dict(checkpoint.saved_config(workdir, step)["model"])
  params = checkpoint.restore_params(workdir, step,
                                     engine.abstract_params(cfg, engine.default_mesh()))
  return cfg, jax.device_get(params)


OPT_VARIANTS = {
    # every OPT size's form: pre-LN with biases and affines, tied (125m, 1.3b ... 66b)
    "pre_ln_tied_relu": dict(),
    # OPT-350m's form: post-LN, no final LayerNorm, narrower word embeddings
    "post_ln_project_gelu": dict(do_layer_norm_before=False, word_embed_proj_dim=20,
                                 activation_function="gelu"),
    "untied_gelu_new": dict(tie_word_embeddings=False, activation_function="gelu_new"),
}


def import_random_opt(tmp_path, vocab, vqgan_workdir, variant):
  """A random OPT of OPT_VARIANTS[variant] in tmp_path/opt, imported into tmp_path/run: (the
  OPT, the imported model config and parameters)."""
  model = _random_opt(tmp_path, vocab, **OPT_VARIANTS[variant])
  vocab.save(str(tmp_path / "opt" / "tokenizer" / "vocab.json"))
  export.import_opt(str(tmp_path / "opt"), str(tmp_path / "run"),
                    tiny_config(data="cm3", **{"cm3.vqgan_workdir": vqgan_workdir}))
  return model, *_imported(str(tmp_path / "run"))


@pytest.mark.parametrize("variant", [  # untied_gelu_new: the full suite's (the fast tier's time)
    "pre_ln_tied_relu", "post_ln_project_gelu",
    pytest.param("untied_gelu_new", marks=pytest.mark.slow)])
def test_a_real_opt_imports_matches_and_exports_back(variant, vocab, vqgan_workdir, tmp_path):
  """(That the import trains on: tests/jobs/test_export.py.)"""
  model, cfg, params = import_random_opt(tmp_path, vocab, vqgan_workdir, variant)
  assert cfg.bias and cfg.layer_norm_affine
  assert cfg.pre_layer_norm == OPT_VARIANTS[variant].get("do_layer_norm_before", True)
  assert_equals_transformers(model, cfg, params, vocab)

  # It exports back to the same tensors.
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  back = transformers.OPTForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  theirs, again = model.state_dict(), back.state_dict()
  assert sorted(again) == sorted(theirs)
  for key in theirs:  # the position table's two leading rows are never read, and come back 0
    unused = 2 if key.endswith("embed_positions.weight") else 0
    np.testing.assert_array_equal(again[key].numpy()[unused:], theirs[key].numpy()[unused:],
                                  err_msg=key)


def test_the_default_switches_export_a_bias_free_opt(vocab, vqgan_workdir, tmp_path):
  make_workdir(tmp_path / "run", vocab, vqgan_workdir)
  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert (config["enable_bias"], config["layer_norm_elementwise_affine"],
          config["tie_word_embeddings"], config["do_layer_norm_before"]) == (False, False, False,
                                                                            True)
  from safetensors import safe_open
  with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
    assert not [k for k in f.keys() if k.endswith(".bias") or "layer_norm" in k]


@pytest.mark.parametrize("change, message", [
    (dict(_remove_final_layer_norm=True), "unsupported OPT variant: _remove_final_layer_norm"),
    (dict(activation_function="silu"), "unsupported OPT variant: activation 'silu'"),
])
def test_import_refuses_what_cm3jax_cannot_represent(vocab, tmp_path, change, message):
  _random_opt(tmp_path, vocab, num_hidden_layers=1, **change)
  with pytest.raises(ConfigError, match=re.escape(message)):
    export.import_opt(str(tmp_path / "opt"), str(tmp_path / "run"), tiny_config())
  assert not os.path.exists(tmp_path / "run")


def test_import_refuses_tensors_that_disagree_with_the_config(vocab, tmp_path):
  _random_opt(tmp_path, vocab, num_hidden_layers=1)
  path = tmp_path / "opt" / "config.json"
  good = json.loads(path.read_text())
  cases = [(dict(enable_bias=False), "holds model.decoder.layers.0.fc1.bias, which this "
            "configuration has no place for (6 such tensors)"),
           (dict(ffn_dim=40), "model.decoder.layers.0.fc1.weight is (52, 36), the config says "
            "(40, 36)"),
           (dict(num_hidden_layers=2), "the checkpoint has no model.decoder.layers.1.")]
  for i, (change, message) in enumerate(cases):
    path.write_text(json.dumps(good | change))
    with pytest.raises(ConfigError, match=re.escape(message)):
      export.import_opt(str(tmp_path / "opt"), str(tmp_path / f"run{i}"), tiny_config())
    assert not os.path.exists(tmp_path / f"run{i}")


def test_an_import_takes_the_checkpoints_context(vocab, tmp_path):
  """A config whose rows are longer than the OPT's 64 positions imports with rows of 64; an
  explicit --config.seq_len beyond them is refused."""
  _random_opt(tmp_path, vocab, num_hidden_layers=1)
  config = tiny_config(seq_len=128, **{"model.max_seq_len": 128})
  with pytest.raises(ConfigError, match=re.escape(
      "--config.seq_len=128 exceeds the checkpoint's 64 positions")):
    export.import_opt(str(tmp_path / "opt"), str(tmp_path / "refused"), config, {"seq_len": 128})
  assert not os.path.exists(tmp_path / "refused")
  _, written = export.import_opt(str(tmp_path / "opt"), str(tmp_path / "run"), config)
  assert (written.seq_len, written.model.max_seq_len) == (64, 64)
  assert checkpoint.saved_config(str(tmp_path / "run"), 0)["seq_len"] == 64


@pytest.mark.parametrize("switch, message", [
    (dict(positions="sinusoidal"), "model.positions='sinusoidal': OPT has learned positions only"),
    (dict(scale_embeddings=True), "model.scale_embeddings=True: OPT does not scale"),
    (dict(embed_layer_norm=True), "model.embed_layer_norm=True: an OPT decoder has no LayerNorm"),
])
def test_export_refuses_switches_opt_lacks(switch, message, vocab, vqgan_workdir, tmp_path):
  make_workdir(tmp_path / "run", vocab, vqgan_workdir, **switch)
  with pytest.raises(ConfigError, match=re.escape(message)):
    export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_bad_inputs(vocab, vqgan_workdir, tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="no checkpoints in"):
    export.export(str(tmp_path / "empty"), str(tmp_path / "out"))
  make_workdir(tmp_path / "run", vocab, vqgan_workdir)
  (tmp_path / "exists").mkdir()
  with pytest.raises(ConfigError, match="exists; choose a new --out"):
    export.export(str(tmp_path / "run"), str(tmp_path / "exists"))
  with pytest.raises(ConfigError, match="--dtype='float8' is not one of"):
    export.export(str(tmp_path / "run"), str(tmp_path / "out"), "float8")

  def broken(*args):
    raise OSError("disk full")
  monkeypatch.setattr(export, "write_safetensors", broken)
  with pytest.raises(OSError, match="disk full"):
    export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out") and not glob.glob(str(tmp_path / ".export-*"))
  monkeypatch.undo()

  out = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
  with pytest.raises(ConfigError, match="has no config.json"):
    export.import_opt(str(tmp_path), str(tmp_path / "i1"), tiny_config())
  gpt2 = tmp_path / "gpt2"
  gpt2.mkdir()
  (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 32}))
  with pytest.raises(ConfigError, match="unsupported architecture 'gpt2'"):
    export.import_opt(str(gpt2), str(tmp_path / "i2"), tiny_config())
  big = Vocab(vocab.spm_model, 16, 4096)  # more ids than the model has
  big.save(os.path.join(out, "tokenizer", "vocab.json"))
  with pytest.raises(ConfigError, match=r"model.vocab_size=384 is smaller than .*vocab.json \(4480 ids"):
    export.import_opt(out, str(tmp_path / "i3"), tiny_config())
  vocab.save(os.path.join(out, "tokenizer", "vocab.json"))
  os.remove(os.path.join(out, "model.safetensors"))
  with pytest.raises(ConfigError, match="has neither model.safetensors nor pytorch_model.bin"):
    export.import_opt(out, str(tmp_path / "i4"), tiny_config())
