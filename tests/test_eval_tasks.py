"""Scoring the SFT tasks: outputs right by construction score 1, outputs that miss the asked
change or answer score 0, and each task decodes one output per record."""

import dataclasses

import jax
import numpy as np
import pytest

from cm3jax import eval_tasks, train_tokenizer
from cm3jax.data import sft, shapes, shapes_tasks
from cm3jax.vocab import Vocab
from tests.helpers import RecordingSampler


class StoreTokenizer:
  """Stands in for a VQGAN without loss: an image's code is its index in a store."""

  @dataclasses.dataclass
  class Config:
    tokens_per_image: int = 1

  def __init__(self):
    self.cfg, self.images = self.Config(), []

  def encode(self, images):
    first = len(self.images)
    self.images.extend(images)
    return np.arange(first, first + len(images))[:, None] % 64

  def decode(self, codes):
    return np.stack([self.images[int(c[0])] for c in codes])


def records(task, n=24):
  return [shapes_tasks.example(task, "validation", i) for i in range(n)]


@pytest.mark.parametrize("task", sft.TASKS)
def test_the_expected_outputs_are_judged_right(task):
  vqgan, made = StoreTokenizer(), None
  rs = records(task)
  made = eval_tasks.expected(vqgan, task, rs)
  assert eval_tasks.judge(vqgan, task, rs, made).all()


def test_outputs_that_miss_the_asked_change_or_answer_are_judged_wrong():
  vqgan = StoreTokenizer()
  edits = records("edit")
  unchanged = list(vqgan.encode(np.stack([r.input[1].render() for r in edits])))
  assert not eval_tasks.judge(vqgan, "edit", edits, unchanged).any()
  maps = records("image2seg")
  photos = list(vqgan.encode(np.stack([r.input[1].render() for r in maps])))
  assert not eval_tasks.judge(vqgan, "image2seg", maps, photos).any()
  captions = records("caption")
  shifted = [r.output[0] for r in captions[1:] + captions[:1]]
  assert eval_tasks.judge(vqgan, "caption", captions, shifted).mean() < 0.1
  questions = records("vqa")
  wrong = ["purple" if sft.answer_of(r.output[0]) != "purple" else "red" for r in questions]
  assert not eval_tasks.judge(vqgan, "vqa", questions, wrong).any()
  with pytest.raises(ValueError, match="23 outputs for 24 records"):
    eval_tasks.judge(vqgan, "vqa", questions, wrong[1:])


@pytest.mark.parametrize("task", sft.TASKS)
def test_each_task_decodes_one_output_per_record(task):
  texts = [s for t in sft.TASKS for i in range(30)
           for s in shapes_tasks.example(t, "train", i).input if isinstance(s, str)]
  vocab = Vocab(train_tokenizer.train(texts + [shapes.scene("train", i).caption()
                                               for i in range(200)], 400),
                num_sentinels=16, num_image_codes=64)
  sampler, rs = RecordingSampler(vocab), records(task, 5)
  made = eval_tasks.outputs(sampler, StoreTokenizer(), task, rs, jax.random.PRNGKey(0))
  assert len(made) == len(sampler.requests) == 5
  if task in eval_tasks.IMAGE_OUTPUTS:
    assert all(m.shape == (1,) for m in made)
  else:
    assert all(isinstance(m, str) for m in made)
  if task == "edit":
    for request, r in zip(sampler.requests, rs):
      assert vocab.encode_text(r.input[2]) == request.prompt[-1 - len(
          vocab.encode_text(r.input[2])):-1].tolist()
