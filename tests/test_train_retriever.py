"""The CLIP retriever's trainer on shapes/small: loading its workdir, recall and a resume refused
(trained: tests/jobs/test_train_retriever.py)."""

import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.retrieval import retriever
from cm3jax.training import train_retriever
from tests.helpers import clip_config


def test_a_trained_retriever_loads_and_embeds(retriever_workdir, shapes_data_dir):
  r = retriever.load(retriever_workdir)
  split = train_retriever.load_split(clip_config(shapes_data_dir), "validation")
  texts = [c.decode() for c in split["caption"][:8]]
  docs = r.embed_documents(texts, split["image"][:8])
  np.testing.assert_allclose(np.linalg.norm(docs, axis=1), 1.0, rtol=1e-5)
  images, captions = r.embed_images(split["image"][:8]), r.embed_texts(texts)
  mean = images + captions
  np.testing.assert_allclose(docs, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-6)
  assert r.fingerprint == retriever.load(retriever_workdir).fingerprint
  with pytest.raises(ConfigError, match="takes 32x32 RGB images"):
    r.embed_images(np.zeros((1, 16, 16, 3), np.uint8))


def test_recall_counts_a_hit_by_scene():
  captions = ["a small red circle above a large blue square",
              "a large blue square below a small red circle",  # the same scene
              "a small red circle on the left"]
  scenes = train_retriever.scene_ids(captions)
  assert scenes[0] == scenes[1] != scenes[2]
  similarity = np.array([[0.0, 1.0, 0.5], [0.2, 0.1, 0.9], [1.0, 0.0, 0.2]])
  result = train_retriever.recall(similarity, scenes, scenes, ks=(1, 2))
  assert result == {1: pytest.approx(1 / 3), 2: 1.0}  # query 2 finds its scene second


def test_resume_refuses_another_retriever(retriever_workdir, shapes_data_dir):
  other = clip_config(shapes_data_dir, num_train_steps=200, **{"clip.text_width": 64})
  with pytest.raises(ConfigError, match="clip.text_width=32"):
    train_retriever.train(other, retriever_workdir)
