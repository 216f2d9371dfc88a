"""CLIP's byte-level BPE, for the text of imported OpenAI, open_clip and Hugging Face CLIPs.

The merges are the 16e6 vocabulary file that open_clip ships inside its package (found without
importing open_clip). Text is cleaned as CLIP cleans it (ftfy, HTML unescaping, collapsed
whitespace, lower case), split by CLIP's pattern, each word's UTF-8 bytes mapped to printable
characters and merged pair by pair in the file's order; a word ends with `</w>`. Ids: the 256
byte characters (the printable ones first), their 256 `</w>` forms, one per merge, then
`<start_of_text>` and `<end_of_text>`. As in open_clip's SimpleTokenizer, those two strings in
a text (in any case) are their special tokens, not text; OpenAI's `<|startoftext|>` spelling is
plain text.
"""

import functools
import gzip
import html
import importlib.util
import os
from typing import Optional, Sequence

import ftfy
import numpy as np
import regex

from cm3jax.config import ConfigError
from cm3jax.core import files

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # of the file's lines, after its header line
SOT, EOT = "<start_of_text>", "<end_of_text>"
PATTERN = regex.compile(
    rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE)


def open_clip_file(name: str) -> str:
  """The path of a file that the open_clip package ships (found without importing open_clip)."""
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError(f"{name} comes with open_clip: pip install -r requirements-export.txt")
  return os.path.join(list(spec.submodule_search_locations)[0], name)


@functools.lru_cache(maxsize=None)
def byte_characters() -> tuple[str, ...]:
  """A printable character for each byte value: printable Latin-1 bytes stand for themselves,
  the others take the characters from 256 on, in byte order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return tuple(table[b] for b in range(256))


def clean(text: str) -> str:
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return " ".join(text.split()).lower()


class ClipBPE:
  """texts -> int32 [B, context_length]: `<start_of_text>` pieces `<end_of_text>`, zero-padded;
  a longer text is cut so that it still ends with `<end_of_text>` (open_clip's rule)."""

  def __init__(self, vocab_file: Optional[str] = None):
    path = vocab_file or open_clip_file(VOCAB_FILE)
    if not files.exists(path):
      raise ConfigError(f"no CLIP BPE vocabulary at {path}")
    lines = gzip.decompress(files.read_bytes(path)).decode("utf-8").split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = sorted(byte_characters(), key=lambda c: (ord(c) >= 256, ord(c)))
    pieces = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    self.ids = {p: i for i, p in enumerate(pieces)}
    self.rank = {m: i for i, m in enumerate(merges)}
    self.sot_id, self.eot_id = self.ids[SOT], self.ids[EOT]
    self.vocab_size = len(pieces)
    self._cache = {SOT: [SOT], EOT: [EOT]}  # whole pieces, as open_clip's cache holds them

  def _merge(self, word: str) -> list[str]:
    if word in self._cache:
      return self._cache[word]
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
      pairs = [(self.rank.get(p, len(self.rank)), i)
               for i, p in enumerate(zip(symbols, symbols[1:]))]
      best, at = min(pairs)
      if best == len(self.rank):
        break
      first, second = symbols[at], symbols[at + 1]
      merged, i = [], 0
      while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(symbols[i])
          i += 1
      symbols = merged
    self._cache[word] = symbols
    return symbols

  def encode(self, text: str) -> list[int]:
    """The ids of a text's pieces, without the start and end tokens."""
    chars = byte_characters()
    out = []
    for word in PATTERN.findall(clean(text)):
      mapped = "".join(chars[b] for b in word.encode("utf-8"))
      out.extend(self.ids[p] for p in self._merge(mapped))
    return out

  def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
    tokens = np.zeros((len(texts), context_length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_id] + self.encode(text)[:context_length - 2] + [self.eot_id]
      tokens[row, :len(ids)] = ids
    return tokens
