"""Retrieved documents for prompts at sampling time: a memory bank with its retriever, its
MIPS index and the documents of the records it embedded.

`Memory.load(BANK)` takes the retriever the bank records (or another path naming the same
weights); `context(vocab, texts, k)` gives, per text, the token prefix of its k retrieved
documents, `</s> text <break> image` each, best first, in the order and form the CM3 stream
trains on (docs/design.md, "Retrieval"). `retriever_score` scores drawn images against their
caption by the retriever, for reranking.
"""

import dataclasses
from typing import Callable, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core.vocab import Vocab
from cm3jax.retrieval import memory, mips, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer


@dataclasses.dataclass
class Memory:
  retriever: retriever.Retriever
  index: mips.Index
  bank: memory.Documents  # the documents of the bank's split, by record index

  @classmethod
  def load(cls, bank: str, retriever_path: str = "", engine: str = "exact",
           head_width: int = 64, activation: str = "") -> "Memory":
    vectors, ids, manifest = memory.load(bank)
    if not retriever_path:  # what a state dict does not record, the bank does
      retriever_path = manifest["retriever_path"]
      head_width = manifest.get("retriever_head_width", head_width)
      activation = manifest.get("retriever_activation", activation)
    r = retriever.load(retriever_path, head_width, activation)
    memory.check_compatible(manifest, bank, r)
    return cls(r, mips.make_index(engine, vectors, ids), memory.Documents(bank, manifest))

  def retrieve(self, texts: list[str], k: int) -> np.ndarray:
    """Record ids [len(texts), k] of the bank's documents nearest each text, best first."""
    return self._search(self.retriever.embed_texts(texts), k)

  def retrieve_by_images(self, images_uint8: np.ndarray, k: int) -> np.ndarray:
    """Record ids [len(images), k] of the bank's documents nearest each image, best first."""
    return self._search(self.retriever.embed_images(images_uint8), k)

  def _search(self, queries_BxE: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
      raise ConfigError(f"retrieve={k}: retrieve at least 1 document (0: no retrieval)")
    return self.index.search(queries_BxE, k)[1]

  def documents(self, vocab: Vocab, ids_BxK: np.ndarray) -> list[np.ndarray]:
    """Per row of record ids, those documents as one token prefix, in the row's order."""
    prefixes = []
    for row in ids_BxK:
      captions, codes = self.bank.get(row[row >= 0])
      if codes.max(initial=0) >= vocab.num_image_codes:
        raise ConfigError(f"the bank's codes reach {codes.max()} but the model has "
                          f"{vocab.num_image_codes} image codes")
      prefixes.append(np.concatenate([
          vocab.encode_document([c.decode("utf-8", "replace"), k])
          for c, k in zip(captions, codes)]).astype(np.int32))
    return prefixes

  def context(self, vocab: Vocab, texts: list[str], k: int) -> list[np.ndarray]:
    """Per text, its k retrieved documents as one token prefix, the best one first."""
    return self.documents(vocab, self.retrieve(texts, k))


def retriever_score(r: retriever.Retriever, vqgan: ImageTokenizer
                    ) -> Callable[[np.ndarray, Sequence[str]], np.ndarray]:
  """The retriever's image-text score of image codes [N, T] for their N captions, for
  `sampling.text_to_image_reranked` (CM3Leon reranks its samples with CLIP)."""
  return lambda codes_NxT, captions: r.image_text_scores(captions, vqgan.decode(codes_NxT))
