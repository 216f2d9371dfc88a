"""Instruction-tuning records (CM3Leon §4; docs/design.md, "Instruction tuning").

A record is a task name and two runs of segments, the input and then the output; a segment is
text or an image. Its document is `</s> input_1 <break> ... <break> output_1 ...`, the form of
every cm3jax document, so SFT trains with the same objective as pretraining; the output starts
after the `<break>` that ends the input (`encode` returns where, for `sft.loss_on="output"`).

The templates of CM3Leon's task mixture are functions that build records; an image argument is
whatever the caller later encodes (codes, a path, a `shapes_tasks.Picture`). Captioning and VQA
put the image first: the paper's templates end with the image, which a causal decoder could only
answer from by infilling.

Users' own data is JSONL, one record per line: {"task": NAME, "input": [ITEM, ...], "output":
[ITEM, ...]} where an item is a string (text) or {"image": PATH}. `read_jsonl` keeps the good
lines and counts the bad ones by reason (not UTF-8, not JSON, nested too deeply, a lone surrogate
escape in a string, not a record).
"""

import collections
import dataclasses
import json
from typing import Any, Callable, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.core.vocab import Vocab

EDIT_PROMPT = "Edit first image following the instruction"
SEG2IMAGE_PROMPT = "Make high quality image from segmentation map features"
SEGMENTATION_PROMPT = "Make segmentation map of the given picture"
CAPTION_PROMPT = "Describe the given picture."


@dataclasses.dataclass(frozen=True)
class Record:
  task: str
  input: tuple  # segments: str (text) or an image
  output: tuple

  def __post_init__(self):
    if not self.input or not self.output:
      raise ConfigError(f"a {self.task!r} record needs an input and an output segment")


@dataclasses.dataclass(frozen=True)
class ImagePath:
  """An image of a JSONL record, by its file."""
  path: str


def edit(image: Any, instruction: str, edited: Any) -> Record:
  """`Edit first image following the instruction <break> {image} <break> {instruction} <break>
  {edited}`."""
  return Record("edit", (EDIT_PROMPT, image, instruction), (edited,))


def grounded_text(caption: str, objects: Sequence[tuple[str, Sequence[int]]]) -> str:
  """`Generate high quality image of {caption} with segmentations {obj} at {box}, ...`; a box is
  `x0 y0 x1 y1` in pixels."""
  where = ", ".join(f"{name} at {' '.join(str(int(v)) for v in box)}" for name, box in objects)
  return f"Generate high quality image of {caption} with segmentations {where}"


def grounded(caption: str, objects: Sequence[tuple[str, Sequence[int]]], image: Any) -> Record:
  """`{grounded_text} <break> {image}`."""
  return Record("grounded", (grounded_text(caption, objects),), (image,))


def seg2image(segmentation: Any, caption: str, image: Any) -> Record:
  """`Make high quality image from segmentation map features <break> {map} <break> {caption}
  <break> {image}` (the paper's structure-guided template)."""
  return Record("seg2image", (SEG2IMAGE_PROMPT, segmentation, caption), (image,))


def image2seg(image: Any, segmentation: Any) -> Record:
  """`Make segmentation map of the given picture <break> {image} <break> {map}`."""
  return Record("image2seg", (SEGMENTATION_PROMPT, image), (segmentation,))


def caption(image: Any, text: str) -> Record:
  """`{image} <break> Describe the given picture. <break> {caption}`."""
  return Record("caption", (image, CAPTION_PROMPT), (text,))


def vqa(image: Any, question: str, answer: str) -> Record:
  """`{image} <break> Question: {question} <break> Answer: {answer}.`: the output is the answer
  segment, which `answer_of` reads back."""
  return Record("vqa", (image, question_text(question)), (f"Answer: {answer}.",))


def text_to_image(text: str, image: Any) -> Record:
  """`{caption} <break> {image}`: the pretraining document. CM3Leon's mixture holds text-to-image
  data; without it, tuning on the other tasks alone unlearns drawing from a caption."""
  return Record("text2image", (text,), (image,))


def question_text(question: str) -> str:
  return f"Question: {question}"


def answer_of(text: str) -> str:
  """The answer in a generated `Answer: {answer}.` segment ('' when it is not of that form)."""
  text = text.strip()
  if not (text.startswith("Answer: ") and text.endswith(".")):
    return ""
  return text[len("Answer: "):-1].strip()


TASKS = ("edit", "grounded", "seg2image", "image2seg", "caption", "vqa", "text2image")


def encode(vocab: Vocab, record: Record, image_codes: Callable[[Any], np.ndarray]
           ) -> tuple[np.ndarray, int]:
  """(the record's document tokens int32 [L], the index of its first output token)."""
  def segment(s):
    return s if isinstance(s, str) else np.asarray(image_codes(s))
  inputs = [segment(s) for s in record.input]
  tokens = vocab.encode_document(inputs + [segment(s) for s in record.output])
  return tokens, len(vocab.encode_document(inputs)) + 1  # + the <break> before the output


def _text(value: str) -> str:
  """`value`, refused when it holds a lone surrogate (JSON's "\\ud800"), which UTF-8 cannot
  encode."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError("text with a lone surrogate") from None
  return value


def _item(value) -> Any:
  if isinstance(value, str):
    return _text(value)
  if isinstance(value, dict) and set(value) == {"image"} and isinstance(value["image"], str):
    return ImagePath(_text(value["image"]))
  raise ValueError("an item is text or {\"image\": PATH}")


def parse_line(line: str) -> Record:
  """One JSONL line as a record; ValueError (its reason) for a bad line."""
  try:
    row = json.loads(line)
  except RecursionError:
    raise ValueError("nested too deeply") from None
  except ValueError:  # a JSONDecodeError, or an integer of over 4300 digits
    raise ValueError("not JSON") from None
  if not isinstance(row, dict) or set(row) != {"task", "input", "output"}:
    raise ValueError("not an object of task, input and output")
  if not isinstance(row["task"], str) or not row["task"]:
    raise ValueError("task is not a name")
  _text(row["task"])
  if not isinstance(row["input"], list) or not isinstance(row["output"], list):
    raise ValueError("input or output is not a list")
  if not row["input"] or not row["output"]:
    raise ValueError("empty input or output")
  return Record(row["task"], tuple(map(_item, row["input"])), tuple(map(_item, row["output"])))


def read_jsonl(path: str) -> tuple[list[Record], collections.Counter]:
  """The good records of a JSONL file, and the bad lines counted by reason (blank lines are
  neither)."""
  records, bad = [], collections.Counter()
  try:
    with files.open_file(path, "rb") as f:
      for line in f:
        try:
          line = line.decode("utf-8")
        except UnicodeDecodeError:
          bad["not UTF-8"] += 1
          continue
        if not line.strip():
          continue
        try:
          records.append(parse_line(line))
        except ValueError as e:
          bad[str(e)] += 1
  except OSError as e:
    raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
  return records, bad

