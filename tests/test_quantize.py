"""Weight-only int8 decoding (cm3jax/sampling/quantize.py): the int8 sampler's logits, greedy
tokens and likelihoods against the float sampler's, its weight bytes, set_params and bad values."""

import os
import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cm3jax
import cm3jax.eval_shapes as eval_shapes_command
from cm3jax.config import ConfigError
from cm3jax.core import model as model_lib
from cm3jax.core import sharding
from cm3jax.core.vocab import Vocab
from cm3jax.data import shapes
from cm3jax.eval import eval_shapes
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import defaults, engine
from tests.helpers import save_untrained, tiny_config


@pytest.fixture(scope="module")
def vocab():
  captions = [shapes.scene("train", i).caption() for i in range(300)]
  return Vocab(train_tokenizer.train(captions, 300), num_sentinels=16, num_image_codes=64)


def model_config(vocab, **overrides):
  fields = dict(vocab_size=vocab.size, num_layers=2, d_model=64, num_heads=4, mlp_dim=128,
                max_seq_len=64, dtype="float32", remat_policy="none")
  return model_lib.ModelConfig(**{**fields, **overrides})


def skewed_params(cfg, seed=0):
  """N(0, 0.1) weights whose output channels (the last axis of every weight a product reads)
  and table rows differ in size by up to 100x: a scale shared across them, or along the wrong
  axis, rounds the small ones away."""
  params = flax.linen.unbox(model_lib.Decoder(cfg).init(
      jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.default_rng(seed)
  out = {}
  for path, p in flat.items():
    w = 0.1 * rng.standard_normal(p.shape).astype(np.float32)
    axis = 0 if path[-1] in ("embed", "pos_embed") else -1
    sizes = 10 ** rng.uniform(-2, 0, p.shape[axis]).astype(np.float32)
    out[path] = jnp.asarray(w * np.expand_dims(sizes, [a for a in range(p.ndim)
                                                       if a != axis % p.ndim]))
  return flax.traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def samplers(vocab):
  cfg = model_config(vocab)
  params = skewed_params(cfg)
  return (engine.Sampler(cfg, params, vocab),
          engine.Sampler(cfg, params, vocab, quantize="int8"))


def int8_weights(params) -> set[str]:
  """The names of the parameters stored as int8."""
  return {"/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
          for path, x in jax.tree_util.tree_leaves_with_path(params) if x.dtype == jnp.int8}


def forward(sampler, tokens):
  return np.asarray(jax.jit(lambda p, t: sampler.model.apply({"params": p}, t))(
      sampler.params, tokens))


def prompts(vocab, count, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(4, vocab.size, rng.integers(3, 12)).astype(np.int32) for _ in range(count)]


def test_int8_logits_are_close_to_the_float_ones(vocab, samplers):
  float_sampler, int8_sampler = samplers
  tokens = np.random.default_rng(1).integers(0, vocab.size, (4, 32)).astype(np.int32)
  want, got = forward(float_sampler, tokens), forward(int8_sampler, tokens)
  error = np.abs(got - want)
  # A scale per output channel and row: mean 0.8% and max 25% of the logits' spread. One
  # scale per tensor: 4.7% and 206%; per input channel (the wrong axis): 2.9% and 163%.
  assert 0 < error.mean() < 0.015 * want.std() and error.max() < 0.6 * want.std()


def test_int8_decodes_with_int8_weights_and_tokens_mostly_equal_the_floats(vocab, samplers):
  float_sampler, int8_sampler = samplers
  weights = {f"layers_{i}/{name}" for i in range(2)
             for name in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/wi", "mlp/wo")}
  assert int8_weights(int8_sampler.params) == weights | {"embed", "pos_embed", "lm_head"}
  assert not int8_weights(float_sampler.params)
  requests = [engine.Request(p, jax.random.PRNGKey(i)) for i, p in enumerate(prompts(vocab, 16))]
  greedy = engine.SamplingConfig(greedy=True)
  want = float_sampler.generate(requests, 8, "image", greedy)
  got = int8_sampler.generate(requests, 8, "image", greedy)
  assert (got[:, 0] == want[:, 0]).mean() >= 0.85 and (got == want).mean() >= 0.7
  # The cached int8 decoding is the int8 model's: its first token is the argmax of the int8
  # full forward over the prompt.
  allowed = engine.allowed_tokens(vocab, "image", vocab.size)
  for request, row in zip(requests, got):
    logits = forward(int8_sampler, request.prompt[None])[0, -1]
    assert row[0] == np.argmax(np.where(allowed, logits, -np.inf))


def test_int8_log_likelihoods_are_the_int8_models_and_close_to_the_floats(vocab, samplers):
  float_sampler, int8_sampler = samplers
  ps, cs = prompts(vocab, 6), prompts(vocab, 6, seed=1)
  want, got = float_sampler.log_likelihood(ps, cs), int8_sampler.log_likelihood(ps, cs)
  assert not np.array_equal(got, want)
  np.testing.assert_allclose(got, want, rtol=0.02)


def test_int8_weights_take_about_half_the_bytes_of_bf16(vocab):
  cfg = model_config(vocab, dtype="bfloat16")
  params = skewed_params(cfg)
  bf16_sampler = engine.Sampler(cfg, params, vocab)
  int8_sampler = engine.Sampler(cfg, params, vocab, quantize="int8")
  bf16, int8 = bf16_sampler.weight_bytes, int8_sampler.weight_bytes
  f32 = engine.Sampler(model_config(vocab), params, vocab).weight_bytes
  assert f32 == 4 * model_lib.num_params(params) and bf16 == f32 // 2
  assert int8 <= 0.55 * bf16
  # bf16 activations: the LM head still gives float32 logits.
  tokens = np.arange(8, dtype=np.int32)[None]
  assert forward(int8_sampler, tokens).dtype == np.float32
  requests = [engine.Request(p, jax.random.PRNGKey(i)) for i, p in enumerate(prompts(vocab, 8))]
  greedy = engine.SamplingConfig(greedy=True)
  got = int8_sampler.generate(requests, 2, "image", greedy)
  assert (got[:, 0] == bf16_sampler.generate(requests, 2, "image", greedy)[:, 0]).mean() >= 0.75


def test_set_params_quantizes_new_params_without_recompiling(vocab):
  cfg = model_config(vocab)
  first, second = skewed_params(cfg, 0), skewed_params(cfg, 1)
  sampler = engine.Sampler(cfg, first, vocab, quantize="int8")
  requests = [engine.Request(p, jax.random.PRNGKey(i)) for i, p in enumerate(prompts(vocab, 4))]
  before = sampler.generate(requests, 6, "text")
  compiled = sampler._generate._cache_size()
  sampler.set_params(second)
  after = sampler.generate(requests, 6, "text")
  fresh = engine.Sampler(cfg, second, vocab, quantize="int8")
  assert sampler._generate._cache_size() == compiled
  np.testing.assert_array_equal(after, fresh.generate(requests, 6, "text"))
  assert not np.array_equal(after, before)
  for a, b in zip(jax.tree.leaves(sampler.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # the fast tier quantizes the common model; this, its other forms
def test_int8_on_a_one_device_mesh_and_models_with_tied_or_narrow_embeddings(vocab):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
  requests = [engine.Request(p, jax.random.PRNGKey(i)) for i, p in enumerate(prompts(vocab, 3))]
  greedy = engine.SamplingConfig(greedy=True)
  for overrides in ({}, {"tie_embeddings": True}, {"word_embed_dim": 32}):
    cfg = model_config(vocab, **overrides)
    params = skewed_params(cfg)
    want = engine.Sampler(cfg, params, vocab, mesh).generate(requests, 4, "image", greedy)
    sampler = engine.Sampler(cfg, params, vocab, mesh, quantize="int8")
    got = sampler.generate(requests, 4, "image", greedy)
    assert (got[:, 0] == want[:, 0]).mean() >= 2 / 3
    # Tied, the table is the head too and stays float; narrow, the projections stay float.
    assert ("embed" in int8_weights(sampler.params)) == (not cfg.tie_embeddings)
    assert "layers_0/mlp/wi" in int8_weights(sampler.params)
    assert not {"project_in", "project_out"} & int8_weights(sampler.params)


def test_a_bad_quantize_value_is_refused_in_one_line(vocab, tmp_path):
  cfg = model_config(vocab)
  with pytest.raises(ConfigError, match=r"quantize='int4' is not one of \['none', 'int8'\]"):
    engine.Sampler(cfg, skewed_params(cfg), vocab, quantize="int4")
  with pytest.raises(ConfigError, match="'int4' is not one of"):  # before reading the workdir
    cm3jax.load(str(tmp_path / "missing"), quantize="int4")
  flags = types.SimpleNamespace(workdir=str(tmp_path), num_examples=1, batch_size=1, baseline="",
                                tasks=["vqa"], quantize="int8")
  with pytest.raises(ConfigError, match="--quantize scores text->image and captions, not --tasks"):
    eval_shapes_command.main(flags)


def test_load_gives_an_int8_sampler(vocab, tmp_path):
  from cm3jax.training import trainer
  workdir = str(tmp_path / "run")
  config = tiny_config(**{"model.vocab_size": vocab.size})
  save_untrained(workdir, config, {"model": model_lib.ModelConfig.architecture()},
                 trainer.setup(config), vocab, randomized=True)
  float_sampler, _, step = engine.load(workdir)
  int8_sampler, _, _ = engine.load(workdir, quantize="int8")
  assert step == 6 and int8_sampler.quantize == "int8" and float_sampler.quantize == "none"
  assert int8_sampler.weight_bytes < 0.3 * float_sampler.weight_bytes  # float32 weights


def test_an_int8_report_goes_beside_the_float_one_and_records_no_defaults(tmp_path, monkeypatch):
  def evaluate(run, split, *args, **kwargs):
    return {"split": split, "step": 6, "examples": 10, "retrieved": 0, "quantize": run.quantize,
            "text_to_image, greedy, no guidance": 0.5, "caption examples": []}

  monkeypatch.setattr(eval_shapes, "evaluate", evaluate)
  run = types.SimpleNamespace(workdir=str(tmp_path), vqgan=object(), memory_bank=None,
                              quantize="int8")
  eval_shapes.report(run, ["validation"], 10)
  assert sorted(os.listdir(tmp_path)) == ["eval_shapes_int8.json", "eval_shapes_int8.md"]
  assert "eval_shapes of step 6, int8 weights, 10 examples" in (
      tmp_path / "eval_shapes_int8.md").read_text()
  run.quantize = "none"
  eval_shapes.report(run, ["validation"], 10)
  assert {"eval_shapes.json", defaults.SAMPLING_DEFAULTS_FILE} < set(os.listdir(tmp_path))
  assert "eval_shapes of step 6, 10 examples" in (tmp_path / "eval_shapes.md").read_text()
