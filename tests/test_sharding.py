import flax
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cm3jax import data, sharding, trainer
from cm3jax.config import ConfigError
from tests.helpers import tiny_config


def mesh_config(data=1, fsdp=-1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_shape_fills_the_remaining_devices():
  assert sharding.mesh_shape(mesh_config(), 8) == (1, 8, 1)
  assert sharding.mesh_shape(mesh_config(data=2, tensor=2), 8) == (2, 2, 2)
  assert sharding.mesh_shape(mesh_config(data=-1, fsdp=1, tensor=4), 8) == (2, 1, 4)


@pytest.mark.parametrize("sizes, message", [
    (dict(data=2, fsdp=2, tensor=1), r"mesh data=2, fsdp=2, tensor=1 needs 4 devices but 8 are"),
    (dict(data=3, fsdp=-1, tensor=1), r"8 devices do not divide by 3"),
    (dict(data=-1, fsdp=-1, tensor=1), r"at most one -1"),
    (dict(data=0, fsdp=-1, tensor=1), r"each size must be a positive integer"),
])
def test_bad_mesh(sizes, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(mesh_config(**sizes), 8)


def test_parameters_and_batches_are_sharded_by_the_table():
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  s = trainer.setup(config)
  layers = s.abstract_state.params["layers"]
  assert layers["attn"]["query"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert layers["mlp"]["wo"].sharding.spec == P(None, "tensor", "fsdp")
  assert s.abstract_state.params["embed"].sharding.spec == P("tensor", "fsdp")
  # Adam's moments are sharded like the parameters they belong to.
  mu = s.abstract_state.opt_state[1][0].mu
  assert mu["layers"]["mlp"]["wi"].sharding.spec == P(None, "fsdp", "tensor")
  assert s.batch_sharding.spec == P(("data", "fsdp"), None)


def _trajectory(config, devices, steps=3):
  """Losses of `steps` train steps on one batch, and the gradients of every parameter before the
  first step and after the last."""
  s = trainer.setup(config, devices)
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    host = next(data.synthetic.batches(config, "train", 0, (0, 0), slice(None)))
    batch = trainer.device_batch(host, s.batch_sharding)
    grads = [s.gradients(state.params, batch)[0]]
    losses = []
    for _ in range(steps):
      state, metrics = s.train_step(state, batch)
      losses.append(metrics["loss"])
    grads.append(s.gradients(state.params, batch)[0])
  return jax.device_get(losses), jax.device_get(grads), jax.device_get(state.params)


def test_2x2x2_mesh_matches_a_single_device():
  """Losses, every parameter's gradient before the first step and after the third, and the
  parameters then. The LM head and the output projections start at zero, so the first gradients
  reach the head alone; after three steps they reach every weight (checked)."""
  config = tiny_config(**{"model.num_layers": 2})
  single = _trajectory(config, jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  meshed = _trajectory(config, jax.devices())
  np.testing.assert_allclose(single[0], meshed[0], rtol=2e-5)
  for want, got in zip(single[1], meshed[1]):
    flat = flax.traverse_util.flatten_dict(want)
    for path, g in flax.traverse_util.flatten_dict(got).items():
      scale = np.abs(flat[path]).max()
      np.testing.assert_allclose(g, flat[path], rtol=0, atol=1e-4 * scale + 1e-12,
                                 err_msg="/".join(path))
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(single[1][1]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               single[2], meshed[2])
