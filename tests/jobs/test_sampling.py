"""The sample command, in a subprocess: the recorded setting, its flags and their refusals; and
the tasks of a model trained until it memorised its documents."""

import jax
import numpy as np
import pytest

from cm3jax.core import sharding
from cm3jax.core.vocab import EOS, PAD
from cm3jax.data import shapes
from cm3jax.sampling import engine
from cm3jax.training import trainer
from tests.helpers import assert_one_line_error, run_module, tiny_config
from tests.test_sampling import CODES, record_best_of_8, vocab  # noqa: F401

pytestmark = pytest.mark.slow


def test_the_sample_command_reads_the_recorded_setting_and_its_flags(tmp_path):
  """The command's flags are unset unless given: --top_k overrides the recorded setting's, the
  rest is the recorded best of 8. (There is no checkpoint: it stops there.)"""
  record_best_of_8(tmp_path)
  result = run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a", "--top_k=3")
  assert_one_line_error(result, "cm3jax.sample", "no checkpoints in")
  assert result.stdout.startswith("sampling text_to_image with --top_k=3 --top_p=0.9 --cfg=1 "
                                  "--rerank=8 --rerank_by=model (the best measured, row "), (
                                      result.stdout)
  assert result.stdout.strip().endswith("; --top_k as given)"), result.stdout
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a",
                                   "--rerank=0"), "cm3jax.sample", "--rerank must be at least 1")
  (tmp_path / "sampling_defaults.json").write_text('{"version": 7}')
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a"),
                        "cm3jax.sample", "sampling_defaults.json is not a sampling-defaults file")


def memorised_documents(vocab, captions, codes, region):
  """One row per document: each image drawn from its caption, captioned by infilling, and its
  codes `region` infilled, as the CM3 stream writes them (cm3jax/data/cm3.py)."""
  s0, start, end = vocab.sentinel(0), *region
  docs = []
  for caption, image in zip(captions, codes):
    text, image = vocab.encode_text(caption), vocab.image_tokens(image).tolist()
    docs += [[EOS, *text, vocab.break_id, *image],
             [EOS, s0, vocab.break_id, *image, s0, *text, vocab.eoss_id],
             [EOS, *text, vocab.break_id, *image[:start], s0, *image[end:], s0,
              *image[start:end], vocab.eoss_id]]
  return docs


def test_tasks_of_a_model_that_memorised_its_documents(vocab):
  """A small model trained on eight image-caption pairs until it knows them: the tasks'
  prompts are the ones it learnt, so it draws each caption's codes, names each image and fills
  in each region exactly."""
  captions = [shapes.scene("train", i).caption() for i in range(8)]
  codes = np.random.default_rng(5).integers(0, CODES, (8, 16))
  docs = memorised_documents(vocab, captions, codes, (5, 11))
  L = 64
  tokens = np.full((len(docs), L + 1), PAD, np.int32)
  for row, doc in enumerate(docs):
    tokens[row, :len(doc)] = doc
  targets = tokens[:, 1:]
  weights = ((targets != PAD) & ~vocab.is_sentinel(targets)).astype(np.float32)
  config = tiny_config(seq_len=L, global_batch_size=len(docs), num_train_steps=250, **{
      "model.vocab_size": vocab.size, "model.max_seq_len": L, "model.d_model": 64,
      "model.num_heads": 4, "model.mlp_dim": 256, "model.num_layers": 2,
      "optimizer.peak_lr": 3e-3, "optimizer.warmup_steps": 20, "optimizer.weight_decay": 0.0})
  s = trainer.setup(config, jax.devices()[:1])
  host_batch = {"inputs": tokens[:, :-1], "targets": targets, "weights": weights}
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    batch = trainer.device_batch(host_batch, s.batch_sharding)
    for _ in range(config.num_train_steps):
      state, _ = s.train_step(state, batch)
  sampler = engine.Sampler(s.model_cfg, state.params, vocab, s.mesh)
  greedy, key = engine.SamplingConfig(greedy=True), jax.random.PRNGKey(0)
  assert engine.caption_images(sampler, codes, key) == captions
  drawn = engine.text_to_image(sampler, captions, 1, 16, key, sampling=greedy)[:, 0]
  np.testing.assert_array_equal(drawn, codes)
  # Self-reranking: the model finds each image's own caption the likeliest of the eight, so
  # of the eight images as candidates for a caption it keeps that caption's.
  scores_IxC = np.stack([engine.caption_log_likelihood(sampler, codes, [c] * 8)
                         for c in captions], 1)
  np.testing.assert_array_equal(scores_IxC.argmax(1), np.arange(8))
  shuffled = np.stack([codes[np.random.default_rng(i).permutation(8)] for i in range(8)])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(engine, "draw_images", lambda *a, **k: shuffled.reshape(64, 16))
    np.testing.assert_array_equal(engine.text_to_image_reranked(
        sampler, captions, 8, 16, jax.random.split(key, 8)), codes)
  for caption, image in zip(captions[:3], codes):
    damaged = image.copy()
    damaged[5:11] = (damaged[5:11] + 1) % CODES
    np.testing.assert_array_equal(
        engine.infill_image(sampler, caption, damaged, 5, 11, key, greedy), image)
