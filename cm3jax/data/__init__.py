"""Training data sources. A source yields this host's rows of every global batch as numpy arrays:
`inputs`, `targets` (int32 [rows, seq_len]), `weights` (float32 [rows, seq_len]), `position`
(int64 [rows, P]): where each row's data starts, and optionally `positions` and `segments`
(int32 [rows, seq_len]): each token's position in its document and its document's id. A stream
started at a saved position continues exactly, so a resumed run sees the batches it would have
seen.

  synthetic  random walks on a graph (cm3jax/data/synthetic.py); position = (step,)
  cm3        the CM3 stream over image-code shards (cm3jax/data/cm3.py), prepared by
             cm3jax/prepare.py; position = (epoch, index, offset)
"""

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.data import synthetic
from cm3jax.vocab import Vocab

SOURCES = ("synthetic", "cm3")
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Source:
  config: object
  vocab: Optional[Vocab] = None  # The cm3 source's vocabulary,
  codes_dir: Optional[str] = None  # its image-code shards,
  vqgan_workdir: Optional[str] = None  # and the VQGAN that made them.

  def batches(self, split: str, seed: Sequence[int], position: Optional[Sequence[int]] = None,
              host: tuple[int, int] = (0, 1)) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of `split` from `position` (None: the start); host = (index, count)."""
    if split not in SPLITS:
      raise ValueError(f"split {split!r} is not one of {SPLITS}")
    config = self.config
    rows = config.global_batch_size // host[1]
    if config.data == "synthetic":
      step = 0 if position is None else int(position[0])
      return synthetic.batches(config, split, step, seed, slice(host[0] * rows, (host[0] + 1) * rows))
    from cm3jax.data import cm3  # TensorFlow is imported by the cm3 source only.
    return cm3.batches(codes_dir=self.codes_dir, split=split, vocab=self.vocab,
                       seq_len=config.seq_len, rows=rows, seed=seed,
                       position=cm3.START if position is None else cm3.Position(*position),
                       host=host[0], num_hosts=host[1], span_rate=config.cm3.span_rate,
                       whole_segment_rate=config.cm3.whole_segment_rate,
                       shuffle_buffer=config.cm3.shuffle_buffer,
                       document_attention=config.cm3.document_attention)

  def skipped(self) -> dict[str, int]:
    """Documents this process has left out so far, by reason."""
    if self.config.data != "cm3":
      return {}
    from cm3jax.data import cm3
    return dict(cm3.SKIPPED)


def source(config, workdir: str) -> Source:
  """The source `config.data` names; for cm3, its inputs are made first where missing."""
  if config.data not in SOURCES:
    raise ConfigError(f"data={config.data!r} is not one of {list(SOURCES)}")
  if config.data == "synthetic":
    return Source(config)
  from cm3jax import prepare
  return Source(config, *prepare.cm3_inputs(config, workdir))
