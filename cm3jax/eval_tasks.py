"""Scoring the instruction-tuned tasks on the shapes task suite (`data.shapes_tasks`).

An output counts as right when it is exactly the record's truth: a generated picture when the
pixel analyser reads the scene of the record's output picture (an edit must make the asked
change and nothing else: the whole scene is compared), a caption when it describes the scene,
an answer when it equals the record's. `outputs` decodes a model's outputs, `expected` gives the
outputs that are right by construction (the VQGAN codes of each output picture, the record's
text), whose score is the task's ceiling, and `judge` tells which outputs are right.
"""

from typing import Sequence, Union

import jax
import numpy as np

from cm3jax import eval_shapes, instruct
from cm3jax.data import sft, shapes, shapes_tasks
from cm3jax.sampling import Sampler
from cm3jax.vqgan.tokenizer import ImageTokenizer

Output = Union[np.ndarray, str]  # image codes [T], or text
IMAGE_OUTPUTS = ("edit", "grounded", "seg2image", "image2seg")


def _pictures(records: Sequence[sft.Record], index: int) -> list[shapes_tasks.Picture]:
  """The `index`-th picture segment of each record's input."""
  return [[s for s in r.input if isinstance(s, shapes_tasks.Picture)][index] for r in records]


def _codes(vqgan: ImageTokenizer, pictures: Sequence[shapes_tasks.Picture]) -> np.ndarray:
  return vqgan.encode(np.stack([p.render() for p in pictures]))


def outputs(sampler: Sampler, vqgan: ImageTokenizer, task: str, records: Sequence[sft.Record],
            key: jax.Array) -> list[Output]:
  """The model's output for each record of `task`, decoded as `instruct` decodes the task."""
  if task == "edit":
    codes = _codes(vqgan, _pictures(records, 0))
    return list(instruct.edit(sampler, codes, [r.input[2] for r in records], key))
  T = vqgan.cfg.tokens_per_image
  if task == "grounded":
    scenes = [r.output[0].scene for r in records]
    return list(instruct.grounded(sampler, [s.caption() for s in scenes],
                                  [shapes_tasks.boxes(s) for s in scenes], T, key))
  if task == "seg2image":
    return list(instruct.seg2image(sampler, _codes(vqgan, _pictures(records, 0)),
                                   [r.input[2] for r in records], key))
  if task == "image2seg":
    return list(instruct.image2seg(sampler, _codes(vqgan, _pictures(records, 0)), key))
  if task == "caption":
    return instruct.caption(sampler, _codes(vqgan, _pictures(records, 0)), key)
  if task == "vqa":
    return instruct.vqa(sampler, _codes(vqgan, _pictures(records, 0)),
                        [r.input[1][len("Question: "):] for r in records], key)
  raise ValueError(f"task {task!r} is not one of {list(sft.TASKS)}")


def expected(vqgan: ImageTokenizer, task: str, records: Sequence[sft.Record]) -> list[Output]:
  """Outputs right by construction: the codes of each output picture, or the record's text."""
  if task in IMAGE_OUTPUTS:
    return list(_codes(vqgan, [r.output[0] for r in records]))
  if task == "vqa":
    return [sft.answer_of(r.output[0]) for r in records]
  return [r.output[0] for r in records]


def judge(vqgan: ImageTokenizer, task: str, records: Sequence[sft.Record],
          made: Sequence[Output]) -> np.ndarray:
  """bool [len(records)]: which outputs are right."""
  if len(made) != len(records):
    raise ValueError(f"{len(made)} outputs for {len(records)} records")
  if task in IMAGE_OUTPUTS:
    images = vqgan.decode(np.stack(made))
    return np.array([eval_shapes.analyse(image) == shapes.described(r.output[0].drawn())
                     for image, r in zip(images, records)])
  if task == "caption":
    return np.array([eval_shapes.caption_matches(text, shapes.described(r.input[0].scene))
                     for text, r in zip(made, records)])
  return np.array([answer == sft.answer_of(r.output[0]) for answer, r in zip(made, records)])

