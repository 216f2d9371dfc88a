"""Scoring the SFT tasks: outputs right by construction score 1, outputs that miss the asked
change or answer score 0, and each task decodes one output per record."""

import dataclasses

import jax
import numpy as np
import pytest

from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import sft, shapes, shapes_tasks
from cm3jax.eval import eval_tasks
from cm3jax.prepare import train_tokenizer
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


class NumberingSampler(RecordingSampler):
  """Draws image code k + 1 for its k-th image request, or writes TEXTS[k] (then </s>)."""
  TEXTS = ["Answer: red.", "a small green square", "Answer: two.", "a blue circle at the top",
           "Answer: yes."]

  def generate(self, requests, num_new, mode, sampling_config):
    first = len(self.requests)
    self.requests.extend(requests)
    if mode == "image":
      return np.stack([np.full(num_new, self.vocab.image_offset + k + 1, np.int32)
                       for k in range(first, len(self.requests))])
    rows = [(self.vocab.encode_text(self.TEXTS[k]) + [EOS] * num_new)[:num_new]
            for k in range(first, len(self.requests))]
    return np.array(rows, np.int32)


@pytest.mark.parametrize("task", sft.TASKS)
def test_each_task_decodes_one_output_per_record(task):
  """Each record's request prompts with its training prefix (its input picture's codes are its
  index: StoreTokenizer), and its output is what the sampler made of that request, decoded."""
  texts = [s for t in sft.TASKS for i in range(30)
           for s in shapes_tasks.example(t, "train", i).input if isinstance(s, str)]
  texts += NumberingSampler.TEXTS
  vocab = Vocab(train_tokenizer.train(texts + [shapes.scene("train", i).caption()
                                               for i in range(200)], 400),
                num_sentinels=16, num_image_codes=64)
  sampler, rs = NumberingSampler(vocab), records(task, 5)
  made = eval_tasks.outputs(sampler, StoreTokenizer(), task, rs, jax.random.PRNGKey(0))
  assert len(sampler.requests) == 5
  for i, (request, r) in enumerate(zip(sampler.requests, rs)):
    tokens, start = sft.encode(vocab, r, lambda picture: np.array([i]))
    assert request.prompt.tolist() == tokens[:start].tolist()
  if task in eval_tasks.IMAGE_OUTPUTS:
    assert [m.tolist() for m in made] == [[k + 1] for k in range(5)]
  elif task == "vqa":
    assert made == ["red", "", "two", "", "yes"]  # the answer segment, or nothing
  else:
    assert made == NumberingSampler.TEXTS


def test_the_task_report_records_each_tasks_best_decoding_of_the_run(tmp_path):
  """Each task's decoding with the best mean over the run's own columns (the baseline's are
  not the run's), with the scales that decoding used."""
  workdir = str(tmp_path)
  column = lambda run, split, scores: {"run": run, "split": split, "step": 1000,
                                       "examples": 200, **scores}
  guided = "top-p 0.9, guided"
  runs = {
      f"{workdir}, validation": column(workdir, "validation", {
          "edit, ceiling": 1.0, "edit, greedy": 0.085, f"edit, {guided}": 0.005,
          "grounded, greedy": 0.30, f"grounded, {guided}": 0.45, "vqa, greedy": 0.765}),
      f"{workdir}, test": column(workdir, "test", {
          "edit, ceiling": 1.0, "edit, greedy": 0.05, f"edit, {guided}": 0.0,
          "grounded, greedy": 0.20, f"grounded, {guided}": 0.10, "vqa, greedy": 0.70}),
      "base, validation": column("base", "validation", {
          "edit, greedy": 0.0, f"edit, {guided}": 0.9, "grounded, greedy": 0.9,
          f"grounded, {guided}": 0.0, "vqa, greedy": 0.0})}
  recorded = eval_tasks.sampling_defaults(workdir, runs)
  assert list(recorded) == ["edit", "grounded", "vqa"]
  edit, grounded = recorded["edit"], recorded["grounded"]
  assert (edit.row, edit.report, edit.step) == ("edit, greedy", "eval_tasks.json", 1000)
  assert edit.scores == {f"{workdir}, validation": 0.085, f"{workdir}, test": 0.05}
  assert edit.setting.config.greedy and edit.setting.guidance == edit.setting.image_guidance == 1
  assert grounded.row == f"grounded, {guided}"
  assert (grounded.setting.guidance, grounded.setting.config.top_p) == (3.0, 0.9)
  assert recorded["vqa"].row == "vqa, greedy"
  # The scales recorded are the ones `outputs` decodes with.
  paper = eval_tasks.DECODINGS[guided]
  assert (paper.setting("edit").guidance, paper.setting("edit").image_guidance) == (7.5, 1.5)
  vocab = Vocab(train_tokenizer.train([shapes.scene("train", i).caption() for i in range(200)]
                                      + [sft.EDIT_PROMPT], 300),
                num_sentinels=16, num_image_codes=64)
  sampler = RecordingSampler(vocab)
  eval_tasks.outputs(sampler, StoreTokenizer(), "edit", records("edit", 2),
                     jax.random.PRNGKey(0), paper)
  assert [(r.guidance, r.image_guidance) for r in sampler.requests] == [(7.5, 1.5)] * 2
