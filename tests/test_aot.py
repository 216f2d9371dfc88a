"""Ahead-of-time compilation for TPU topologies on this CPU machine, through libtpu."""

import pytest

from cm3jax import hardware, train
from cm3jax.config import ConfigError
from tests.conftest import tiny_config

pytest.importorskip("libtpu", reason="requirements-test.txt installs libtpu")


def test_compile_only_reports_memory_and_flops(capsys):
  config = tiny_config(grad_accum_steps=2, **{"model.dtype": "bfloat16",
                                              "model.remat_policy": "nothing_saveable"})
  assert train.compile_only(config, "v5e:2x2")
  out = capsys.readouterr().out
  assert "compiled the train step for v5e:2x2: 4 x TPU v5 lite, mesh data=1 fsdp=4 tensor=1" in out
  assert "per-device memory: arguments" in out and "temporaries" in out
  assert "of 16.0 GiB HBM: fits" in out
  assert "model FLOPs per step" in out and "compiled FLOPs per step" in out


def test_compile_only_reports_a_step_that_does_not_fit(capsys):
  config = tiny_config(global_batch_size=2**19, seq_len=32)
  assert not train.compile_only(config, "v5e:2x2")
  assert "the train step DOES NOT FIT v5e:2x2" in capsys.readouterr().out


def test_tensor_parallel_mesh_on_a_pod():
  devices, hbm = hardware.tpu_topology("v5p:2x2x2")
  assert len(devices) == 8 and hbm == 95 * 2**30
  config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  assert train.compile_only(config, "v5p:2x2x2")


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
    train.compile_only(tiny_config(), None)
