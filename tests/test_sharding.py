import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cm3jax import data, sharding, train
from cm3jax.config import ConfigError
from tests.conftest import tiny_config


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
  s = train.setup(config)
  layers = s.abstract_state.params["layers"]
  assert layers["attn"]["query"].sharding.spec == P(None, "fsdp", "tensor", None)
  assert layers["mlp"]["wo"].sharding.spec == P(None, "tensor", "fsdp")
  assert s.abstract_state.params["embed"].sharding.spec == P("tensor", "fsdp")
  # Adam's moments are sharded like the parameters they belong to.
  mu = s.abstract_state.opt_state[1][0].mu
  assert mu["layers"]["mlp"]["wi"].sharding.spec == P(None, "fsdp", "tensor")
  assert s.batch_sharding.spec == P(("data", "fsdp"), None)


def _one_step(config, devices):
  s = train.setup(config, devices)
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    host = next(data.synthetic.batches(config, "train", 0, (0, 0), slice(None)))
    batch = train.device_batch(host, s.batch_sharding)
    first = jax.device_get(s.eval_step(state.params, batch))
    state, metrics = s.train_step(state, batch)
    second = jax.device_get(s.eval_step(state.params, batch))
  return first, jax.device_get(metrics), second, jax.device_get(state.params)


def test_2x2x2_mesh_matches_a_single_device():
  config = tiny_config(**{"model.zero_init_residual": False})
  single = _one_step(config, jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  meshed = _one_step(config, jax.devices())
  for a, b in zip(single[:3], meshed[:3]):
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               single[3], meshed[3])
