"""The CLIP retriever's trainer on shapes/small, trained: progress, recall and an exact resume;
and the command's bad input."""

import os
import shutil

import pytest

from cm3jax.retrieval import retriever
from cm3jax.training import train_retriever
from tests.helpers import assert_one_line_error, clip_config, run_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
  config = clip_config(shapes_data_dir, num_train_steps=150, log_every=10, eval_every=75,
                       checkpoint_every=75)
  workdir = str(tmp_path_factory.mktemp("clip"))
  return config, workdir, train_retriever.train(config, workdir)


def test_training_lowers_the_loss_and_raises_recall(trained):
  _, workdir, history = trained
  rows = [h for h in history if "loss" in h]
  assert {"batch_accuracy", "grad_norm", "learning_rate", "temperature",
          "pairs_per_s"} <= set(rows[0])
  assert rows[-1]["loss"] < 0.85 * rows[0]["loss"]
  evals = [h for h in history if "eval_text_to_image_r@1" in h]
  assert len(evals) == 2
  last = evals[-1]
  assert last["eval_text_to_image_r@5"] >= last["eval_text_to_image_r@1"]
  chance = 5 / 64
  assert last["eval_text_to_image_r@5"] > 3 * chance and last["eval_image_to_text_r@5"] > 3 * chance
  assert last["eval_text_to_image_r@5"] > evals[0]["eval_text_to_image_r@5"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["150", "75"]
  assert os.path.exists(os.path.join(workdir, retriever.TOKENIZER_FILE))


def test_resume_continues_exactly(trained, tmp_path):
  config, workdir, history = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  shutil.rmtree(os.path.join(copy, "checkpoints", "150"))
  resumed = train_retriever.train(config, copy)
  last = lambda h: [x for x in h if "loss" in x][-1]
  assert last(resumed)["loss"] == last(history)["loss"]
  assert [h for h in resumed if "eval_text_to_image_r@1" in h][-1] == [
      h for h in history if "eval_text_to_image_r@1" in h][-1]


def test_bad_input_to_the_command(shapes_data_dir, tmp_path):
  result = run_module("cm3jax.train_retriever", "--config=configs/tiny.py",
                      f"--workdir={tmp_path}")
  assert_one_line_error(result, "cm3jax.train_retriever", "has no clip section")
  result = run_module("cm3jax.train_retriever", "--config=configs/clip_shapes.py",
                      f"--workdir={tmp_path}", f"--config.data_dir={shapes_data_dir}",
                      "--config.data=shapes/small", "--config.tokenizer=/nonexistent.model")
  assert_one_line_error(result, "cm3jax.train_retriever", "no such file")
