"""CM3's HTML documents: the document form, prompts that are prefixes of it, reading codes out
of generated tokens and of CM3's decoded text, infilling a <mask>, and the sampling tasks."""

import re

import jax
import numpy as np
import pytest

from cm3jax import sampling, train_tokenizer
from cm3jax.config import ConfigError
from cm3jax.data import html, shapes
from cm3jax.vocab import EOS, Vocab
from tests.test_sampling import model_config, random_params

CODES = 64


@pytest.fixture(scope="module")
def vocab():
  captions = [shapes.scene("train", i).caption() for i in range(1000)]
  return Vocab(train_tokenizer.train(captions, 300), num_sentinels=16, num_image_codes=CODES)


@pytest.fixture(scope="module")
def sampler(vocab):
  cfg = model_config(vocab)
  return sampling.Sampler(cfg, random_params(cfg), vocab)


def test_the_alt_prompt_is_a_prefix_of_the_document(vocab):
  codes = np.arange(16) % CODES
  doc = html.image_document(vocab, "a red circle", codes)
  prompt = html.alt_prompt(vocab, "a red circle")
  assert doc[0] == EOS and vocab.break_id not in doc
  np.testing.assert_array_equal(doc[:len(prompt)], prompt)
  np.testing.assert_array_equal(html.codes_from_tokens(vocab, doc[len(prompt):]), codes)
  assert html.opening('say "hi" & go') == '<img alt="say &quot;hi&quot; &amp; go" src="'


def test_codes_end_at_the_first_token_that_is_not_one(vocab):
  tokens = np.concatenate([vocab.image_tokens(np.array([3, 1, 4])), vocab.encode_text('">'),
                           vocab.image_tokens(np.array([5]))])
  np.testing.assert_array_equal(html.codes_from_tokens(vocab, tokens), [3, 1, 4])
  assert html.codes_from_tokens(vocab, vocab.encode_text("text")).size == 0


def test_codes_from_cm3s_decoded_text():
  text = '<img alt="a picture of a blue car" src="977 789 803 789 823 35"><img alt="x" src="1'
  np.testing.assert_array_equal(html.codes_from_text(text, 6), [977, 789, 803, 789, 823, 35])
  np.testing.assert_array_equal(html.codes_from_text(text, 4), [977, 789, 803, 789])
  # Short: padded with its last codes, as CM3's pad_split does.
  np.testing.assert_array_equal(html.codes_from_text(text, 9),
                                [977, 789, 803, 789, 823, 35, 789, 823, 35])
  with pytest.raises(ConfigError, match=re.escape('the text has no src="..."')):
    html.codes_from_text("<p>no image</p>", 4)
  with pytest.raises(ConfigError, match="is not space-separated image codes"):
    html.codes_from_text('<img src="a car">', 4)


def test_infilling_moves_the_masked_span_after_a_sentinel(vocab):
  prompt = html.infill_prompt(vocab, "a red <mask> above")
  s0 = vocab.sentinel(0)
  want = [EOS, *vocab.encode_text("a red "), s0, *vocab.encode_text(" above"), s0]
  np.testing.assert_array_equal(prompt, want)
  for page, count in (("no mask", 0), ("<mask> and <mask>", 2)):
    with pytest.raises(ConfigError, match=f"exactly one <mask>, this one has {count}"):
      html.infill_prompt(vocab, page)


def test_the_sampling_tasks(vocab, sampler):
  codes = sampling.text_to_image(sampler, ["a red circle", "a blue square"], 2, 16,
                                 jax.random.PRNGKey(0), guidance=2.0, form="html")
  assert codes.shape == (2, 2, 16) and codes.min() >= 0 and codes.max() < CODES
  again = sampling.text_to_image(sampler, ["a red circle", "a blue square"], 2, 16,
                                 jax.random.PRNGKey(0), guidance=2.0, form="html")
  np.testing.assert_array_equal(codes, again)
  filled = sampling.infill_text(sampler, ["a red <mask> above"], jax.random.PRNGKey(0), 6)
  assert filled[0].startswith("a red ") and filled[0].endswith(" above")
