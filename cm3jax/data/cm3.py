"""The CM3 training stream as a tf.data pipeline on the host CPU (docs/design.md, "Objective" and
"Data across hosts").

  code shards (cm3jax.tokenize_images; or text records, cm3jax.tokenize_text) -> this host's
     share of each epoch's records: the records of its files, each file read by one host (by
     every host, each keeping its share of the records, when there are fewer files than
     hosts); the hosts of a run partition every epoch (`epoch_records`); with cm3.retrieval,
     each code file is read beside its neighbour file (cm3jax.build_neighbours), so each
     record comes with its retrieved documents; shuffled per epoch
  -> documents `</s> caption <break> image`, or `</s> text` of a text record (the next
     document's `</s>` closes each one); with cm3.retrieval, each record's document follows its
     retrieved documents, each in that form
  -> CM3 causal masking in tf ops, seeded per (run, split, host, epoch, record)
  -> packed end to end into windows of seq_len + 1 tokens (no token dropped or repeated)
  -> batches: inputs, targets, weights (0 for sentinel targets), each row's data position, and
     with `document_attention` each token's position in its document and its document's
     segment id, so that the model attends within documents from position 0 as when sampling.

A data position (epoch, index, offset) names the token a window starts at: the `offset`-th token
of the masked document made from record `index` of this host's `epoch`-th pass. A pipeline
started at a position yields exactly the windows that followed it, so a resumed run sees the
batches it would have seen; skipping to the record reads, but does not process, the records
before it. Documents that are empty, not UTF-8, hold out-of-range codes or cannot fit one
window are skipped and counted, by reason, in the stream's `skipped` counter.
"""

import collections
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core.vocab import Vocab
from cm3jax.data import code_shards, html, tf_cpu
from cm3jax.retrieval import neighbours

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


class Position(NamedTuple):
  epoch: int
  index: int
  offset: int


START = Position(0, 0, 0)


class Retrieved(NamedTuple):
  """What the stream places before each record (cm3.retrieval): the first `documents` of its
  neighbours, read from the neighbour file beside its code file (`paths`, one per code file in
  the same order; cm3jax/retrieval/neighbours.py, whose records hold `per_record` ids each)."""
  paths: Sequence[str]
  per_record: int
  documents: int


def span_counts(seed, span_rate: float, max_spans: int):
  """n = clamp(Poisson(span_rate), 1, max_spans): the spans asked of one document (tf)."""
  tf = tf_cpu.tensorflow()
  n = tf.random.stateless_poisson([], seed, lam=span_rate, dtype=tf.int32)
  return tf.clip_by_value(n, 1, max_spans)


def cm3_mask(tokens, seed, vocab: Vocab, span_rate: float = 1.0, max_spans: Optional[int] = None,
             whole_segment_rate: float = 0.0, whole_from_last: int = 0):
  """CM3 causal masking of one document (tf ops; `seed` is a stateless seed of shape [2]).

  Draws n spans (see `span_counts`) as 2n distinct cut points among the maskable tokens (text
  pieces and image codes), sorted and paired: non-overlapping, non-empty spans, distributed as n
  uniform spans conditioned on not overlapping. A span is cut short at the end of the segment it
  starts in, so it never crosses `<break>` or `</s>`. Each span is replaced in place by
  `<sentinel:i>` (in order of position) and appended as `<sentinel:i> span <eoss>`; a document with
  fewer than 2n maskable tokens gets fewer spans. With probability `whole_segment_rate` the
  document instead gets one span: a whole segment (its caption or its image), drawn uniformly
  (from the last `whole_from_last` segments only, if set: the query document after retrieved
  ones). Returns int32 [len(tokens) + 3 * spans].
  """
  return masked_with_sources(tokens, seed, vocab, span_rate, max_spans, whole_segment_rate,
                             whole_from_last)[0]


def masked_with_sources(tokens, seed, vocab: Vocab, span_rate: float = 1.0,
                        max_spans: Optional[int] = None, whole_segment_rate: float = 0.0,
                        whole_from_last: int = 0):
  """(`cm3_mask`'s document, the position in `tokens` each of its tokens comes from): a span's
  sentinels come from its first token, its `<eoss>` from its last."""
  tf = tf_cpu.tensorflow()
  max_spans = vocab.num_sentinels if max_spans is None else max_spans
  tokens = tf.convert_to_tensor(tokens, tf.int32)
  length = tf.shape(tokens)[0]
  maskable = (((tokens >= 4) & (tokens < vocab.text_size))
              | ((tokens >= vocab.image_offset)
                 & (tokens < vocab.image_offset + vocab.num_image_codes)))
  where = tf.cast(tf.where(maskable)[:, 0], tf.int32)  # positions of the maskable tokens
  count = tf.size(where)
  count_seed, cut_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  n = tf.minimum(span_counts(count_seed, span_rate, max_spans), (count + 1) // 2)
  keys = tf.random.stateless_uniform([count + 1], cut_seed)
  cuts = tf.reshape(tf.sort(tf.argsort(keys)[:2 * n]), [-1, 2])
  first, last = cuts[:, 0], cuts[:, 1]  # [first, last) in maskable-token coordinates
  segment = tf.gather(tf.cumsum(tf.cast(~maskable, tf.int32)), where)
  if whole_segment_rate > 0:
    whole_seed, pick_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.random.experimental.stateless_fold_in(seed, 1), 2))
    segment_starts = tf.cast(tf.where(tf.concat([[True], segment[1:] != segment[:-1]], 0))[:, 0],
                             tf.int32)
    num_segments = tf.size(segment_starts)
    lowest = tf.maximum(num_segments - whole_from_last, 0) if whole_from_last else 0
    pick = tf.random.stateless_uniform([], pick_seed, lowest, num_segments, tf.int32)
    whole = (tf.random.stateless_uniform([], whole_seed) < whole_segment_rate) & (count > 0)
    # `last` = count is cut short at the end of the segment, below.
    first, last = tf.cond(whole, lambda: (segment_starts[pick:pick + 1], count[None]),
                          lambda: (first, last))
  last = tf.minimum(last, tf.searchsorted(segment, tf.gather(segment, first), side="right"))
  starts, ends = tf.gather(where, first), tf.gather(where, last - 1) + 1

  k = tf.shape(starts)[0]
  ones = tf.ones([k], tf.int32)
  begin = tf.scatter_nd(starts[:, None], ones, [length])
  finish = tf.scatter_nd(ends[:, None], ones, [length + 1])[:length]
  inside = tf.cumsum(begin - finish) > 0
  span_id = tf.cumsum(begin) - 1
  is_start = begin > 0
  sentinel_base = vocab.sentinel_base
  kept = ~inside | is_start
  causal = tf.boolean_mask(tf.where(is_start, sentinel_base + span_id, tokens), kept)
  column = lambda values: tf.RaggedTensor.from_tensor(values[:, None], row_splits_dtype=tf.int32)

  def appended(span_values, sentinels, ends):
    spans = tf.RaggedTensor.from_value_rowids(tf.boolean_mask(span_values, inside),
                                              tf.boolean_mask(span_id, inside), nrows=k,
                                              validate=False)
    return tf.concat([column(sentinels), spans, column(ends)], axis=1).flat_values

  source = tf.range(length)
  masked = tf.concat([causal, appended(tokens, sentinel_base + tf.range(k),
                                       tf.fill([k], vocab.eoss_id))], axis=0)
  sources = tf.concat([tf.boolean_mask(source, kept), appended(source, starts, ends - 1)], axis=0)
  return masked, sources


def document_fn(vocab: Vocab, max_length: int, form: str, skipped: collections.Counter):
  """(caption bytes, codes[, retrieved captions [k], their codes [k, T]]) -> the int32
  document, `</s> text <break> image` (or, in the "html" form, CM3's
  `</s> <img alt="text" src="` image `">`, data/html.py; a text record, with no codes, is
  `</s> text` in both) per retrieved document and then the record's own, or [] for one to skip
  (counted in `skipped`, by reason). A retrieved document that cannot be made is left out."""
  def part(caption: bytes, codes: np.ndarray) -> tuple[Optional[np.ndarray], str]:
    try:
      text = caption.decode("utf-8")
    except UnicodeDecodeError:
      return None, "caption is not UTF-8"
    if not text.strip():
      return None, "empty caption"
    if not codes.size:  # a text record (cm3jax.tokenize_text)
      return vocab.encode_document([text]), ""
    if codes.min() < 0 or codes.max() >= vocab.num_image_codes:
      return None, "image code out of range"
    if form == "html":
      return html.image_document(vocab, text, codes), ""
    return vocab.encode_document([text, codes]), ""

  def make(caption: bytes, codes: np.ndarray, retrieved_captions=(), retrieved_codes=()
           ) -> np.ndarray:
    doc, why = part(caption, codes)
    if doc is None:
      return skip(why)
    retrieved = [part(c, k)[0] for c, k in zip(retrieved_captions, retrieved_codes)]
    doc = np.concatenate([d for d in retrieved if d is not None] + [doc])
    if len(doc) > max_length:
      return skip("document longer than the sequence")
    return doc

  def skip(reason: str) -> np.ndarray:
    skipped[reason] += 1
    return np.zeros(0, np.int32)
  return make


def stream_seed(seed: Sequence[int], split: str, host: Optional[int] = None) -> int:
  """One int64 per (run seed, split) and, with `host`, per host: without it, the seed every host
  shares (the order that decides which host reads which record); with it, this host's own (its
  record shuffle and masking seeds). Host 0's equals the shared one (SeedSequence ignores trailing
  zeros), which is harmless: the two seed different operations."""
  scope = [SPLIT_IDS[split]] + ([] if host is None else [host])
  return int(np.random.default_rng([*seed, *scope]).integers(2**62))


def host_files(num_files: int, epoch, seed: Sequence[int], split: str, host: int,
               num_hosts: int):
  """The indices of the files this host reads in one pass (tf int64 [k]), in reading order.

  Every host puts the files in the same order (for train, shuffled by the shared seed of the
  epoch). With at least as many files as hosts, host h reads files h, h + num_hosts, ... of it,
  each file on one host; with fewer, every host reads every file (`epoch_records` then shares
  out their records)."""
  tf = tf_cpu.tensorflow()
  order = tf.range(num_files, dtype=tf.int64)
  if split == "train":
    order = tf.random.experimental.stateless_shuffle(
        order, tf.stack([tf.constant(stream_seed(seed, split), tf.int64),
                         tf.cast(epoch, tf.int64)]))
  return order[host::num_hosts] if num_files >= num_hosts else order


def epoch_records(paths: Sequence[str], epoch, seed: Sequence[int], split: str, host: int,
                  num_hosts: int, shuffle_buffer: int, beside: Optional[Sequence[str]] = None):
  """This host's serialised records of one pass, as a tf.data.Dataset: the records of its files
  (`host_files`) or, when the split has fewer files than hosts, records h, h + num_hosts, ... of
  the sequence every host reads. Either way the hosts partition each epoch exactly. Only then
  does each host shuffle its share (train), with its own seed. With `beside` (a file per file
  of `paths`, record for record: the neighbour files), each element is the pair (record, its
  record of the file beside)."""
  tf = tf_cpu.tensorflow()
  mine = host_files(len(paths), epoch, seed, split, host, num_hosts)
  chosen = tf.gather(tf.constant(list(paths)), mine)
  if beside is None:
    names, read = tf.data.Dataset.from_tensor_slices(chosen), tf.data.TFRecordDataset
  else:
    names = tf.data.Dataset.from_tensor_slices((chosen, tf.gather(tf.constant(list(beside)),
                                                                  mine)))
    read = lambda path, other: tf.data.Dataset.zip((tf.data.TFRecordDataset(path),
                                                    tf.data.TFRecordDataset(other)))
  records = names.interleave(read, cycle_length=min(len(paths), 8),
                             num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if len(paths) < num_hosts:
    records = records.shard(num_hosts, host)
  if split == "train":
    records = records.shuffle(shuffle_buffer, seed=stream_seed(seed, split, host) + epoch,
                              reshuffle_each_iteration=False)
  return records


def host_shares(shard_records: Sequence[int], epoch: int, seed: Sequence[int], split: str,
                num_hosts: int) -> list[int]:
  """The records each host reads in one pass of a split whose files hold `shard_records`."""
  if len(shard_records) < num_hosts:
    total = sum(shard_records)
    return [len(range(h, total, num_hosts)) for h in range(num_hosts)]
  counts = np.asarray(shard_records, np.int64)
  return [int(counts[host_files(len(counts), epoch, seed, split, h, num_hosts).numpy()].sum())
          for h in range(num_hosts)]


def dataset(*, codes_dir: str, split: str, vocab: Vocab, seq_len: int, rows: int,
            seed: Sequence[int], position: Position = START, host: int = 0, num_hosts: int = 1,
            span_rate: float = 1.0, whole_segment_rate: float = 0.0,
            shuffle_buffer: int = 10_000, repeat: bool = True,
            document_attention: bool = False, retrieved: Optional[Retrieved] = None,
            document_form: str = "break", skipped: Optional[collections.Counter] = None):
  """A tf.data.Dataset of this host's batches from `position` on: `inputs`, `targets` (int32),
  `weights` (float32) of shape [rows, seq_len], `position` (int64 [rows, 3]) and, with
  `document_attention`, `positions` and `segments` (int32 [rows, seq_len]). With `retrieved`,
  each record's document follows its retrieved ones, one document for masking and attention,
  whose whole-segment spans come from the record's own caption and image. `document_form`:
  "break" (CM3Leon's) or "html" (CM3's, see document_fn). The documents left out are counted
  in `skipped`, by reason, as the stream reaches them."""
  tf = tf_cpu.tensorflow()
  paths = code_shards.shard_paths(codes_dir, split)
  manifest = code_shards.read_manifest(codes_dir, split)
  code_shards.check_codebook(codes_dir, manifest, vocab.num_image_codes)
  window = seq_len + 1
  max_length = window - 3 * vocab.num_sentinels  # room for the most spans
  if max_length < manifest["tokens_per_image"] + 3:
    raise ConfigError(f"seq_len={seq_len} cannot hold an image of {manifest['tokens_per_image']} "
                      f"codes, its caption and {vocab.num_sentinels} masked spans")
  parse = code_shards.parser(manifest["tokens_per_image"])
  make_document = document_fn(vocab, max_length, document_form,
                              collections.Counter() if skipped is None else skipped)
  base_seed = stream_seed(seed, split, host)
  AUTOTUNE = tf.data.AUTOTUNE

  def numbered_records(epoch):
    records = epoch_records(paths, epoch, seed, split, host, num_hosts, shuffle_buffer,
                            None if retrieved is None else retrieved.paths)
    return records.enumerate().map(lambda index, record: (epoch, index, record))

  epochs = tf.data.Dataset.range(position.epoch, 2**62 if repeat else position.epoch + 1)
  records = epochs.flat_map(numbered_records).skip(position.index)
  if retrieved is not None:
    parse_neighbours = neighbours.parser(retrieved.per_record, manifest["tokens_per_image"])

  def document(record):
    if retrieved is None:
      ex = parse(record)
      return tf.numpy_function(make_document, [ex["caption"], ex["codes"]], tf.int32,
                               stateful=False)
    ex, near = parse(record[0]), parse_neighbours(record[1])
    same = tf.debugging.assert_equal(
        ex["key"], near["key"], message="a neighbour file is not aligned with its code file "
        "(built for other code shards): run python -m cm3jax.build_neighbours")
    with tf.control_dependencies([same]):
      return tf.numpy_function(
          make_document, [ex["caption"], ex["codes"], near["captions"][:retrieved.documents],
                          near["codes"][:retrieved.documents]], tf.int32, stateful=False)

  def numbered_documents(epoch, index, record):
    return epoch, index, tf.ensure_shape(document(record), [None]), tf.constant(0)

  return batched_rows(records.map(numbered_documents, num_parallel_calls=AUTOTUNE,
                                  deterministic=True),
                      vocab=vocab, seq_len=seq_len, rows=rows, base_seed=base_seed,
                      position=position, span_rate=span_rate,
                      whole_segment_rate=whole_segment_rate,
                      whole_from_last=2 if retrieved is not None else 0,
                      document_attention=document_attention)


def batched_rows(documents, *, vocab: Vocab, seq_len: int, rows: int, base_seed: int,
                 position: Position, span_rate: float, whole_segment_rate: float,
                 whole_from_last: int, document_attention: bool,
                 max_spans: Optional[int] = None):
  """The batches of a dataset of numbered `documents` (epoch, index, tokens int32 [L], first
  weighted): each CM3-masked with the seed of (base_seed, epoch, index), packed from `position`
  on (see `dataset`). No token of a document before position `first weighted` is a weighted
  target but its first (`</s>`); an empty document is skipped. At most `max_spans` spans
  (default: the vocabulary's sentinels) are masked in a document."""
  tf = tf_cpu.tensorflow()
  window = seq_len + 1
  AUTOTUNE = tf.data.AUTOTUNE

  def to_document(epoch, index, doc, first_weighted):
    masked, sources = tf.cond(
        tf.size(doc) > 0,
        lambda: masked_with_sources(doc, tf.stack([base_seed, epoch * 2**32 + index]), vocab,
                                    span_rate, max_spans, whole_segment_rate, whole_from_last),
        lambda: (doc, tf.zeros([0], tf.int32)))
    is_sentinel = (masked >= vocab.sentinel_base) & (masked < vocab.image_offset)
    # The document's first token, its `</s>`, is the target that ends the document before it.
    weights = tf.cast(~is_sentinel & ((sources >= first_weighted) | (sources == 0)), tf.float32)
    first = tf.cast(tf.logical_and(epoch == position.epoch, index == position.index), tf.int32)
    offset = first * position.offset
    n = tf.shape(masked)[0]
    offsets = tf.range(offset, tf.maximum(n, offset))
    info = tf.stack([tf.fill(tf.shape(offsets), epoch), tf.fill(tf.shape(offsets), index),
                     tf.cast(offsets, tf.int64)], axis=1)
    return masked[offset:], weights[offset:], info

  docs = documents.map(to_document, num_parallel_calls=AUTOTUNE, deterministic=True)

  def pack(buffer, doc):
    parts = [tf.concat([b, d], 0) for b, d in zip(buffer, doc)]
    full = tf.shape(parts[0])[0] // window * window
    windows = tuple(tf.reshape(p[:full], tf.concat([[-1, window], tf.shape(p)[1:]], 0))
                    for p in parts)
    return tuple(p[full:] for p in parts), windows

  empty = (tf.zeros([0], tf.int32), tf.zeros([0], tf.float32), tf.zeros([0, 3], tf.int64))
  windows = docs.scan(empty, pack).unbatch()

  def to_row(tokens, weights, info):
    row = {"inputs": tokens[:-1], "targets": tokens[1:], "weights": weights[1:],
           "position": info[0]}
    if document_attention:
      offsets = tf.cast(info[:-1, 2], tf.int32)
      row["positions"] = offsets
      row["segments"] = tf.cumsum(tf.cast(offsets == 0, tf.int32))
    return row

  return windows.map(to_row, num_parallel_calls=AUTOTUNE).batch(
      rows, drop_remainder=True).prefetch(AUTOTUNE)


def batches(**kwargs) -> Iterator[dict[str, np.ndarray]]:
  """`dataset(...)` as numpy batches."""
  return dataset(**kwargs).as_numpy_iterator()
