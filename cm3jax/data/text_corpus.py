"""Plain-text corpora for `cm3jax.tokenize_text`: each yields (key, document) as bytes. Documents
that are empty or not UTF-8 are counted in `skipped` by reason and left out.

  shapes_text        the built-in corpus, made here: paragraphs of one to three sentences about
                     the shapes scenes (data/shapes.py), so that its test split holds the same
                     unseen colour-shape pairs; a sentence about two things states the relation
                     and then its converse, which a model can only write by reading the first
                     half ("a small red circle above a large blue square, so the large blue
                     square is below the small red circle.")
  files:PATTERN      text files (a glob, sorted; `{split}` replaced by the split's name), documents
                     separated by blank lines (wikitext's raw layout)
  tfds:NAME:FIELD    the text feature FIELD of a TFDS dataset, one document per example

A document longer than `max_chars` characters is cut at whitespace into records of at most
that many (a CM3 document must fit one training row: see cm3jax/data/cm3.py).
"""

import collections
import re
from typing import Iterator, Optional

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.data import shapes

Document = tuple[bytes, bytes]
CONVERSE = {"above": "below", "below": "above", "to the left of": "to the right of",
            "to the right of": "to the left of"}
MAX_SENTENCES = 3
FORMS = "shapes_text, files:PATTERN or tfds:NAME:FIELD"


def shapes_sentence(scene: shapes.Scene) -> str:
  if len(scene.things) == 1:
    return f"there is a {scene.things[0].words()} {scene.place}."
  first, second = (t.words() for t in scene.things)
  return f"a {first} {scene.place} a {second}, so the {second} is {CONVERSE[scene.place]} the {first}."


def shapes_document(split: str, index: int) -> str:
  """Document `index` of a split of shapes_text: a pure function of (split, index)."""
  count = 1 + int(np.random.default_rng([shapes.SPLITS[split][0], index]).integers(MAX_SENTENCES))
  return " ".join(shapes_sentence(shapes.scene(split, MAX_SENTENCES * index + j))
                  for j in range(count))


LEADING_SPACE = re.compile(r"\s*")  # what str.lstrip() strips


def chunks(text: str, max_chars: int) -> list[str]:
  """`text` cut at whitespace into pieces of at most `max_chars` characters (a word longer than
  that is cut inside): each piece ends at the last space or newline that leaves it at most
  `max_chars` long, and the next starts after the whitespace there. Linear in len(text): the
  rest is never copied."""
  pieces, start = [], 0
  while len(text) - start > max_chars:
    end = start + max_chars + 1
    cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
    cut = cut if cut > start else start + max_chars
    pieces.append(text[start:cut])
    start = LEADING_SPACE.match(text, cut).end()
  return pieces + ([text[start:]] if start < len(text) else [])


def documents(dataset: str, split: str, skipped: collections.Counter, data_dir: str = "",
              max_chars: int = 1000) -> tuple[Iterator[Document], Optional[int]]:
  """The records of one split of `dataset` and, where known, how many documents it has."""
  if max_chars < 1:
    raise ConfigError(f"--max_chars={max_chars} must be at least 1")
  kind, _, rest = dataset.partition(":")
  if dataset == "shapes_text":
    if split not in shapes.SPLITS:
      raise ConfigError(f"shapes_text has no split {split!r}; it has {list(shapes.SPLITS)}")
    total = shapes.SPLITS[split][1]
    raw = (shapes_document(split, i).encode() for i in range(total))
  elif kind == "files" and rest:
    raw, total = file_documents(rest.replace("{split}", split)), None
  elif kind == "tfds" and rest:
    raw, total = tfds_texts(rest, split, data_dir)
  else:
    raise ConfigError(f"--dataset={dataset!r} is not one of {FORMS}")
  return _records(raw, split, skipped, max_chars), total


def _records(raw: Iterator[bytes], split: str, skipped: collections.Counter, max_chars: int
             ) -> Iterator[Document]:
  for i, data in enumerate(raw):
    try:
      text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
      skipped["not UTF-8"] += 1
      continue
    if not text:
      skipped["empty"] += 1
      continue
    for j, piece in enumerate(chunks(text, max_chars)):
      yield f"{split}/{i}/{j}".encode(), piece.encode()


def file_documents(pattern: str) -> Iterator[bytes]:
  """The documents of the files `pattern` matches, in name order: separated by one or more blank
  lines."""
  paths = files.glob(pattern)
  if not paths:
    raise ConfigError(f"files:{pattern} matches no file")
  for path in paths:
    yield from re.split(rb"(?:\r?\n[ \t]*){2,}", files.read_bytes(path).strip())


def tfds_texts(name_and_field: str, split: str, data_dir: str) -> tuple[Iterator[bytes], int]:
  """The `FIELD` of every example of a split of the TFDS dataset `NAME:FIELD`, and their count."""
  name, _, field = name_and_field.partition(":")
  if not name or not field:
    raise ConfigError(f"tfds:{name_and_field}: expected tfds:NAME:FIELD, e.g. tfds:shapes:caption")
  from cm3jax.data import image_captions
  builder = image_captions.tfds_builder(name, data_dir)
  import tensorflow_datasets as tfds
  if field not in builder.info.features:
    raise ConfigError(f"{name} has no feature {field!r}; it has {list(builder.info.features)}")
  if split not in builder.info.splits:
    raise ConfigError(f"{name} has no split {split!r}; it has {list(builder.info.splits)}")
  ds = builder.as_dataset(split=split, shuffle_files=False).map(lambda ex: ex[field])
  return tfds.as_numpy(ds), builder.info.splits[split].num_examples
