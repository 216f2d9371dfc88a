"""Ahead-of-time compilation for TPU topologies on this CPU machine, through libtpu."""

import libtpu  # noqa: F401  (requirements-test.txt installs it: a missing one fails, not skips)
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import hardware, sharding
from cm3jax.training import aot
from tests.helpers import tiny_config

# The suite's compilation cache (tests/conftest.py) stores these TPU executables, but a client of
# no TPU cannot load them back: JAX warns and compiles again, as it does without the cache.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")


def test_compile_only_reports_memory_and_flops():
  config = tiny_config(grad_accum_steps=2, **{"model.dtype": "bfloat16",
                                              "model.remat_policy": "nothing_saveable"})
  report = aot.compile_train_step(config, "v5e:2x2")
  assert report.fits and report.num_devices == 4 and report.hbm_bytes == 16 * 2**30
  assert report.target == "v5e:2x2: 4 x TPU v5 lite, mesh data=1 fsdp=4 tensor=1"
  assert set(report.memory) == {"arguments", "outputs", "aliased", "temporaries", "code"}
  assert 0 < report.memory["arguments"] < report.total_bytes < report.hbm_bytes
  assert report.compiled_flops > 0 and report.model_flops > 0
  lines = "\n".join(report.lines())
  assert "compiled the train step for v5e:2x2: 4 x TPU v5 lite, mesh data=1 fsdp=4 tensor=1" in lines
  assert "per-device memory: arguments" in lines and "temporaries" in lines
  assert "of 16.0 GiB HBM: fits" in lines
  assert "model FLOPs per step" in lines and "compiled FLOPs per step" in lines


def test_compile_only_reports_a_step_that_does_not_fit():
  report = aot.compile_train_step(tiny_config(global_batch_size=2**19, seq_len=32), "v5e:2x2")
  assert not report.fits and report.memory is None and report.error
  assert report.lines()[0].startswith("the train step DOES NOT FIT v5e:2x2")


def test_tensor_parallel_mesh_on_a_pod():
  devices, hbm = hardware.tpu_topology("v5p:2x2x2")
  assert len(devices) == 8 and hbm == 95 * 2**30
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  assert aot.compile_train_step(config, "v5p:2x2x2").fits


def test_multislice_data_parallelism_across_slices():
  """Two v5e:2x2 slices: the data axis spans them, each slice holds the config's data x fsdp x
  tensor, so the parameters are sharded within a slice and replicated across the two."""
  devices, hbm = hardware.tpu_topology("v5e:2x2", num_slices=2)
  assert len(devices) == 8 and hbm == 16 * 2**30
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "slices": 2}, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for row, slice_index in zip(mesh.devices, (0, 1)):  # one slice per step of the data axis
    assert {d.slice_index for d in row.flat} == {slice_index}
  with pytest.raises(ConfigError, match=r"mesh.slices=1 but the 8 devices span 2 slices: set "
                                        r"mesh.slices=2 \(or -1\)"):
    sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "slices": 1}, devices)
  config = tiny_config(**{"model.dtype": "bfloat16"})
  report = aot.compile_train_step(config, "v5e:2x2", num_slices=2)
  assert report.fits and report.num_devices == 8
  assert report.target == ("2 x v5e:2x2: 8 x TPU v5 lite, mesh data=2 fsdp=4 tensor=1 "
                           "(2 slices on the data axis)")
  single = aot.compile_train_step(config, "v5e:2x2")
  # The parameters and optimizer state are sharded over a slice's 4 chips in both.
  assert report.memory["arguments"] < 1.2 * single.memory["arguments"]


@pytest.mark.parametrize("topology, message", [
    ("v9:2x2", "expected GENERATION:AxBxC with GENERATION one of"),
    ("v5p", "expected GENERATION:AxBxC"),
    ("v5p:2xfour", "'2xfour' is not a shape like 4x4x4"),
    ("v5p:3x3x3", "topology 'v5p:3x3x3':"),
])
def test_bad_topology(topology, message):
  with pytest.raises(ConfigError, match=message):
    hardware.tpu_topology(topology)


def test_compile_only_needs_a_topology():
  with pytest.raises(ConfigError, match="--compile_only needs --topology"):
    aot.compile_train_step(tiny_config(), None)
