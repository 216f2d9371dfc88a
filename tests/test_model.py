import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.core import model as model_lib
from tests.helpers import nontrivial

CFG = dict(vocab_size=96, num_layers=3, d_model=32, num_heads=4, mlp_dim=64, max_seq_len=16,
           dtype="float32", remat_policy="none")


def make(**overrides):
  cfg = model_lib.ModelConfig(**{**CFG, **overrides})
  return cfg, model_lib.Decoder(cfg)


def init(model, seed=0, length=16):
  return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, length), jnp.int32))["params"]


def tokens(shape, seed=0, vocab=CFG["vocab_size"]):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, vocab)


def test_output_shape_and_dtype():
  _, model = make(dtype="bfloat16")
  params = flax.linen.unbox(init(model))
  logits = model.apply({"params": params}, tokens((2, 16)))
  assert logits.shape == (2, 16, 96)
  assert logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_parameters_are_exactly_the_bias_free_layout():
  cfg, model = make()
  params = flax.linen.unbox(init(model))
  shapes = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  L, D, H, K, F, V = 3, 32, 4, 8, 64, 96
  assert shapes == {
      "embed": (V, D), "pos_embed": (16, D), "lm_head": (D, V),
      "layers/attn/query": (L, D, H, K), "layers/attn/key": (L, D, H, K),
      "layers/attn/value": (L, D, H, K), "layers/attn/out": (L, H, K, D),
      "layers/mlp/wi": (L, D, F), "layers/mlp/wo": (L, F, D),
  }
  assert not any("bias" in k or "scale" in k or "norm" in k for k in shapes)


def test_parameters_carry_logical_axis_names():
  _, model = make()
  boxed = init(model)
  specs = flax.traverse_util.flatten_dict(flax.linen.get_partition_spec(boxed))
  assert tuple(specs[("layers", "attn", "query")]) == ("layers", "embed", "heads", "kv")
  assert tuple(specs[("layers", "mlp", "wo")]) == ("layers", "mlp", "embed")
  assert tuple(specs[("embed",)]) == ("vocab", "embed")
  assert tuple(specs[("lm_head",)]) == ("embed", "vocab")


def test_init_statistics():
  _, model = make(vocab_size=4096, d_model=256, num_heads=4, mlp_dim=1024, max_seq_len=512)
  params = flax.linen.unbox(init(model, length=8))
  # std of N(0, s) cut at 3s is 0.9866 s.
  for w in (params["embed"], params["layers"]["attn"]["query"], params["layers"]["mlp"]["wi"]):
    w = np.asarray(w)
    assert abs(w.std() - 0.006 * 0.9866) < 0.0001
    assert abs(w.mean()) < 0.0001
    assert np.abs(w).max() <= 3 * 0.006 + 1e-7
  pos = np.asarray(params["pos_embed"])
  assert abs(pos.std() - 0.0002 * 0.9866) < 0.00001
  assert np.abs(pos).max() <= 3 * 0.0002 + 1e-8
  for w in (params["lm_head"], params["layers"]["attn"]["out"], params["layers"]["mlp"]["wo"]):
    assert not np.any(np.asarray(w))


def test_zero_init_residual_switch_off_gives_random_output_projections():
  _, model = make(zero_init_residual=False)
  params = flax.linen.unbox(init(model))
  for w in (params["layers"]["attn"]["out"], params["layers"]["mlp"]["wo"]):
    assert abs(float(np.asarray(w).std()) - 0.006 * 0.9866) < 0.0005
  assert not np.any(np.asarray(params["lm_head"]))


def test_causality():
  _, model = make()
  params = nontrivial(flax.linen.unbox(init(model)))
  x = tokens((2, 16))
  base = model.apply({"params": params}, x)
  for t in (0, 5, 15):
    changed = x.at[:, t:].set((x[:, t:] + 7) % 96)
    out = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
    assert not np.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("remat_policy", ["none", "nothing_saveable"])
def test_scanned_equals_unrolled(remat_policy):
  cfg, scanned = make(remat_policy=remat_policy)
  _, unrolled = make(remat_policy=remat_policy, scan_layers=False)
  params = nontrivial(flax.linen.unbox(init(scanned)))
  per_layer = model_lib.unstack_layers(params, cfg.num_layers)
  assert jax.tree.structure(per_layer) == jax.tree.structure(flax.linen.unbox(init(unrolled)))
  x = tokens((2, 16))
  np.testing.assert_allclose(scanned.apply({"params": params}, x),
                             unrolled.apply({"params": per_layer}, x), atol=1e-5, rtol=1e-5)
  restacked = model_lib.stack_layers(per_layer, cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, restacked, params)


def test_remat_changes_memory_not_gradients():
  _, plain = make()
  _, remat = make(remat_policy="nothing_saveable")
  params = nontrivial(flax.linen.unbox(init(plain)))
  x = tokens((2, 16))

  def grads(model):
    return jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(params)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(plain), grads(remat))


def test_activation_is_used():
  outs = {}
  for act in model_lib.ACTIVATIONS:
    _, model = make(activation=act)
    params = nontrivial(flax.linen.unbox(init(model)))
    outs[act] = np.asarray(model.apply({"params": params}, tokens((1, 16))))
  assert not np.allclose(outs["relu"], outs["gelu"])
  assert not np.allclose(outs["gelu"], outs["gelu_tanh"], atol=1e-6)


@pytest.mark.parametrize("activation", list(model_lib.ACTIVATIONS))
def test_mlp_saves_only_the_pre_activation_and_its_output_for_backward(activation):
  # Autodiff alone would also keep the activation's intermediates (the erf term of exact GELU,
  # five arrays for tanh GELU): each one more [B, L, F] write and read per layer.
  cfg, _ = make(activation=activation)
  mlp = model_lib.Mlp(cfg)
  x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (2, 16, cfg.d_model))
  params = mlp.init(jax.random.PRNGKey(1), x_BxLxD)
  _, backward = jax.vjp(lambda p: mlp.apply(p, x_BxLxD), params)
  saved = [a for a in jax.tree.leaves(backward) if a.shape == (2, 16, cfg.mlp_dim)]
  assert len(saved) == 2


def test_explicit_positions_match_default():
  _, model = make()
  params = nontrivial(flax.linen.unbox(init(model)))
  x = tokens((2, 8))
  default = model.apply({"params": params}, x)
  explicit = model.apply({"params": params}, x, jnp.broadcast_to(jnp.arange(8), (2, 8)))
  np.testing.assert_array_equal(default, explicit)
  shifted = model.apply({"params": params}, x, jnp.broadcast_to(jnp.arange(8) + 3, (2, 8)))
  assert not np.allclose(default, shifted)


def test_segments_keep_attention_inside_packed_documents():
  _, model = make()
  params = nontrivial(flax.linen.unbox(init(model)))
  a, b = tokens((1, 6), seed=1), tokens((1, 10), seed=2)
  packed = jnp.concatenate([a, b], 1)
  positions = jnp.concatenate([jnp.arange(6), jnp.arange(10)])[None]
  segments = jnp.concatenate([jnp.zeros(6, int), jnp.ones(10, int)])[None]
  out = model.apply({"params": params}, packed, positions, segments_BxL=segments)
  np.testing.assert_allclose(out[:, :6], model.apply({"params": params}, a), atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[:, 6:], model.apply({"params": params}, b), atol=1e-5, rtol=0)


def test_attention_implementation_on_cpu_is_xla():
  cfg, _ = make(dtype="bfloat16")
  assert cfg.attention_impl() == "xla"
  assert make(attention="cudnn")[0].attention_impl() == "cudnn"


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=5), "model.num_heads=5 does not divide model.d_model=32"),
    (dict(activation="swish"), "model.activation='swish' is not one of"),
    (dict(dtype="float8"), "model.dtype='float8' is not one of"),
    (dict(remat_policy="save_some"), "model.remat_policy='save_some' is not one of"),
    (dict(num_layers=0), "model.num_layers must be a positive integer"),
    (dict(d_model=32.0), "model.d_model must be a positive integer"),
    (dict(positions="rope"), "model.positions='rope' is not one of ['learned', 'sinusoidal']"),
    (dict(bias=1), "model.bias must be True or False, got 1"),
    (dict(word_embed_dim=-4), "model.word_embed_dim must be 0 (d_model) or a positive integer"),
])
def test_bad_model_config(overrides, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    make(**overrides)


def test_unknown_model_field():
  with pytest.raises(ConfigError, match=r"unknown model field\(s\) \['depth'\]"):
    model_lib.ModelConfig.from_dict({**CFG, "depth": 3})


def test_flops_per_token_counts_matmul_weights():
  cfg, model = make()
  params = flax.linen.unbox(init(model))
  matmul = model_lib.num_params(params) - params["embed"].size - params["pos_embed"].size
  assert model_lib.train_flops_per_token(cfg, 16) == 6 * matmul + 6 * 3 * 16 * 32


ALL_SWITCHES = dict(bias=True, layer_norm_affine=True, pre_layer_norm=False, positions="sinusoidal",
                    scale_embeddings=True, embed_layer_norm=True, tie_embeddings=True,
                    word_embed_dim=24)


def test_the_switches_add_exactly_their_parameters():
  cfg, model = make(**ALL_SWITCHES, scan_layers=False)
  params = flax.linen.unbox(init(model))
  D, E, H, K, F, V = 32, 24, 4, 8, 64, 96
  shapes = jax.tree.map(lambda x: x.shape, params)
  assert {k: v for k, v in shapes.items() if not k.startswith("layers_")} == {
      "embed": (V, E), "project_in": (E, D), "project_out": (D, E),
      "embed_norm": {"scale": (D,), "bias": (D,)}}  # no pos_embed, lm_head or final_norm
  assert shapes["layers_0"] == {
      "attn": {"query": (D, H, K), "query_bias": (H, K), "key": (D, H, K), "key_bias": (H, K),
               "value": (D, H, K), "value_bias": (H, K), "out": (H, K, D), "out_bias": (D,)},
      "mlp": {"wi": (D, F), "wi_bias": (F,), "wo": (F, D), "wo_bias": (D,)},
      "attn_norm": {"scale": (D,), "bias": (D,)}, "mlp_norm": {"scale": (D,), "bias": (D,)}}
  assert model_lib.train_flops_per_token(cfg, 16) == 6 * (3 * (4 * D * D + 2 * D * F) + E * V
                                                          + 2 * D * E) + 6 * 3 * 16 * D


@pytest.mark.parametrize("switches", [ALL_SWITCHES, dict(bias=True, layer_norm_affine=True)],
                         ids=["all", "opt"])
def test_switched_models_scan_and_decode_as_they_run_whole(switches):
  cfg, model = make(**switches)
  params = nontrivial(flax.linen.unbox(init(model)))
  x = tokens((2, 12))
  want = jax.jit(model.apply)({"params": params}, x)
  _, unrolled = make(**switches, scan_layers=False)
  got = jax.jit(unrolled.apply)({"params": model_lib.unstack_layers(params, 3)}, x)
  np.testing.assert_allclose(got, want, atol=1e-5)
  cache = model_lib.init_cache(cfg, jnp.ones((2, 12), bool))
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  decode = jax.jit(lambda *a: model.apply({"params": params}, *a, method="decode"))
  _, cache = decode(x[:, :7], positions[:, :7], cache)
  for t in range(7, 12):
    step, cache = decode(x[:, t:t + 1], positions[:, t:t + 1], cache)
    np.testing.assert_allclose(step, want[:, t], atol=1e-4)


def test_a_checkpoint_saved_before_a_switch_existed_means_its_default():
  fields = {"model": model_lib.ModelConfig.architecture()}
  old = {"model": {k: v for k, v in CFG.items()}}
  now = {"model": {**CFG, **model_lib.ModelConfig(**CFG).to_dict()}}
  assert checkpoint.differences(old, now, fields) == []
  now["model"]["bias"] = True
  assert checkpoint.differences(old, now, fields) == ["model.bias=False (this config: True)"]
