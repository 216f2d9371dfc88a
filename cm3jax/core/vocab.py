"""The multimodal vocabulary (docs/design.md, "Vocabulary"): one id space for text, specials,
sentinels and image codes.

  [<s>=0 <pad>=1 </s>=2 <unk>=3] [sentencepiece pieces] [<break> <eoss> <sentinel:0..S-1>]
  [image codes 0..C-1] [padding to a multiple of 128]

The sentencepiece model (trained by `cm3jax.train_tokenizer`) owns ids 0..text_size-1, specials
included, so text ids are sentencepiece ids unchanged. A document is `</s> seg <break> seg ...`:
text segments are strings, image segments arrays of codes. The vocabulary is saved beside every
checkpoint, as JSON with the sentencepiece model inside. Needs sentencepiece, not TensorFlow.
"""

import base64
import dataclasses
import functools
import json
from typing import Sequence, Union

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS, PAD, EOS, UNK = 0, 1, 2, 3
PAD_TO = 128

Segment = Union[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Vocab:
  spm_model: bytes = dataclasses.field(repr=False)  # A serialised sentencepiece ModelProto.
  num_sentinels: int
  num_image_codes: int

  def __post_init__(self):
    if self.num_sentinels < 1 or self.num_image_codes < 0:
      raise ConfigError(f"a vocabulary needs sentinels and at least 0 image codes (0: text "
                        f"only); got {self.num_sentinels} sentinels and {self.num_image_codes} "
                        "image codes")
    sp = self.processor
    found = (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id())
    if found != (BOS, PAD, EOS, UNK):
      raise ConfigError(f"the sentencepiece model has <s>, <pad>, </s>, <unk> at ids {found}; "
                        f"cm3jax needs {(BOS, PAD, EOS, UNK)}: train it with cm3jax.train_tokenizer")

  @functools.cached_property
  def processor(self):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_proto=self.spm_model)

  @property
  def text_size(self) -> int:
    """Ids below this are sentencepiece's: the 4 specials and the text pieces."""
    return self.processor.get_piece_size()

  @property
  def break_id(self) -> int:
    return self.text_size

  @property
  def eoss_id(self) -> int:
    return self.text_size + 1

  @property
  def sentinel_base(self) -> int:
    return self.text_size + 2

  def sentinel(self, i: int) -> int:
    if not 0 <= i < self.num_sentinels:
      raise ConfigError(f"sentinel {i} is not in [0, {self.num_sentinels})")
    return self.sentinel_base + i

  @property
  def image_offset(self) -> int:
    return self.sentinel_base + self.num_sentinels

  @property
  def size(self) -> int:
    """The number of ids, padded to a multiple of 128; the model's vocab_size must be at least this."""
    return -(-(self.image_offset + self.num_image_codes) // PAD_TO) * PAD_TO

  def is_text(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= len(SPECIALS)) & (ids < self.text_size)

  def is_image(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.image_offset) & (ids < self.image_offset + self.num_image_codes)

  def is_sentinel(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.sentinel_base) & (ids < self.image_offset)

  def encode_text(self, text: str) -> list[int]:
    return self.processor.encode(text)

  def decode_text(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not len(SPECIALS) <= i < self.text_size]
    if bad:
      raise ConfigError(f"ids {bad[:5]} are not text pieces (text is {len(SPECIALS)}.."
                        f"{self.text_size - 1})")
    return self.processor.decode(ids)

  def image_tokens(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
      raise ConfigError(f"image codes must be integers; got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= self.num_image_codes):
      raise ConfigError(f"image codes must lie in [0, {self.num_image_codes}); got "
                        f"{codes.min()}..{codes.max()}")
    return codes.astype(np.int32) + self.image_offset

  def image_codes(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if not np.all(self.is_image(ids)):
      raise ConfigError("not every id is an image code")
    return (ids - self.image_offset).astype(np.int32)

  def encode_document(self, segments: Sequence[Segment]) -> np.ndarray:
    """`</s> seg_1 <break> seg_2 ...`: strings become text pieces, integer arrays image codes."""
    if not segments:
      raise ConfigError("a document needs at least one segment")
    out = [EOS]
    for i, segment in enumerate(segments):
      if i:
        out.append(self.break_id)
      if isinstance(segment, str):
        out.extend(self.encode_text(segment))
      elif len(segment) == 0:
        raise ConfigError("an image segment needs at least one code")
      else:
        out.extend(self.image_tokens(segment).tolist())
    return np.asarray(out, np.int32)

  def decode_document(self, ids) -> list[Segment]:
    """The inverse of `encode_document`."""
    ids = np.asarray(ids)
    if len(ids) == 0 or ids[0] != EOS:
      raise ConfigError("a document starts with </s>")
    segments, start = [], 1
    for end in [*np.flatnonzero(ids == self.break_id), len(ids)]:
      part = ids[start:end]
      if len(part) and np.all(self.is_image(part)):
        segments.append(self.image_codes(part))
      else:
        segments.append(self.decode_text(part))
      start = end + 1
    return segments

  def check_fits(self, model_vocab_size: int, source: str = "the vocabulary"):
    """A ConfigError unless a model with `model_vocab_size` embedding rows has an id for each of
    this vocabulary's."""
    if self.size > model_vocab_size:
      raise ConfigError(f"model.vocab_size={model_vocab_size} is smaller than {source} "
                        f"({self.describe()})")

  def describe(self) -> str:
    return (f"{self.size} ids: {self.text_size - len(SPECIALS)} text pieces, 4 specials, <break>, "
            f"<eoss>, {self.num_sentinels} sentinels, {self.num_image_codes} image codes from "
            f"{self.image_offset}")

  def to_json(self) -> dict:
    """The vocabulary as JSON: the model (base64) and, for readers in other languages, the layout."""
    return {"spm_model": base64.b64encode(self.spm_model).decode("ascii"),
            "num_sentinels": self.num_sentinels, "num_image_codes": self.num_image_codes,
            "layout": {"specials": dict(zip(SPECIALS, range(4))), "text_size": self.text_size,
                       "break": self.break_id, "eoss": self.eoss_id,
                       "sentinels": [self.sentinel_base, self.image_offset - 1],
                       "image_offset": self.image_offset, "size": self.size}}

  @classmethod
  def from_json(cls, fields: dict) -> "Vocab":
    try:
      return cls(base64.b64decode(fields["spm_model"]), int(fields["num_sentinels"]),
                 int(fields["num_image_codes"]))
    except (KeyError, TypeError, ValueError) as e:
      raise ConfigError(f"not a cm3jax vocabulary: {e}") from None

  def save(self, path: str):
    files.write_json(path, self.to_json())

  @classmethod
  def load(cls, path: str) -> "Vocab":
    try:
      return cls.from_json(files.read_json(path))
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigError(f"cannot read the vocabulary {path}: {e}") from None

  @classmethod
  def from_spm_file(cls, path: str, num_sentinels: int, num_image_codes: int) -> "Vocab":
    return cls(read_spm_model(path), num_sentinels, num_image_codes)


def read_spm_model(path: str) -> bytes:
  """A serialised sentencepiece model read from `path`, or a ConfigError naming the file when it
  cannot be read or is not a sentencepiece model."""
  import sentencepiece as spm
  try:
    model = files.read_bytes(path)
  except OSError as e:
    raise ConfigError(f"cannot read the sentencepiece model {path}: {e.strerror}") from None
  try:
    pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size() if model else 0
  except RuntimeError:  # sentencepiece's parse error names only its own source line
    pieces = 0
  if not pieces:
    raise ConfigError(f"{path} is not a sentencepiece model (it does not parse, or holds no "
                      "pieces)")
  return model
