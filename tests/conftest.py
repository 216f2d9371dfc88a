"""Tests run on the CPU with 8 host devices, so that meshes such as 2x2x2 can be built."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # Never probe for TPUs, even where libtpu is installed.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(filename: str):
  """The module of configs/FILENAME."""
  import importlib.util
  path = os.path.join(REPO, "configs", filename)
  spec = importlib.util.spec_from_file_location(filename[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(**overrides):
  """configs/tiny.py on the synthetic stream, shrunk for fast tests; `overrides` use dotted names."""
  c = load_config("tiny.py").get_config()
  c.data = "synthetic"
  c.seq_len = 32
  c.global_batch_size = 8
  c.num_train_steps = 6
  c.log_every = 1
  c.eval_every = 0
  c.eval_steps = 1
  c.checkpoint_every = 3
  c.async_checkpointing = False
  c.model.update(vocab_size=128, d_model=32, num_heads=2, mlp_dim=64, max_seq_len=32)
  return _override(c, overrides)


def _override(c, overrides):
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


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the `shapes/small` build."""
  from cm3jax.data import shapes_tfds
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  shapes_tfds.builder("shapes/small", data_dir)
  return data_dir


def vqgan_config(data_dir, **overrides):
  """configs/vqgan_shapes.py on shapes/small, shrunk for fast tests."""
  c = load_config("vqgan_shapes.py").get_config()
  c.data, c.data_dir = "shapes/small", data_dir
  c.batch_size = 8
  c.num_train_steps = 6
  c.log_every = 2
  c.eval_every = 6
  c.eval_images = 16
  c.checkpoint_every = 3
  c.keep_checkpoints = 5
  c.async_checkpointing = False
  c.restart_every = 2
  c.vqgan.update(ch=8, z_channels=8, embed_dim=8, n_embed=64, norm_groups=4)
  return _override(c, overrides)


@pytest.fixture(scope="session")
def vqgan_workdir(shapes_data_dir, tmp_path_factory):
  """A train_vqgan workdir after a few steps."""
  from cm3jax import train_vqgan
  workdir = str(tmp_path_factory.mktemp("vqgan"))
  train_vqgan.train(vqgan_config(shapes_data_dir), workdir)
  return workdir
