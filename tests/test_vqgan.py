import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cm3jax.config import ConfigError
from cm3jax.vqgan import torch_io
from cm3jax.vqgan.model import VQGAN, VQGANConfig, images_to_model_input, model_output_to_images

from tests import torch_vqgan

SMALL = VQGANConfig(resolution=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                    attn_resolutions=(16,), z_channels=16, embed_dim=16, n_embed=512)
# Chameleon's layout (levels, blocks, attention, codebook) at a width and resolution that run in
# seconds: its 512x512 tokenizer (ch=128) has the same parameter names, four times as wide.
CHAMELEON = VQGANConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                        attn_resolutions=(), z_channels=256, embed_dim=256, n_embed=8192)


def reference_model(cfg, seed=0):
  """The PyTorch reference with random weights everywhere, GroupNorm affines included."""
  torch.manual_seed(seed)
  model = torch_vqgan.VQModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
    model.quantize.embedding.weight.normal_()
  return model


def init_small(seed):
  """SMALL's initial parameters, by one program that the tests compile once."""
  return jax.jit(VQGAN(SMALL).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))["params"]


def state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg", [SMALL, CHAMELEON], ids=["small", "chameleon"])
def test_pytorch_vqgan_converts_exactly(cfg):
  reference = reference_model(cfg)
  params = torch_io.state_dict_to_params(state_dict(reference), cfg)
  model = VQGAN(cfg)
  images = np.random.default_rng(0).uniform(-1, 1, (1, cfg.resolution, cfg.resolution, 3))
  images = images.astype(np.float32)
  codes = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode))(
      params, images))
  with torch.no_grad():
    ref_codes = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert codes.shape == (1, cfg.tokens_per_image) and codes.dtype == np.int32
  assert np.mean(codes == ref_codes) >= 0.999
  decoded = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQGAN.decode))(params, codes)
  with torch.no_grad():
    ref_decoded = reference.decode_code(torch.from_numpy(codes.copy()).long(), cfg.latent_size)
  np.testing.assert_allclose(np.asarray(decoded), ref_decoded.permute(0, 2, 3, 1).numpy(),
                             atol=1e-4, rtol=0)


def test_flax_to_torch_to_flax_is_bitwise(tmp_path):
  params = init_small(3)
  again = torch_io.state_dict_to_params(torch_io.params_to_state_dict(params), SMALL)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(params))

  torch_io.export_torch_vqgan(params, SMALL, str(tmp_path / "vqgan"))
  assert sorted(os.listdir(tmp_path / "vqgan")) == ["config.json", "model.safetensors"]
  loaded = torch_io.load_torch_vqgan(str(tmp_path / "vqgan" / "model.safetensors"), SMALL)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))

  # The export is a working PyTorch model: it decodes codes to the same pixels.
  reference = torch_vqgan.VQModel(SMALL).eval()
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in
                             torch_io.load_state_dict(str(tmp_path / "vqgan" / "model.safetensors")).items()})
  codes = np.random.default_rng(1).integers(0, SMALL.n_embed, (2, SMALL.tokens_per_image))
  ours = jax.jit(lambda p, c: VQGAN(SMALL).apply({"params": p}, c, method=VQGAN.decode))(
      params, jnp.asarray(codes))
  with torch.no_grad():
    theirs = reference.decode_code(torch.from_numpy(codes), SMALL.latent_size).permute(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4, rtol=0)


def test_training_checkpoint_loads_with_its_loss_weights_ignored(tmp_path):
  reference = reference_model(SMALL)
  checkpoint = {"state_dict": {**reference.state_dict(),
                               "loss.discriminator.main.0.weight": torch.zeros(4, 3, 4, 4)},
                "global_step": 10}
  torch.save(checkpoint, tmp_path / "last.ckpt")
  params = torch_io.load_torch_vqgan(str(tmp_path / "last.ckpt"), SMALL)
  np.testing.assert_array_equal(params["quantize"]["embedding"],
                                reference.quantize.embedding.weight.detach().numpy())


def test_pickled_objects_need_trust(tmp_path):
  torch.save({"state_dict": reference_model(SMALL).state_dict(), "callbacks": {"cb": SMALL}},
             tmp_path / "taming.ckpt")
  with pytest.raises(ConfigError, match="holds Python objects besides tensors"):
    torch_io.load_torch_vqgan(str(tmp_path / "taming.ckpt"), SMALL)
  assert "encoder" in torch_io.load_torch_vqgan(str(tmp_path / "taming.ckpt"), SMALL,
                                                trust_pickle=True)


def test_mismatched_state_dicts_are_named():
  weights = state_dict(reference_model(SMALL))
  del weights["encoder.conv_in.bias"]
  weights["encoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConfigError, match=r"missing: encoder\.conv_in\.bias; "
                     r"unexpected: encoder\.extra\.weight"):
    torch_io.state_dict_to_params(weights, SMALL)
  other = VQGANConfig(**{**SMALL.__dict__, "n_embed": 256})
  with pytest.raises(ConfigError, match=r"wrong shape: quantize\.embedding\.weight \(512, 16\) "
                     r"\(config: \(256, 16\)\)"):
    torch_io.state_dict_to_params(state_dict(reference_model(SMALL)), other)
  with pytest.raises(ConfigError, match="no such file"):
    torch_io.load_torch_vqgan("/nonexistent/vqgan.safetensors", SMALL)


def test_straight_through_gradients_reach_the_encoder():
  model = VQGAN(SMALL)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  params = init_small(0)

  def loss(p):
    recon, _, vq_loss, _ = model.apply({"params": p}, images)
    return jnp.mean(jnp.square(recon - images)) + vq_loss

  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["quantize"]["embedding"]).sum()) > 0


def test_l2_normalized_codebook_decodes_unit_vectors():
  cfg = VQGANConfig(**{**SMALL.__dict__, "l2_normalized_codes": True})
  model = VQGAN(cfg)
  params = init_small(0)  # the switch adds no parameter
  codes = jnp.arange(cfg.tokens_per_image)[None] % cfg.n_embed
  vectors = model.apply({"params": params}, codes.reshape(1, 8, 8),
                        method=lambda m, c: m.quantize.lookup(c))
  np.testing.assert_allclose(jnp.linalg.norm(vectors, axis=-1), 1.0, rtol=1e-5)


def test_image_conversion():
  rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  x = images_to_model_input(rgb, 32)
  assert x.shape == (1, 32, 32, 3) and x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
  np.testing.assert_array_equal(model_output_to_images(x)[0], rgb)
  gray = images_to_model_input(rgb[..., :1], 32)
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  rgba = np.concatenate([rgb, np.full((32, 32, 1), 7, np.uint8)], -1)
  np.testing.assert_array_equal(images_to_model_input(rgba[None], 32), x)
  assert images_to_model_input(rgb[..., 0], 32).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 64, 48, 3), np.uint8), "images are 64x48; this tokenizer takes 32x32"),
    (np.zeros((2, 32, 32, 2), np.uint8), "images must have 1, 3 or 4 channels; got 2"),
    (np.zeros((2, 32, 32, 3), np.int64), "images must be uint8 or float; got int64"),
    (np.full((2, 32, 32, 3), 200.0), "float images must lie in"),
    (np.zeros((2, 1, 32, 32, 3), np.uint8), "images must be"),
])
def test_bad_images(images, message):
  with pytest.raises(ConfigError, match=message):
    images_to_model_input(images, 32)


def test_bad_vqgan_config():
  with pytest.raises(ConfigError, match="channel width 48 does not divide into norm_groups=32"):
    VQGANConfig(ch=48, ch_mult=(1, 2))
  with pytest.raises(ConfigError, match="resolution 100 is not a multiple of"):
    VQGANConfig(resolution=100, ch_mult=(1, 2, 2, 4))
  with pytest.raises(ConfigError, match=r"unknown vqgan field\(s\) \['depth'\]"):
    VQGANConfig.from_dict({"depth": 3})
