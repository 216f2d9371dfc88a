"""CM3's document form: images inside HTML, `<img alt="{caption}" src="{codes}">`, where the
codes are image-code tokens (docs/design.md, "HTML documents"). Needs no TensorFlow.

The text around the codes is tokenized in fixed chunks, the same in training documents and in
prompts, so a prompt is exactly a prefix of the documents the model was trained on:

  </s> | <img alt="CAPTION" src=" | codes ... | ">

Text→image prompts with `alt_prompt` and reads the generated codes with `codes_from_tokens`;
CM3's own samples, decoded to text (`src="977 789 ..."`), are read with `codes_from_text`.
Infilling prompts with the page's `<mask>` replaced as CM3 masks: the span moves to the end,
after a sentinel (`infill_prompt`).
"""

import html
import re

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core.vocab import EOS, Vocab

DOCUMENT_FORMS = ("break", "html")  # cm3.document_form: CM3Leon's, or this module's
MASK = "<mask>"
CLOSE = '">'


def opening(caption: str) -> str:
  """`<img alt="CAPTION" src="`, the caption HTML-escaped."""
  return f'<img alt="{html.escape(caption, quote=True)}" src="'


def image_document(vocab: Vocab, caption: str, codes: np.ndarray) -> np.ndarray:
  """`</s> <img alt="caption" src="` codes `">`, int32 token ids."""
  return np.concatenate([alt_prompt(vocab, caption), vocab.image_tokens(np.asarray(codes)),
                         vocab.encode_text(CLOSE)]).astype(np.int32)


def alt_prompt(vocab: Vocab, caption: str) -> np.ndarray:
  """The text→image prompt: `</s> <img alt="caption" src="`."""
  return np.array([EOS] + vocab.encode_text(opening(caption)), np.int32)


def codes_from_tokens(vocab: Vocab, tokens: np.ndarray) -> np.ndarray:
  """The image codes a generated `src` starts with: the leading run of image-code tokens."""
  tokens = np.asarray(tokens)
  is_code = (tokens >= vocab.image_offset) & (tokens < vocab.image_offset + vocab.num_image_codes)
  end = len(tokens) if is_code.all() else int(np.argmin(is_code))
  return tokens[:end] - vocab.image_offset


SRC = re.compile(r'src="([^"]*)')


def codes_from_text(text: str, tokens_per_image: int) -> np.ndarray:
  """The codes of the first `src="..."` in CM3's decoded output (space-separated integers),
  cut or padded to `tokens_per_image` by repeating its last ones, as CM3's own decoding does."""
  found = SRC.search(text)
  if not found:
    raise ConfigError('the text has no src="...": not an <img> of image codes')
  words = found.group(1).split()
  if not words or not all(w.isdigit() for w in words):
    raise ConfigError(f'src="{found.group(1)[:40]}" is not space-separated image codes')
  codes = [int(w) for w in words]
  if len(codes) < tokens_per_image:
    codes += codes[-(tokens_per_image - len(codes)):] * (
        -(-(tokens_per_image - len(codes)) // len(codes)))
  return np.array(codes[:tokens_per_image], np.int64)


def split_mask(page: str) -> tuple[str, str]:
  """(text before, text after) the page's one `<mask>`."""
  count = page.count(MASK)
  if count != 1:
    raise ConfigError(f"a page to infill needs exactly one {MASK}, this one has {count}")
  before, after = page.split(MASK)
  return before, after


def infill_prompt(vocab: Vocab, page: str) -> np.ndarray:
  """`</s> before <sentinel:0> after <sentinel:0>`: the model writes the masked span next, and
  ends it with <eoss>."""
  before, after = split_mask(page)
  s0 = vocab.sentinel(0)
  parts = [[EOS], vocab.encode_text(before) if before else [], [s0],
           vocab.encode_text(after) if after else [], [s0]]
  return np.concatenate(parts).astype(np.int32)
