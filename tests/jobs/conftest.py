"""The trained models the jobs start from; they stand in for tests/conftest.py's untrained ones
(and, like them, are built once for all test workers)."""

import pytest

from tests.helpers import built_once, clip_config, tokenize_shapes, vqgan_config


@pytest.fixture(scope="session")
def vqgan_workdir(shapes_data_dir, tmp_path_factory):
  """A train_vqgan workdir after a few steps."""
  from cm3jax.training import train_vqgan
  return built_once(tmp_path_factory, "vqgan_trained",
                    lambda workdir: train_vqgan.train(vqgan_config(shapes_data_dir), workdir))


@pytest.fixture(scope="session")
def retriever_workdir(shapes_data_dir, tmp_path_factory):
  """A train_retriever workdir after a few steps on shapes/small."""
  from cm3jax.training import train_retriever
  config = clip_config(shapes_data_dir, num_train_steps=150, eval_every=0)
  return built_once(tmp_path_factory, "clip_trained",
                    lambda workdir: train_retriever.train(config, workdir))


@pytest.fixture(scope="session")
def small_codes(vqgan_workdir, shapes_data_dir, tmp_path_factory):
  """Code shards of shapes/small's train and validation splits (shards of 100 records) by the
  trained VQGAN."""
  return built_once(tmp_path_factory, "codes_trained",
                    lambda out: tokenize_shapes(vqgan_workdir, shapes_data_dir, out))
