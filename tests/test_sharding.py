import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from cm3jax.config import ConfigError
from cm3jax.core import sharding
from cm3jax.training import trainer
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
  assert s.batch_sharding.spec == P(("data", "fsdp"))


def test_a_batch_splits_over_data_and_fsdp_not_tensor():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  assert sharding.batch_devices(mesh) == 4
  assert sharding.batch_devices(sharding.make_mesh(mesh_config(data=1, fsdp=2, tensor=4))) == 2
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.batch_sharding(mesh, axis=1).spec == P(None, ("data", "fsdp"))


def test_a_dimension_a_mesh_axis_does_not_divide_is_replicated():
  """An imported model's widths (here d=42, 3 heads, F=52) need not divide by the mesh."""
  config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "model.d_model": 42,
                          "model.num_heads": 3, "model.mlp_dim": 52, "model.bias": True})
  params = trainer.setup(config).abstract_state.params
  layers = params["layers"]
  assert layers["attn"]["query"].sharding.spec == P(None, None, None, None)  # 42 % 4, 3 % 2
  assert layers["mlp"]["wi"].sharding.spec == P(None, None, "tensor")  # 52 = 2 x 26
  assert layers["mlp"]["wi_bias"].sharding.spec == P(None, "tensor")
  assert params["embed"].sharding.spec == P("tensor", None)
