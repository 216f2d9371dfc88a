"""Tests run on the CPU with 8 host devices, so that meshes such as 2x2x2 can be built."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # Never probe for TPUs, even where libtpu is installed.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """configs/tiny.py shrunk further for fast tests; `overrides` use dotted names."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("tiny", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.seq_len = 32
  c.global_batch_size = 8
  c.num_train_steps = 6
  c.log_every = 1
  c.eval_every = 0
  c.eval_steps = 1
  c.checkpoint_every = 3
  c.async_checkpointing = False
  c.model.update(vocab_size=128, d_model=32, num_heads=2, mlp_dim=64, max_seq_len=32)
  for name, value in overrides.items():
    target = c
    *path, last = name.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


@pytest.fixture
def config():
  return tiny_config()
