import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cm3jax import data
from cm3jax.config import ConfigError
from cm3jax.training import train_vqgan
from cm3jax.vqgan.model import VQGANConfig
from tests.helpers import vqgan_config


def test_batch_indices_are_seeded_epochs():
  rows = [data.batch_indices(0, step, 3, 10) for step in range(10)]
  first_epoch = np.concatenate(rows)[:10]
  assert sorted(first_epoch) == list(range(10))
  assert len(rows[3]) == 3  # rows 9, 10, 11 span two epochs
  np.testing.assert_array_equal(data.batch_indices(0, 3, 3, 10), rows[3])
  assert not np.array_equal(data.batch_indices(1, 0, 3, 10), rows[0])


def test_dead_codes_move_onto_encoder_outputs():
  cfg = VQGANConfig(resolution=32, ch=8, ch_mult=(1, 2), z_channels=8, embed_dim=4, n_embed=6,
                    norm_groups=4)
  config = ml_collections.ConfigDict(dict(restart_every=10, restart_until=20,
                                          dead_code_threshold=0.5))
  codebook = jnp.full((6, 4), 9.0)
  usage = jnp.array([0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
  z = jnp.arange(2 * 4 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 4, 4)
  params = {"quantize": {"embedding": codebook}}
  for step, restarted in ((10, True), (11, False), (20, False)):
    new, new_usage = train_vqgan._restart_dead_codes(config, cfg, params, usage, z, step,
                                                     jax.random.PRNGKey(0))
    rows = np.asarray(new["quantize"]["embedding"])
    np.testing.assert_array_equal(rows[:2], 9.0)
    if restarted:
      flat = np.asarray(z).reshape(-1, 4)
      assert all(any(np.array_equal(r, f) for f in flat) for r in rows[2:])
      np.testing.assert_allclose(new_usage[2:], 1 / 6)
    else:
      np.testing.assert_array_equal(rows, codebook)


def test_resume_refuses_another_vqgan(vqgan_workdir, shapes_data_dir):
  config = vqgan_config(shapes_data_dir, num_train_steps=8, **{"vqgan.n_embed": 128})
  with pytest.raises(ConfigError, match=r"vqgan\.n_embed=64 \(this config: 128\)"):
    train_vqgan.train(config, vqgan_workdir)


@pytest.mark.parametrize("overrides, message", [
    ({"recon_loss": "l3"}, "recon_loss='l3' is not one of"),
    ({"perceptual": "vgg"}, "perceptual='vgg' is not one of"),
    ({"batch_size": 7}, "batch_size=7 does not divide over the 8 batch devices"),
])
def test_bad_config(shapes_data_dir, overrides, message):
  with pytest.raises(ConfigError, match=message):
    train_vqgan.setup(vqgan_config(shapes_data_dir, **overrides))


def test_unknown_dataset(shapes_data_dir, tmp_path):
  with pytest.raises(ConfigError, match="data='cifar10': expected shapes or shapes/"):
    train_vqgan.train(vqgan_config(shapes_data_dir, data="cifar10"), str(tmp_path))
