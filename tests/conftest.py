"""Tests run on the CPU with 8 host devices, so that meshes such as 2x2x2 can be built, and share
one persistent compilation cache (.pytest_cache/jax). The VQGAN, CLIP and codes of the fixtures
here are untrained (the unit tests train no model they do not test); tests/jobs/conftest.py
overrides them with trained ones for the jobs."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # Never probe for TPUs, even where libtpu is installed.
# The tests compile far more than they run. At the CPU backend's lowest optimisation level a
# VQGAN compiles in half the time and trains a quarter slower; the fast tier took 3 min 57 s
# instead of 5 min 1 s, cold (docs/testing.md). The commands the tests start, which train,
# keep the default (helpers.command_env).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
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

from tests.helpers import (built_once, clip_config, save_untrained, tiny_config,  # noqa: E402
                           tokenize_shapes, untrained_run, vqgan_config)


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the `shapes/small` build."""
  from cm3jax.data import shapes_tfds
  return built_once(tmp_path_factory, "tfds",
                    lambda data_dir: shapes_tfds.builder("shapes/small", data_dir))


@pytest.fixture(scope="session")
def vqgan_workdir(shapes_data_dir, tmp_path_factory):
  """A train_vqgan workdir of vqgan_config's 6 steps whose checkpoint holds the initial, untrained
  VQGAN (tests/jobs/conftest.py has a trained one)."""
  from cm3jax.training import train_vqgan
  config = vqgan_config(shapes_data_dir)
  return built_once(tmp_path_factory, "vqgan", lambda workdir: save_untrained(
      workdir, config, {"vqgan": dict.fromkeys(train_vqgan.ARCHITECTURE)},
      train_vqgan.setup(config)))


@pytest.fixture(scope="session")
def retriever_workdir(shapes_data_dir, tmp_path_factory):
  """A train_retriever workdir of clip_config's 6 steps on shapes/small whose checkpoint holds the
  initial, untrained CLIP, with the tokenizer trained on the train captions as train_retriever
  trains it (tests/jobs/conftest.py has a trained CLIP)."""
  import ml_collections

  from cm3jax.retrieval import retriever
  from cm3jax.training import train_retriever
  config = clip_config(shapes_data_dir)

  def build(workdir):
    captions = train_retriever.load_split(config, "train")["caption"]
    tokenize = retriever.SentencePieceText(train_retriever.tokenizer(config, workdir, captions))
    s = train_retriever.setup(config, tokenize.vocab_size)
    saved_config = config.copy_and_resolve_references()  # as train_retriever saves it
    with saved_config.unlocked():
      saved_config.clip = ml_collections.ConfigDict(s.cfg.to_dict())
    save_untrained(workdir, saved_config, {"clip": dict.fromkeys(train_retriever.ARCHITECTURE)},
                   s)
  return built_once(tmp_path_factory, "clip", build)


@pytest.fixture(scope="session")
def small_codes(vqgan_workdir, shapes_data_dir, tmp_path_factory):
  """Code shards of shapes/small's train and validation splits (shards of 100 records) by the
  VQGAN of `vqgan_workdir`."""
  return built_once(tmp_path_factory, "codes",
                    lambda out: tokenize_shapes(vqgan_workdir, shapes_data_dir, out))


@pytest.fixture(scope="session")
def untrained_workdir(vqgan_workdir, tmp_path_factory):
  """A finished tiny CM3 run on shapes captions and `vqgan_workdir`, its weights random
  (helpers.untrained_run)."""
  return built_once(tmp_path_factory, "run",
                    lambda workdir: untrained_run(vqgan_workdir, workdir))
