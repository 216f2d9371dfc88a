"""Where a run's inputs live: each is a config path, or a default under the run's workdir."""

import os
from typing import NamedTuple


class InputPaths(NamedTuple):
  """Where a run's CM3 inputs live."""
  vqgan_workdir: str  # the image tokenizer (a cm3jax.train_vqgan workdir)
  codes_dir: str  # the image-code shards (cm3jax.tokenize_images)
  tokenizer: str  # the sentencepiece model (cm3jax.train_tokenizer)


def input_paths(cm3, workdir: str) -> InputPaths:
  """The inputs of a run's `cm3` config section (the live ConfigDict or the JSON saved with a
  checkpoint); empty paths are WORKDIR/vqgan, WORKDIR/codes and WORKDIR/tokenizer.model."""
  return InputPaths(cm3["vqgan_workdir"] or os.path.join(workdir, "vqgan"),
                    cm3["codes_dir"] or os.path.join(workdir, "codes"),
                    cm3["tokenizer"] or os.path.join(workdir, "tokenizer.model"))


def tasks_dir(config, workdir: str) -> str:
  """Where a run's task shards live (sft.tasks_dir; empty: WORKDIR/tasks)."""
  return config.sft.tasks_dir or os.path.join(workdir, "tasks")


class RetrievalPaths(NamedTuple):
  """Where a run's retrieval inputs live (cm3.retrieval)."""
  retriever: str  # a train_retriever workdir or a CLIP checkpoint
  memory: str  # the memory bank (cm3jax.build_memory)
  neighbours: str  # the offline neighbours (cm3jax.build_neighbours)


def retrieval_paths(cm3, workdir: str) -> RetrievalPaths:
  """Empty paths are WORKDIR/retriever, WORKDIR/memory and WORKDIR/neighbours."""
  r = cm3["retrieval"]
  return RetrievalPaths(r["retriever"] or os.path.join(workdir, "retriever"),
                        r["memory"] or os.path.join(workdir, "memory"),
                        r["neighbours_dir"] or os.path.join(workdir, "neighbours"))
