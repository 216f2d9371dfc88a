"""The trained models the jobs start from; they stand in for tests/conftest.py's untrained ones."""

import pytest

from tests.helpers import clip_config, tokenize_shapes, vqgan_config


@pytest.fixture(scope="session")
def vqgan_workdir(shapes_data_dir, tmp_path_factory):
  """A train_vqgan workdir after a few steps."""
  from cm3jax.training import train_vqgan
  workdir = str(tmp_path_factory.mktemp("vqgan_trained"))
  train_vqgan.train(vqgan_config(shapes_data_dir), workdir)
  return workdir


@pytest.fixture(scope="session")
def retriever_workdir(shapes_data_dir, tmp_path_factory):
  """A train_retriever workdir after a few steps on shapes/small."""
  from cm3jax.training import train_retriever
  workdir = str(tmp_path_factory.mktemp("clip_trained"))
  train_retriever.train(clip_config(shapes_data_dir, num_train_steps=150, eval_every=0),
                        workdir)
  return workdir


@pytest.fixture(scope="session")
def small_codes(vqgan_workdir, shapes_data_dir, tmp_path_factory):
  """Code shards of shapes/small's train and validation splits (shards of 100 records) by the
  trained VQGAN."""
  return tokenize_shapes(vqgan_workdir, shapes_data_dir,
                         str(tmp_path_factory.mktemp("codes_trained")))
