"""Train the sentencepiece text tokenizer of the multimodal vocabulary (docs/design.md,
"Vocabulary").

The library of `python -m cm3jax.train_tokenizer` (cm3jax/train_tokenizer.py)."""

import collections
import io
import os
from typing import Iterable, Iterator

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.core.vocab import BOS, EOS, PAD, UNK


def train(sentences: Iterable[str], vocab_size: int, model_type: str = "unigram") -> bytes:
  """A serialised sentencepiece model with cm3jax's special ids, trained on `sentences`."""
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise ConfigError(f"model_type={model_type!r} is not one of ['unigram', 'bpe']")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        hard_vocab_limit=False, model_type=model_type, bos_id=BOS, pad_id=PAD, eos_id=EOS, unk_id=UNK,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        input_sentence_size=10_000_000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise ConfigError(f"sentencepiece: {str(e).strip().splitlines()[-1]}") from None
  return model.getvalue()


def read_sentences(source: str, skipped: collections.Counter, data_dir: str = "") -> Iterator[str]:
  """The sentences of --input; empty and non-UTF-8 ones are counted in `skipped` and left out."""
  for raw in _raw_sentences(source, data_dir):
    try:
      text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
      skipped["not UTF-8"] += 1
      continue
    text = text.rstrip("\r\n")
    if not text.strip():
      skipped["empty"] += 1
      continue
    yield text


def _raw_sentences(source: str, data_dir: str) -> Iterator[bytes]:
  if source.startswith("tfds:"):
    from cm3jax.data import text_corpus  # TensorFlow is imported by the tfds: inputs only.
    yield from text_corpus.tfds_texts(source[len("tfds:"):], "train", data_dir)[0]
  elif files.isdir(source):
    from cm3jax.data import code_shards
    yield from code_shards.captions(code_shards.shard_paths(source, "train"))
  else:
    from cm3jax.data import text_corpus
    paths = sorted({p for pattern in source.split(",") for p in files.glob(pattern)})
    if not paths:
      raise ConfigError(f"--input={source} matches no file")
    for path in paths:
      with files.open_file(path, "rb") as f:
        yield from f


def num_pieces(model: bytes) -> int:
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_proto=model).get_piece_size()
