"""The CLIP retriever's trainer on shapes/small: progress, recall, resume and bad input."""

import os
import shutil

import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.retrieval import retriever
from cm3jax.training import train_retriever
from tests.helpers import assert_one_line_error, clip_config, run_module


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


def test_a_trained_retriever_loads_and_embeds(trained, shapes_data_dir):
  _, workdir, _ = trained
  r = retriever.load(workdir)
  split = train_retriever.load_split(clip_config(shapes_data_dir), "validation")
  texts = [c.decode() for c in split["caption"][:8]]
  docs = r.embed_documents(texts, split["image"][:8])
  np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-5)
  images, captions = r.embed_images(split["image"][:8]), r.embed_texts(texts)
  mean = images + captions
  np.testing.assert_allclose(docs, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
  assert r.fingerprint == retriever.load(workdir).fingerprint
  with pytest.raises(ConfigError, match="takes 32x32 RGB images"):
    r.embed_images(np.zeros((1, 16, 16, 3), np.uint8))


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


def test_recall_counts_a_hit_by_scene():
  captions = ["a small red circle above a large blue square",
              "a large blue square below a small red circle",  # the same scene
              "a small red circle on the left"]
  scenes = train_retriever.scene_ids(captions)
  assert scenes[0] == scenes[1] != scenes[2]
  similarity = np.array([[0.0, 1.0, 0.5], [0.2, 0.1, 0.9], [1.0, 0.0, 0.2]])
  result = train_retriever.recall(similarity, scenes, scenes, ks=(1, 2))
  assert result == {1: pytest.approx(1 / 3), 2: 1.0}  # query 2 finds its scene second


def test_resume_refuses_another_retriever(trained, shapes_data_dir):
  config, workdir, _ = trained
  other = clip_config(shapes_data_dir, num_train_steps=200, **{"clip.text_width": 64})
  with pytest.raises(ConfigError, match="clip.text_width=32"):
    train_retriever.train(other, workdir)


def test_bad_input_to_the_command(shapes_data_dir, tmp_path):
  result = run_module("cm3jax.train_retriever", "--config=configs/tiny.py",
                      f"--workdir={tmp_path}")
  assert_one_line_error(result, "cm3jax.train_retriever", "has no clip section")
  result = run_module("cm3jax.train_retriever", "--config=configs/clip_shapes.py",
                      f"--workdir={tmp_path}", f"--config.data_dir={shapes_data_dir}",
                      "--config.data=shapes/small", "--config.tokenizer=/nonexistent.model")
  assert_one_line_error(result, "cm3jax.train_retriever", "no such file")
