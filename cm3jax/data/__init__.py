"""Training data sources. Each yields this host's rows of every global batch as numpy arrays:
`inputs`, `targets` (int32 [rows, seq_len]) and `weights` (float32 [rows, seq_len])."""

from typing import Iterator, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.data import synthetic

SOURCES = {"synthetic": synthetic.batches}
SPLITS = ("train", "validation")


def batches(config, split: str, start_step: int, seed: Sequence[int], host_rows: slice
            ) -> Iterator[dict[str, np.ndarray]]:
  """Batches from step `start_step` on; the same (seed, split, step) always gives the same batch,
  so a resumed run sees exactly the data it would have seen."""
  if config.data not in SOURCES:
    raise ConfigError(f"data={config.data!r} is not one of {sorted(SOURCES)}")
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  return SOURCES[config.data](config, split, start_step, seed, host_rows)
