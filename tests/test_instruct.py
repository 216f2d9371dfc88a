"""Decoding the instruction-tuned tasks: each prompt is its template's training prefix, guided
tasks mask their conditions with sentinels, and edits run three streams."""

import jax
import numpy as np
import pytest

from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import sft, shapes, shapes_tasks
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import engine, instruct
from tests.helpers import RecordingSampler


@pytest.fixture(scope="module")
def vocab():
  texts = [shapes.scene("train", i).caption() for i in range(300)]
  texts += [s for t in sft.TASKS for i in range(40)
            for s in shapes_tasks.example(t, "train", i).input if isinstance(s, str)]
  return Vocab(train_tokenizer.train(texts, 400), num_sentinels=16, num_image_codes=64)


def codes_of(picture) -> np.ndarray:
  """Stand-in codes of a picture: 4 codes that name it."""
  return (np.arange(4) + hash(picture) % 64) % 64


@pytest.mark.parametrize("task", sft.TASKS)
def test_each_task_prompts_with_its_templates_training_prefix(vocab, task):
  record = shapes_tasks.example(task, "validation", 2)
  tokens, start = sft.encode(vocab, record, codes_of)
  segments = [s if isinstance(s, str) else codes_of(s) for s in record.input]
  np.testing.assert_array_equal(instruct.prompt(vocab, segments), tokens[:start])


def test_edit_runs_full_image_only_and_unconditional_streams(vocab):
  sampler = RecordingSampler(vocab)
  codes = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
  instructions = ["make the red circle blue", "move the green diamond to the left"]
  made = instruct.edit(sampler, codes, instructions, jax.random.PRNGKey(0), s_img=1.5, s_txt=7.5)
  assert made.shape == (2, 4)
  P, s0, s1, brk = sft.EDIT_PROMPT, vocab.sentinel(0), vocab.sentinel(1), vocab.break_id
  for request, c, words in zip(sampler.requests, codes, instructions):
    head = list(vocab.encode_document([P])) + [brk]
    image = list(vocab.image_tokens(c))
    assert request.prompt.tolist() == head + image + [brk] + vocab.encode_text(words) + [brk]
    assert request.image_prompt.tolist() == head + image + [brk, s0, brk]
    assert request.uncond_prompt.tolist() == head + [s0, brk, s1, brk]
    assert (request.guidance, request.image_guidance) == (7.5, 1.5)


def test_guided_generation_masks_its_conditions(vocab):
  sampler = RecordingSampler(vocab)
  maps = np.array([[1, 2, 3, 4]])
  instruct.seg2image(sampler, maps, ["a small red circle on the left"], jax.random.PRNGKey(0),
                     guidance=3.0)
  (request,) = sampler.requests
  assert request.guidance == 3.0
  assert request.uncond_prompt.tolist() == instruct.prompt(
      vocab, [sft.SEG2IMAGE_PROMPT, None, None]).tolist()
  assert request.uncond_prompt.tolist()[-4:] == [vocab.sentinel(0), vocab.break_id,
                                                 vocab.sentinel(1), vocab.break_id]
  sampler = RecordingSampler(vocab)
  objects = [[("red circle", [1, 9, 17, 25])]]
  instruct.grounded(sampler, ["a small red circle on the left"], objects, 4,
                    jax.random.PRNGKey(0), guidance=3.0)
  (request,) = sampler.requests
  assert request.uncond_prompt.tolist() == [EOS, vocab.sentinel(0), vocab.break_id]
  assert vocab.decode_text(request.prompt[1:-1]) == sft.grounded_text(
      "a small red circle on the left", objects[0])
  sampler = RecordingSampler(vocab)
  instruct.grounded(sampler, ["a"], [[]], 4, jax.random.PRNGKey(0))
  assert sampler.requests[0].uncond_prompt is None


def test_the_scales_default_to_no_guidance(vocab):
  """The paper's scales (s_img 1.5, s_txt 7.5; CFG 3) ruin the tiny model's images
  (benchmarks/RESULTS.md): the library's defaults are 1, none."""
  sampler, key = RecordingSampler(vocab), jax.random.PRNGKey(0)
  instruct.edit(sampler, np.array([[1, 2, 3, 4]]), ["make the red circle blue"], key)
  instruct.seg2image(sampler, np.array([[1, 2, 3, 4]]), ["a small red circle"], key)
  edit, seg2image = sampler.requests
  assert (edit.guidance, edit.image_guidance) == (1.0, 1.0)
  assert seg2image.guidance == 1.0 and seg2image.uncond_prompt is None


class TextSampler(RecordingSampler):
  """Writes `text` (then </s>) for every text request."""

  def __init__(self, vocab, text):
    super().__init__(vocab)
    self.text = text

  def generate(self, requests, num_new, mode, sampling_config):
    self.requests.extend(requests)
    ids = (self.vocab.encode_text(self.text) + [EOS] * num_new)[:num_new]
    return np.tile(np.array(ids, np.int32), (len(requests), 1))


def test_vqa_reads_the_answer_segment_and_caption_the_text(vocab):
  codes = np.array([[1, 2, 3, 4]])
  sampler = TextSampler(vocab, "Answer: two.")
  assert instruct.vqa(sampler, codes, ["how many objects are there?"],
                      jax.random.PRNGKey(0)) == ["two"]
  assert sampler.requests[0].prompt.tolist() == instruct.prompt(
      vocab, [codes[0], "Question: how many objects are there?"]).tolist()
  assert instruct.vqa(TextSampler(vocab, "two"), codes, ["how many objects are there?"],
                      jax.random.PRNGKey(0)) == [""]
  sampler = TextSampler(vocab, "a small red circle on the left")
  assert instruct.caption(sampler, codes, jax.random.PRNGKey(0)) == [
      "a small red circle on the left"]
  assert sampler.requests[0].prompt.tolist()[-1] == vocab.break_id
  with pytest.raises(ValueError):
    instruct.vqa(sampler, codes, ["one?", "two?"], jax.random.PRNGKey(0))


def test_instruct_guided_edit_through_the_real_sampler(vocab):
  """With s_img = s_txt = 1 instruct guidance is the full stream alone: the edit equals greedy
  decoding of the full prompt without guidance."""
  from tests.test_sampling import model_config, random_params
  cfg = model_config(vocab)
  sampler = engine.Sampler(cfg, random_params(cfg, 4), vocab)
  codes = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
  instructions = ["make the red circle blue", "remove the green diamond"]
  greedy = engine.SamplingConfig(greedy=True)
  edited = instruct.edit(sampler, codes, instructions, jax.random.PRNGKey(0), 1.0, 1.0, greedy)
  alone = sampler.generate([engine.Request(instruct.prompt(vocab, [sft.EDIT_PROMPT, c, i]),
                                             jax.random.PRNGKey(0))
                            for c, i in zip(codes, instructions)], 4, "image", greedy)
  np.testing.assert_array_equal(edited, vocab.image_codes(alone))
  image_only = instruct.edit(sampler, codes, instructions, jax.random.PRNGKey(0), 1.0, 0.0,
                             greedy)
  masked = sampler.generate([engine.Request(instruct.prompt(vocab, [sft.EDIT_PROMPT, c, None]),
                                              jax.random.PRNGKey(0)) for c in codes], 4, "image",
                            greedy)
  np.testing.assert_array_equal(image_only, vocab.image_codes(masked))
