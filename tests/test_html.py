"""CM3's HTML documents: the document form, prompts that are prefixes of it, reading codes out
of generated tokens and of CM3's decoded text, infilling a <mask>, and the sampling tasks."""

import re

import jax
import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import html, shapes
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import engine
from tests.test_sampling import greedy_reference, model_config, random_params

CODES = 64


@pytest.fixture(scope="module")
def vocab():
  captions = [shapes.scene("train", i).caption() for i in range(1000)]
  return Vocab(train_tokenizer.train(captions, 300), num_sentinels=16, num_image_codes=CODES)


@pytest.fixture(scope="module")
def sampler(vocab):
  cfg = model_config(vocab)
  return engine.Sampler(cfg, random_params(cfg), vocab)


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


def test_the_html_forms_prompts(vocab, sampler, monkeypatch):
  """text_to_image(form="html") prompts `</s> <img alt="caption" src="` and guides with the
  same prefix of an empty alt (not the break form's `</s> <sentinel:0> <break>`), after the
  context in both streams or in the conditional one alone."""
  asked = []
  monkeypatch.setattr(sampler, "generate", lambda requests, num_new, *a: asked.extend(
      requests) or np.full((len(requests), num_new), vocab.image_offset, np.int32))
  context = [np.array([EOS, 7, 8], np.int32)]
  for context_in_uncond in (True, False):
    engine.text_to_image(sampler, ['a "red" circle'], 1, 16, jax.random.PRNGKey(0), 2.0,
                           context=context, context_in_uncond=context_in_uncond, form="html")
  cond = [EOS, *vocab.encode_text('<img alt="a &quot;red&quot; circle" src="')]
  uncond = [EOS, *vocab.encode_text('<img alt="" src="')]
  assert [(r.prompt.tolist(), r.uncond_prompt.tolist(), r.guidance) for r in asked] == [
      ([EOS, 7, 8] + cond, [EOS, 7, 8] + uncond, 2.0), ([EOS, 7, 8] + cond, uncond, 2.0)]


def test_the_sampling_tasks(vocab, sampler):
  """Greedy html-form drawing and infilling equal the reference decoding of their prompts."""
  greedy = engine.SamplingConfig(greedy=True)
  codes = engine.text_to_image(sampler, ["a red circle", "a blue square"], 1, 16,
                                 jax.random.PRNGKey(0), guidance=2.0, sampling=greedy, form="html")
  for caption, drawn in zip(["a red circle", "a blue square"], codes[:, 0]):
    want = greedy_reference(sampler, html.alt_prompt(vocab, caption), 16, "image",
                            [EOS, *vocab.encode_text('<img alt="" src="')], 2.0)
    np.testing.assert_array_equal(drawn, want - vocab.image_offset)
  filled = engine.infill_text(sampler, ["a red <mask> above"], jax.random.PRNGKey(0), 6)
  s0 = vocab.sentinel(0)
  span = greedy_reference(sampler, [EOS, *vocab.encode_text("a red "), s0,
                                    *vocab.encode_text(" above"), s0], 6, "text")
  assert filled == ["a red " + engine.decode_text(vocab, span) + " above"]
  assert span[0] != EOS
