"""Tests run on the CPU with 8 host devices, so that meshes such as 2x2x2 can be built, and share
one persistent compilation cache (.pytest_cache/jax)."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # Never probe for TPUs, even where libtpu is installed.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
# One compilation cache for both xdist workers and every command a test runs: the tests compile
# the same tiny programs again and again, and on a 2-core CPU compiling is most of their time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2**30))  # bytes; least recent go

import importlib.util  # noqa: E402

import pytest  # noqa: E402

# The interop tests run transformers, whose torch (the CUDA build's) imports triton; libtriton
# segfaults while loading if TensorFlow (the data pipeline) loaded first, so it loads first.
if importlib.util.find_spec("triton") is not None:
  import triton  # noqa: E402, F401

from tests.helpers import tiny_config, vqgan_config  # noqa: E402


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


@pytest.fixture(scope="session")
def vqgan_workdir(shapes_data_dir, tmp_path_factory):
  """A train_vqgan workdir after a few steps."""
  from cm3jax.training import train_vqgan
  workdir = str(tmp_path_factory.mktemp("vqgan"))
  train_vqgan.train(vqgan_config(shapes_data_dir), workdir)
  return workdir


@pytest.fixture(scope="session")
def retriever_workdir(shapes_data_dir, tmp_path_factory):
  """A train_retriever workdir after a few steps on shapes/small."""
  from cm3jax.training import train_retriever
  from tests.helpers import clip_config
  workdir = str(tmp_path_factory.mktemp("clip"))
  train_retriever.train(clip_config(shapes_data_dir, num_train_steps=150, eval_every=0),
                        workdir)
  return workdir


@pytest.fixture(scope="session")
def small_codes(vqgan_workdir, shapes_data_dir, tmp_path_factory):
  """Code shards of shapes/small's train and validation splits (shards of 100 records)."""
  from cm3jax.prepare import tokenize_images
  from cm3jax.vqgan.tokenizer import ImageTokenizer
  out = str(tmp_path_factory.mktemp("codes"))
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  for split in ("train", "validation"):
    tokenize_images.tokenize_split(tokenizer, "shapes/small", split, out, shapes_data_dir,
                                   shard_size=100)
  return out
