"""Synthetic token batches: random walks on a fixed random graph over the vocabulary.

Every token has BRANCHING successors, drawn once from the seed; each row starts at a random token
and moves to a uniformly chosen successor at every position. A model that learns the graph drives
the loss from ln(vocab_size) down to ln(BRANCHING), so a smoke run shows real learning; benchmarks
use the same stream because real data would only add input-pipeline time.
"""

from typing import Iterator, Sequence

import numpy as np

BRANCHING = 4
SPLIT_IDS = {"train": 0, "validation": 1}


def successor_table(seed: Sequence[int], vocab_size: int) -> np.ndarray:
  rng = np.random.default_rng([*seed, vocab_size])
  return rng.integers(0, vocab_size, size=(vocab_size, BRANCHING), dtype=np.int32)


def batch(table: np.ndarray, seed: Sequence[int], split: str, step: int, rows: int, seq_len: int
          ) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([*seed, SPLIT_IDS[split], step])
  choice_BxT = rng.integers(0, BRANCHING, size=(rows, seq_len + 1))
  walk_BxT = np.empty((rows, seq_len + 1), np.int32)
  walk_BxT[:, 0] = rng.integers(0, len(table), size=rows)
  for t in range(1, seq_len + 1):
    walk_BxT[:, t] = table[walk_BxT[:, t - 1], choice_BxT[:, t]]
  return {
      "inputs": walk_BxT[:, :-1],
      "targets": walk_BxT[:, 1:],
      "weights": np.ones((rows, seq_len), np.float32),
  }


def batches(config, split: str, start_step: int, seed: Sequence[int], host_rows: slice
            ) -> Iterator[dict[str, np.ndarray]]:
  """This host's rows of the batches from `start_step` on; each row's position is its step."""
  table = successor_table(seed, config.model.vocab_size)
  step = start_step
  while True:
    full = batch(table, seed, split, step, config.global_batch_size, config.seq_len)
    host = {k: v[host_rows] for k, v in full.items()}
    host["position"] = np.full((len(host["inputs"]), 1), step, np.int64)
    yield host
    step += 1
