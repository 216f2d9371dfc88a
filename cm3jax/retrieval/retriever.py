"""A CLIP with its text tokenizer, ready to embed images, texts and documents.

Three sources: a `cm3jax.train_retriever` workdir (its newest checkpoint and the sentencepiece
model beside it), a Hugging Face CLIPModel directory, or an OpenAI / open_clip state dict (both
tokenized with CLIP's BPE). A document's vector is the mean of its L2-normalised text and image
embeddings, normalised again (CM3Leon §2.1; docs/design.md, "Retrieval").
"""

import dataclasses
import functools
import os
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, files, provenance
from cm3jax.retrieval import bpe, clip, clip_io

TOKENIZER_FILE = "tokenizer.model"  # in a train_retriever workdir


class SentencePieceText:
  """texts -> int32 [B, context_length]: the pieces, then the end-of-text id (one past the
  sentencepiece vocabulary, so it is also the highest id), zero-padded; a longer text is cut so
  that it still ends with it."""

  def __init__(self, model: bytes):
    self.processor = spm.SentencePieceProcessor(model_proto=model)
    self.eot_id = self.processor.get_piece_size()
    self.vocab_size = self.eot_id + 1

  def __call__(self, texts: Sequence[str], context_length: int) -> np.ndarray:
    tokens = np.zeros((len(texts), context_length), np.int32)
    for row, ids in enumerate(self.processor.encode(list(texts))):
      ids = ids[:context_length - 1] + [self.eot_id]
      tokens[row, :len(ids)] = ids
    return tokens


@dataclasses.dataclass
class Retriever:
  cfg: clip.ClipConfig
  params: dict
  tokenize: Callable[[Sequence[str], int], np.ndarray]
  source: str  # where it was loaded from, in words
  path: str = ""  # the path `load` takes, "" for one made in memory

  def __post_init__(self):
    model = clip.CLIP(self.cfg)
    self._params = jax.tree.map(jnp.asarray, self.params)
    self._image = jax.jit(lambda p, x: clip.l2_normalize(
        model.apply({"params": p}, x, method="encode_image")))
    self._text = jax.jit(lambda p, t: clip.l2_normalize(
        model.apply({"params": p}, t, method="encode_text")))

  @functools.cached_property
  def fingerprint(self) -> str:
    """Names these weights: a memory bank records it (with `towers`), and refuses another
    retriever's queries."""
    return provenance.params_fingerprint(self.params)

  @property
  def towers(self) -> dict:
    """What runs the weights that a state dict does not record: the same weights with other
    heads or another activation embed otherwise."""
    return {"retriever_head_width": self.cfg.text_width // self.cfg.text_heads,
            "retriever_activation": self.cfg.activation}

  def embed_images(self, images_uint8: np.ndarray) -> np.ndarray:
    """float32 [B, E], L2-normalised, of uint8 RGB images [B, S, S, 3] at the tower's size."""
    size = self.cfg.image_size
    if images_uint8.shape[1:] != (size, size, 3):
      raise ConfigError(f"the retriever takes {size}x{size} RGB images; got "
                        f"{images_uint8.shape[1:]}")
    return np.asarray(self._image(self._params, clip.normalize_pixels(self.cfg, images_uint8)))

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [B, E], L2-normalised."""
    return self.embed_tokens(self.tokenize(texts, self.cfg.context_length))

  def embed_tokens(self, tokens_BxC: np.ndarray) -> np.ndarray:
    """float32 [B, E], L2-normalised, of tokenized texts (`tokenize`)."""
    return np.asarray(self._text(self._params, tokens_BxC))

  def image_text_scores(self, texts: Sequence[str], images_uint8: np.ndarray) -> np.ndarray:
    """float32 [B]: the cosine similarity of each image to its text (CLIP's score)."""
    if len(texts) != len(images_uint8):
      raise ConfigError(f"{len(texts)} texts for {len(images_uint8)} images")
    return np.sum(self.embed_texts(texts) * self.embed_images(images_uint8), axis=-1)

  def embed_documents(self, texts: Sequence[str], images_uint8: np.ndarray) -> np.ndarray:
    """float32 [B, E]: the mean of each pair's text and image embeddings, normalised again."""
    mean = 0.5 * (self.embed_texts(texts) + self.embed_images(images_uint8))
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def load(path: str, head_width: int = 64, activation: str = "") -> Retriever:
  """A retriever from a train_retriever workdir, a Hugging Face directory or a state dict
  (`head_width` and `activation`: `clip_io.load`'s, for what a state dict does not record)."""
  if files.isdir(checkpoint.directory(path)):
    step = checkpoint.latest_step(path)
    saved = checkpoint.saved_config(path, step)
    if "clip" not in saved:
      raise ConfigError(f"{path} is not a cm3jax.train_retriever workdir (its config has no clip "
                        "section)")
    cfg = clip.ClipConfig.from_dict(saved["clip"])
    abstract = jax.eval_shape(lambda: nn.unbox(clip.init_params(cfg, jax.random.PRNGKey(0))))
    params = checkpoint.restore_params(path, step, abstract, host=True)
    tokenize = SentencePieceText(files.read_bytes(os.path.join(path, TOKENIZER_FILE)))
    return Retriever(cfg, params, tokenize, f"cm3jax retriever {path} (step {step})",
                     files.absolute(path))
  cfg, params = clip_io.load(path, head_width, activation)
  return Retriever(cfg, params, bpe.ClipBPE(), f"CLIP {path}", files.absolute(path))
