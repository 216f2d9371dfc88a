"""The instruction-tuning stream (docs/design.md, "Instruction tuning"): the records of task
shards (cm3jax.tokenize_tasks), drawn as a weighted task mixture, CM3-masked and packed as the
pretraining stream packs (`cm3.batched_rows`).

  rounds     round r draws RATE x N_t records of each task t of N_t records (`sft.mixture`:
             a rate above 1 repeats a task, below 1 takes part of it, a new part each round),
             each task's records in a seeded order per round; the round is shuffled by the
             seed every host shares (validation too: its first batches then hold every task,
             the same ones at each evaluation) and host h takes draws h, h + num_hosts, ...
  documents  each record's `</s> input <break> output` (`sft.encode`); with loss_on="output"
             only the output's tokens and the `</s>` that ends the record are weighted
             targets (a span masked from the input and moved to the end is not one)
  positions  (round, index of the draw in this host's share, offset), so a resumed run sees
             the batches it would have seen

The records are held in host memory, tokens end to end: an SFT set (the paper's: a few million
records) fits a TPU VM's host memory, the pretraining data would not.
"""

import collections
from typing import Mapping, Optional, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core.vocab import Vocab
from cm3jax.data import cm3, code_shards, sft, task_shards, tf_cpu

LOSS_ON = ("all", "output")


def rates(mixture: str, tasks: Sequence[str]) -> dict[str, float]:
  """`TASK:RATE,...` -> each task's rate; a task not named has rate 1."""
  out = dict.fromkeys(tasks, 1.0)
  for item in filter(None, (p.strip() for p in mixture.split(","))):
    name, _, value = item.partition(":")
    try:
      rate = float(value)
    except ValueError:
      rate = -1.0
    if rate < 0:
      raise ConfigError(f"sft.mixture item {item!r} is not TASK:RATE with a rate >= 0")
    if name not in out:
      raise ConfigError(f"sft.mixture names task {name!r}; the shards hold {sorted(tasks)}")
    out[name] = rate
  if not any(out[t] > 0 for t in tasks):
    raise ConfigError(f"sft.mixture={mixture!r} gives every task rate 0")
  return out


def round_draws(sizes: Sequence[int], task_rates: Sequence[float], seed: int, round_: int
                ) -> np.ndarray:
  """The records of round `round_` as indices into the tasks' records end to end (int64): task t
  gives round(rate_t * N_t) of its N_t records, its seeded order repeated as often as that
  needs; the round in a seeded order."""
  parts, first = [], 0
  for t, (n, rate) in enumerate(zip(sizes, task_rates)):
    take = int(round(rate * n))
    if take and n:
      laps = -(-take // n)
      rng = np.random.default_rng([seed, round_, t])
      order = np.concatenate([rng.permutation(n) for _ in range(laps)])
      parts.append(first + order[:take])
    first += n
  draws = np.concatenate(parts) if parts else np.zeros(0, np.int64)
  return np.random.default_rng([seed, round_]).permutation(draws).astype(np.int64)


def dataset(*, tasks_dir: str, split: str, vocab: Vocab, seq_len: int, rows: int,
            seed: Sequence[int], position: cm3.Position = cm3.START, host: int = 0,
            num_hosts: int = 1, span_rate: float = 1.0, whole_segment_rate: float = 0.0,
            mixture: str = "", loss_on: str = "all", document_attention: bool = False,
            max_spans: int = 4, records: Optional[Mapping[str, Sequence[sft.Record]]] = None,
            skipped: Optional[collections.Counter] = None):
  """A tf.data.Dataset of this host's batches, as `cm3.dataset`'s. The validation split draws
  every record once per round. At most `max_spans` spans are masked in a record, so a
  record fits when it leaves room for them; the others are counted in `skipped`. `records`
  (by task) replaces the shards, for tests."""
  if loss_on not in LOSS_ON:
    raise ConfigError(f"sft.loss_on={loss_on!r} is not one of {list(LOSS_ON)}")
  tf = tf_cpu.tensorflow()
  skipped = collections.Counter() if skipped is None else skipped
  if records is None:
    code_shards.check_codebook(tasks_dir, task_shards.read_manifest(tasks_dir, split),
                               vocab.num_image_codes)
    records = by_task(task_shards.read_split(tasks_dir, split))
  if not 1 <= max_spans <= vocab.num_sentinels:
    raise ConfigError(f"sft.max_spans={max_spans} must be in [1, {vocab.num_sentinels}] (the "
                      "vocabulary's sentinels)")
  max_length = seq_len + 1 - 3 * max_spans  # room for the most spans
  names = sorted(records)
  task_rates = rates(mixture, names) if split == "train" else dict.fromkeys(names, 1.0)
  tokens, output_starts, sizes = [], [], []
  for name in names:
    kept = 0
    for record in records[name]:
      doc, output_start = sft.encode(vocab, record, np.asarray)
      if len(doc) > max_length:
        skipped["record longer than the sequence"] += 1
        continue
      tokens.append(doc)
      output_starts.append(output_start if loss_on == "output" else 0)
      kept += 1
    sizes.append(kept)
  if not sum(sizes):
    raise ConfigError(f"no {split} record of {tasks_dir} fits seq_len={seq_len}")
  lengths = np.array([len(t) for t in tokens], np.int64)
  flat = tf.constant(np.concatenate(tokens).astype(np.int32))
  starts = tf.constant(np.concatenate([[0], np.cumsum(lengths)[:-1]]), tf.int64)
  lengths_t = tf.constant(lengths, tf.int64)
  firsts = tf.constant(np.asarray(output_starts, np.int32))
  shared_seed = cm3.stream_seed(seed, split)
  rate_list = [task_rates[n] for n in names]

  def draws_of_round(round_):
    def draws(r):
      return round_draws(sizes, rate_list, shared_seed, int(r))[host::num_hosts]
    ids = tf.ensure_shape(tf.numpy_function(draws, [round_], tf.int64, stateful=False), [None])
    return tf.data.Dataset.from_tensor_slices(ids).enumerate().map(
        lambda index, row: (round_, index, row))

  def document(round_, index, row):
    start = starts[row]
    return round_, index, flat[start:start + lengths_t[row]], firsts[row]

  rounds = tf.data.Dataset.range(position.epoch, 2**62)
  documents = rounds.flat_map(draws_of_round).skip(position.index).map(
      document, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return cm3.batched_rows(documents, vocab=vocab, seq_len=seq_len, rows=rows,
                          base_seed=cm3.stream_seed(seed, split, host), position=position,
                          span_rate=span_rate, whole_segment_rate=whole_segment_rate,
                          whole_from_last=0, document_attention=document_attention,
                          max_spans=max_spans)


def by_task(records: Sequence[sft.Record]) -> dict[str, list[sft.Record]]:
  out: dict[str, list[sft.Record]] = {}
  for r in records:
    out.setdefault(r.task, []).append(r)
  return out
