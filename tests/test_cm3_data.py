"""The CM3 stream: masking properties (hypothesis), the span-count law, packing, exact resume,
loss weights and the documents it skips."""

import collections
import json
import math
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from cm3jax import data  # noqa: E402
from cm3jax.config import ConfigError  # noqa: E402
from cm3jax.core.vocab import EOS, Vocab  # noqa: E402
from cm3jax.data import cm3, code_shards, html, shapes  # noqa: E402
from cm3jax.prepare import train_tokenizer
from cm3jax.retrieval import neighbours  # noqa: E402
from tests.helpers import tiny_config

CAPTIONS = [shapes.scene("train", i).caption() for i in range(2000)]
TOKENS_PER_IMAGE = 16
CODES = 64


@pytest.fixture(scope="module")
def vocab():
  return Vocab(train_tokenizer.train(CAPTIONS, 320), num_sentinels=16, num_image_codes=CODES)


def unmask(masked, vocab):
  """Moves the appended spans back: (document, spans), or raises AssertionError."""
  masked = [int(t) for t in masked]
  s0 = vocab.sentinel(0)
  if s0 not in masked:
    return masked, []
  tail_start = masked.index(s0, masked.index(s0) + 1)
  causal, tail, spans = masked[:tail_start], masked[tail_start:], []
  while tail:
    assert tail[0] == vocab.sentinel(len(spans))
    end = tail.index(vocab.eoss_id)
    spans.append(tail[1:end])
    tail = tail[end + 1:]
  placed = [t for t in causal if vocab.is_sentinel(t)]
  assert placed == [vocab.sentinel(i) for i in range(len(spans))]
  doc = []
  for t in causal:
    doc.extend(spans[t - vocab.sentinel_base] if vocab.is_sentinel(t) else [t])
  return doc, spans


def mask(doc, seed, vocab, **kwargs):
  return cm3.cm3_mask(np.asarray(doc, np.int32), tf.constant(seed, tf.int64), vocab,
                      **kwargs).numpy()


def segment_tokens(vocab):
  text = st.lists(st.integers(4, vocab.text_size - 1), max_size=40)
  image = st.lists(st.integers(vocab.image_offset, vocab.image_offset + CODES - 1), max_size=40)
  return st.lists(st.one_of(text, image), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), seed=st.tuples(st.integers(0, 2**31), st.integers(0, 2**31)),
       whole_segment_rate=st.sampled_from([0.0, 0.5, 1.0]))
def test_masking_properties(vocab, data, seed, whole_segment_rate):
  segments = data.draw(segment_tokens(vocab))
  doc = [EOS]
  for i, seg in enumerate(segments):
    doc += ([vocab.break_id] if i else []) + seg
  maskable = sum(len(s) for s in segments)
  masked = mask(doc, seed, vocab, whole_segment_rate=whole_segment_rate)
  back, spans = unmask(masked, vocab)
  assert back == doc  # moving the spans back reproduces the document exactly
  assert len(masked) == len(doc) + 3 * len(spans)
  assert (1 <= len(spans) <= 16) if maskable else not spans
  for span in spans:  # non-empty, inside one segment: never crosses <break> or </s>
    assert span and all(vocab.is_text(t) or vocab.is_image(t) for t in span)
    assert any(span == seg[i:i + len(span)] for seg in segments for i in range(len(seg)))
  np.testing.assert_array_equal(mask(doc, seed, vocab, whole_segment_rate=whole_segment_rate),
                                masked)
  if whole_segment_rate == 1.0 and maskable:
    assert len(spans) == 1 and spans[0] in [seg for seg in segments if seg]


def test_whole_segment_rate(vocab):
  """2,000 documents at rate 0.3: about 30% get one whole-segment span, caption or image alike;
  plain CM3 spans (uniform cut points over 80 tokens) almost never are one."""
  caption, image = list(range(10, 50)), list(range(vocab.image_offset, vocab.image_offset + 40))
  doc = [EOS] + caption + [vocab.break_id] + image
  s0, size = vocab.sentinel(0), len(doc) + 3 * 16
  whole = {"caption": [EOS, s0, vocab.break_id] + image + [s0] + caption + [vocab.eoss_id],
           "image": [EOS] + caption + [vocab.break_id, s0, s0] + image + [vocab.eoss_id]}
  padded = lambda tokens: tf.pad(tokens, [[0, size - tf.size(tokens)]])  # id 0 is never output

  def kind(i):
    masked = padded(cm3.cm3_mask(tf.constant(doc, tf.int32), tf.stack([i, 3]), vocab,
                                 whole_segment_rate=0.3))
    return tf.stack([tf.reduce_all(masked == padded(tf.constant(w, tf.int32)))
                     for w in whole.values()])

  found = np.array(list(tf.data.Dataset.range(2000).map(kind).as_numpy_iterator())).sum(0)
  assert 540 <= found.sum() <= 660, found  # 600 +- 4.9 sigma
  assert abs(found[0] - found[1]) <= 120, found


def test_another_seed_masks_differently(vocab):
  doc = [EOS] + list(range(10, 50)) + [vocab.break_id] + list(range(vocab.image_offset,
                                                                    vocab.image_offset + 40))
  outputs = {tuple(mask(doc, (s, 0), vocab)) for s in range(20)}
  assert len(outputs) >= 15


def test_span_count_follows_clamped_poisson(vocab):
  """4,000 documents with room for 16 spans: spans per document ~ clamp(Poisson(1), 1, 16)."""
  doc = tf.constant([EOS] + [10] * 400, tf.int32)
  eoss = vocab.eoss_id
  counts = tf.data.Dataset.range(4_000).map(
      lambda i: tf.reduce_sum(tf.cast(cm3.cm3_mask(doc, tf.stack([i, 7]), vocab) == eoss, tf.int32)),
      num_parallel_calls=tf.data.AUTOTUNE)
  observed = np.bincount(np.fromiter(counts.as_numpy_iterator(), int), minlength=17)
  assert observed[0] == 0 and observed.sum() == 4_000
  pmf = [math.exp(-1) / math.factorial(k) for k in range(5)]
  expected = np.array([pmf[0] + pmf[1], pmf[2], pmf[3], pmf[4], 1 - sum(pmf)]) * 4_000
  binned = np.array([observed[1], observed[2], observed[3], observed[4], observed[5:].sum()])
  chi2 = float(np.sum((binned - expected) ** 2 / expected))
  assert chi2 < 18.47, (binned, expected.round())  # 4 degrees of freedom, p = 0.001


def write_shards(directory, split, records, shard_size=40):
  """records: (caption bytes, codes) -> shards and manifest in the tokenize_images format."""
  os.makedirs(directory, exist_ok=True)
  starts = range(0, len(records), shard_size)
  for shard, start in enumerate(starts):
    with tf.io.TFRecordWriter(code_shards.shard_path(directory, split, shard)) as writer:
      for i, (caption, codes) in enumerate(records[start:start + shard_size], start):
        writer.write(code_shards.serialize(f"{i}".encode(), np.asarray(codes), caption))
  with open(code_shards.manifest_path(directory, split), "w") as f:
    json.dump({"split": split, "records": len(records), "shards": len(starts),
               "files": [os.path.basename(code_shards.shard_path(directory, split, i))
                         for i in range(len(starts))],
               "shard_records": [len(records[s:s + shard_size]) for s in starts],
               "tokens_per_image": TOKENS_PER_IMAGE, "codebook_size": CODES, "skipped": {}}, f)


def random_records(n, seed=0):
  rng = np.random.default_rng(seed)
  return [(CAPTIONS[i % len(CAPTIONS)].encode(), rng.integers(0, CODES, TOKENS_PER_IMAGE))
          for i in range(n)]


def stream(directory, vocab, split="train", seq_len=96, rows=4, **kwargs):
  return cm3.batches(codes_dir=str(directory), split=split, vocab=vocab, seq_len=seq_len,
                     rows=rows, seed=(0, 1), **kwargs)


@pytest.mark.parametrize("host, num_hosts", [(0, 1), (0, 2), (1, 2)])
def test_packing_neither_drops_nor_duplicates_a_token(vocab, tmp_path, host, num_hosts):
  records = random_records(50)
  write_shards(tmp_path, "validation", records, shard_size=50)
  rows = list(stream(tmp_path, vocab, split="validation", rows=1, repeat=False, host=host,
                     num_hosts=num_hosts))
  mine = records[host::num_hosts]  # a host reads every num_hosts-th record
  base = cm3.stream_seed((0, 1), "validation", host)
  masked = [mask(vocab.encode_document([c.decode(), codes]), (base, i), vocab)
            for i, (c, codes) in enumerate(mine)]
  expected = np.concatenate(masked)
  windows = np.concatenate([np.concatenate([r["inputs"][0], r["targets"][0, -1:]]) for r in rows])
  assert len(expected) - len(windows) < 97  # only the last partial window is left out
  np.testing.assert_array_equal(windows, expected[:len(windows)])
  for r in rows:  # each row's position names its first token
    epoch, index, offset = r["position"][0]
    assert epoch == 0 and masked[index][offset] == r["inputs"][0, 0]


def test_the_html_form_packs_cm3s_documents(vocab, tmp_path):
  records = random_records(30)
  write_shards(tmp_path, "validation", records, shard_size=30)
  rows = list(stream(tmp_path, vocab, split="validation", rows=1, repeat=False,
                     document_form="html"))
  base = cm3.stream_seed((0, 1), "validation", 0)
  documents = [html.image_document(vocab, c.decode(), codes) for c, codes in records]
  assert vocab.break_id not in np.concatenate(documents)
  expected = np.concatenate([mask(d, (base, i), vocab) for i, d in enumerate(documents)])
  windows = np.concatenate([np.concatenate([r["inputs"][0], r["targets"][0, -1:]]) for r in rows])
  assert len(expected) - len(windows) < 97
  np.testing.assert_array_equal(windows, expected[:len(windows)])


def test_weights_are_zero_exactly_on_sentinel_targets(vocab, tmp_path):
  write_shards(tmp_path, "train", random_records(60))
  batch = next(stream(tmp_path, vocab))
  targets, weights = batch["targets"], batch["weights"]
  np.testing.assert_array_equal(weights == 0, vocab.is_sentinel(targets))
  assert np.any(targets == vocab.eoss_id) and np.all(weights[targets == vocab.eoss_id] == 1)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], targets[:, :-1])


def test_document_attention_restarts_positions_at_every_document(vocab, tmp_path):
  write_shards(tmp_path, "train", random_records(40))
  batch = next(stream(tmp_path, vocab, document_attention=True))
  inputs, positions, segments = batch["inputs"], batch["positions"], batch["segments"]
  assert positions.dtype == np.int32 and segments.dtype == np.int32
  for row in range(len(inputs)):
    starts = np.flatnonzero(positions[row] == 0)
    assert np.all(inputs[row, starts] == EOS)  # a document starts with </s>, at position 0
    np.testing.assert_array_equal(np.diff(segments[row]) == 1, positions[row, 1:] == 0)
    steps = np.diff(positions[row])
    assert np.all((steps == 1) | (positions[row, 1:] == 0))
  assert batch["position"][0][2] == positions[0, 0]  # a row may start inside a document
  assert "positions" not in next(stream(tmp_path, vocab))


def record_keys(records) -> list[bytes]:
  spec = {"key": tf.io.FixedLenFeature([], tf.string)}
  return [tf.io.parse_single_example(r, spec)["key"].numpy() for r in records]


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_the_hosts_of_a_run_partition_every_epoch_reading_each_file_on_one_host(
    tmp_path, num_hosts):
  """Each host reads its stream from a copy of the split in which every file of the other hosts
  is garbage: any record it took from one would fail to parse."""
  records = random_records(61)
  write_shards(tmp_path / "codes", "train", records, shard_size=9)  # 7 files, the last of 7
  paths, counts = code_shards.shard_files(str(tmp_path / "codes"), "train")
  every = sorted(f"{i}".encode() for i in range(len(records)))
  orders = []
  for epoch in range(3):
    shares = []
    for host in range(num_hosts):
      mine = set(cm3.host_files(len(paths), epoch, (0, 1), "train", host, num_hosts).numpy())
      copy = tmp_path / f"epoch{epoch}-host{host}"
      copy.mkdir()
      for i, path in enumerate(paths):
        data = open(path, "rb").read() if i in mine else b"not a record" * 10
        (copy / os.path.basename(path)).write_bytes(data)
      copied = [str(copy / os.path.basename(p)) for p in paths]
      shares.append(record_keys(cm3.epoch_records(copied, epoch, (0, 1), "train", host,
                                                  num_hosts, 100)))
      assert sorted(int(k) // 9 for k in shares[-1]) == sorted(  # whole files
          i for i in mine for _ in range(counts[i]))
    assert sorted(sum(shares, [])) == every  # each record once, on one host
    assert list(map(len, shares)) == cm3.host_shares(counts, epoch, (0, 1), "train", num_hosts)
    orders.append(shares[0])
  assert orders[0] != orders[1] != orders[2]  # every epoch is shuffled anew


@pytest.mark.parametrize("num_hosts", [2, 8])  # 7 files: whole files, or records of files
def test_each_record_travels_with_its_neighbours_to_its_host(tmp_path, num_hosts):
  records = random_records(61)
  write_shards(tmp_path / "codes", "train", records, shard_size=9)
  paths, _ = code_shards.shard_files(str(tmp_path / "codes"), "train")
  ids = [[(i + 1) % 61, -1] for i in range(61)]
  beside = retrieved_of(records, 1, ids, tmp_path / "neighbours", "train", 9).paths
  seen = []
  for host in range(num_hosts):
    pairs = list(cm3.epoch_records(paths, 1, (0, 1), "train", host, num_hosts, 100, beside))
    keys = record_keys([record for record, _ in pairs])
    assert keys == record_keys([near for _, near in pairs])
    seen += keys
  assert sorted(seen) == sorted(f"{i}".encode() for i in range(len(records)))


def test_fewer_files_than_hosts_share_records(tmp_path):
  write_shards(tmp_path, "train", random_records(20), shard_size=10)
  paths, counts = code_shards.shard_files(str(tmp_path), "train")
  shares = [record_keys(cm3.epoch_records(paths, 0, (0, 1), "train", host, 3, 100))
            for host in range(3)]
  assert sorted(sum(shares, [])) == sorted(f"{i}".encode() for i in range(20))
  assert list(map(len, shares)) == cm3.host_shares(counts, 0, (0, 1), "train", 3) == [7, 7, 6]


def test_the_stream_says_how_unequal_the_hosts_shares_are(tmp_path, vocab):
  for split in data.SPLITS:
    write_shards(tmp_path / "codes", split, random_records(61), shard_size=9)
  (tmp_path / "tokenizer.model").write_bytes(vocab.spm_model)
  config = tiny_config(data="cm3", seq_len=96, global_batch_size=4,
                       **{"cm3.max_spans": vocab.num_sentinels})
  source = data.source(config, str(tmp_path))
  line = source.unequal_shares("train", (0, 1), 0, 2)
  shares = cm3.host_shares([9] * 6 + [7], 0, (0, 1), "train", 2)
  assert f"read {min(shares)} to {max(shares)} records" in line and "7 files" in line
  write_shards(tmp_path / "codes", "train", random_records(60), shard_size=10)
  assert source.unequal_shares("train", (0, 1), 0, 2) == ""  # 3 files each


@pytest.mark.parametrize("host, num_hosts", [  # (2, 3): another host of another count
    (0, 1), (1, 2), pytest.param(2, 3, marks=pytest.mark.slow)])
def test_resume_mid_epoch_continues_with_identical_batches(vocab, tmp_path, host, num_hosts):
  write_shards(tmp_path, "train", random_records(60), shard_size=20)  # 12 batches cross epochs
  first = stream(tmp_path, vocab, host=host, num_hosts=num_hosts)
  batches = [next(first) for _ in range(12)]
  assert batches[-1]["position"][-1][0] >= 1
  for k in (3, 7):
    resumed = stream(tmp_path, vocab, host=host, num_hosts=num_hosts,
                     position=cm3.Position(*batches[k]["position"][0]))
    for want in batches[k:]:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_bad_documents_are_skipped_and_counted(vocab, tmp_path):
  good = random_records(30)
  bad = [(b"", good[0][1]), (b"   ", good[0][1]), (b"caf\xe9", good[0][1]),
         (b"a small red circle", np.full(TOKENS_PER_IMAGE, CODES)),
         (" ".join(["circle"] * 40).encode(), good[0][1])]  # longer than the sequence
  write_shards(tmp_path, "validation", good[:10] + bad + good[10:], shard_size=100)
  skipped = collections.Counter()
  rows = list(stream(tmp_path, vocab, split="validation", rows=1, repeat=False, skipped=skipped))
  assert dict(skipped) == {"empty caption": 2, "caption is not UTF-8": 1,
                           "image code out of range": 1,
                           "document longer than the sequence": 1}
  tokens = np.concatenate([r["inputs"][0] for r in rows])
  assert np.all(tokens < vocab.size) and np.sum(tokens == EOS) >= 25


def test_config_errors(vocab, tmp_path):
  write_shards(tmp_path, "train", random_records(10))
  with pytest.raises(ConfigError, match="seq_len=32 cannot hold an image of 16 codes"):
    next(stream(tmp_path, vocab, seq_len=32))
  other = Vocab(vocab.spm_model, 16, 128)
  with pytest.raises(ConfigError, match="codes of a 64-code VQGAN but the vocabulary has 128"):
    next(stream(tmp_path, other))
  with pytest.raises(ConfigError, match="holds no complete validation split"):
    next(stream(tmp_path, vocab, split="validation"))


def retrieved_of(records, documents, ids, directory, split, shard_size):
  """A Retrieved whose bank is `records` themselves, its neighbour files beside the code files
  write_shards(directory, split, records, shard_size) writes."""
  ids = np.asarray(ids, np.int64)
  os.makedirs(directory, exist_ok=True)
  paths = []
  for shard, start in enumerate(range(0, len(records), shard_size)):
    rows = []
    for i in range(start, min(start + shard_size, len(records))):
      real = [records[j] for j in ids[i] if j >= 0]
      rows.append(neighbours.serialize(f"{i}".encode(), ids[i], [c for c, _ in real],
                                       np.array([k for _, k in real]).reshape(len(real), -1)))
    neighbours.write_shard(str(directory), split, shard, rows)
    paths.append(neighbours.shard_path(str(directory), split, shard))
  return cm3.Retrieved(paths, ids.shape[1], documents)


def test_retrieved_documents_precede_each_record_in_document_form(vocab, tmp_path):
  records = random_records(30)
  write_shards(tmp_path, "validation", records, shard_size=30)
  n = len(records)
  ids = [[(i + 1) % n, (i + 7) % n, (i + 3) % n] for i in range(n)]
  ids[4] = [-1, 9, -1]  # fewer neighbours: only the real one is placed
  retrieved = retrieved_of(records, 2, ids, tmp_path / "neighbours", "validation", 30)
  rows = list(stream(tmp_path, vocab, split="validation", rows=1, repeat=False, seq_len=256,
                     retrieved=retrieved, whole_segment_rate=0.5))
  base = cm3.stream_seed((0, 1), "validation", 0)
  docs = []
  for i, (caption, codes) in enumerate(records):
    parts = [records[j] for j in ids[i][:2] if j >= 0] + [(caption, codes)]
    doc = np.concatenate([vocab.encode_document([c.decode(), k]) for c, k in parts])
    docs.append(doc)
    masked = mask(doc, (base, i), vocab, whole_segment_rate=0.5, whole_from_last=2)
    assert unmask(masked, vocab)[0] == list(doc)
  assert sum(d.tolist().count(EOS) for d in docs) == 3 * n - 1  # 2 retrieved + own, record 4: 1
  expected = np.concatenate([mask(d, (base, i), vocab, whole_segment_rate=0.5, whole_from_last=2)
                             for i, d in enumerate(docs)])
  windows = np.concatenate([np.concatenate([r["inputs"][0], r["targets"][0, -1:]]) for r in rows])
  assert len(expected) - len(windows) < 257
  np.testing.assert_array_equal(windows, expected[:len(windows)])
  weights = np.concatenate([r["weights"][0] for r in rows])
  targets = np.concatenate([r["targets"][0] for r in rows])
  np.testing.assert_array_equal(weights == 0, vocab.is_sentinel(targets))  # one loss weight


def test_neighbours_of_other_code_shards_are_refused(vocab, tmp_path):
  """The stream reads each code file beside its neighbour file, record for record: neighbours
  made for other code shards (other files, other counts, or another record at a place) would
  put one record's neighbours before another. The manifest's counts are checked before the
  stream starts, and each record's key as it reads."""
  records = random_records(12)
  codes_dir, directory = tmp_path / "codes", tmp_path / "neighbours"
  write_shards(codes_dir, "validation", records, shard_size=5)
  ids = np.array([[(i + 1) % 12, (i + 2) % 12] for i in range(12)])
  cm3_config = {"retrieval": {"retriever": "", "memory": "", "neighbours_dir": str(directory),
                              "documents": 2}}
  retrieved = retrieved_of(records, 2, ids, directory, "validation", 5)

  def finish(shard_records, codes=codes_dir):
    neighbours.finish(str(directory), "validation", {
        "records": 12, "shards": len(shard_records), "shard_records": shard_records,
        "codes": os.path.abspath(codes), "per_record": 2, "tokens_per_image": TOKENS_PER_IMAGE})
    return data.retrieved_documents(cm3_config, str(tmp_path), str(codes_dir), "validation")

  assert finish([5, 5, 2]) == retrieved
  for counts, codes in (([6, 4, 2], codes_dir), ([5, 5, 2], tmp_path / "other")):
    with pytest.raises(ConfigError, match=r"^the validation neighbours in .* were computed for "
                                          r"the 12 records in 3 files of .*, not the 12 in 3 of "
                                          ".*: run python -m cm3jax.build_neighbours$"):
      finish(counts, codes)
  os.remove(neighbours.shard_path(str(directory), "validation", 1))
  with pytest.raises(ConfigError, match=r"lacks 1 of the 3 validation neighbour files .* "
                                        r"\(validation-00001.tfrecord first\)"):
    finish([5, 5, 2])
  with pytest.raises(ConfigError, match="documents=3 but .* holds 2 neighbours per record"):
    data.retrieved_documents({"retrieval": {**cm3_config["retrieval"], "documents": 3}},
                             str(tmp_path), str(codes_dir), "validation")
  # Neighbour files cut at other records fail the stream at the first record out of place.
  shifted = retrieved_of(records, 2, ids, tmp_path / "shifted", "validation", 4)._replace(
      paths=retrieved.paths)
  for shard in range(3):
    shutil.copy(neighbours.shard_path(str(tmp_path / "shifted"), "validation", shard),
                retrieved.paths[shard])
  with pytest.raises(tf.errors.InvalidArgumentError, match="not aligned with its code file"):
    list(stream(codes_dir, vocab, split="validation", rows=1, repeat=False, seq_len=256,
                retrieved=shifted))


def test_whole_segment_spans_come_from_the_record_after_retrieved_documents(vocab):
  seg = lambda start: list(range(start, start + 5))
  image = lambda start: list(range(vocab.image_offset + start, vocab.image_offset + start + 4))
  doc = ([EOS] + seg(10) + [vocab.break_id] + image(0) + [EOS] + seg(20) + [vocab.break_id]
         + image(10))
  own = [seg(20), image(10)]
  seen = set()
  for s in range(40):
    _, spans = unmask(mask(doc, (s, 5), vocab, whole_segment_rate=1.0, whole_from_last=2), vocab)
    assert len(spans) == 1 and spans[0] in own
    seen.add(tuple(spans[0]))
  assert len(seen) == 2


def test_resume_with_retrieval_continues_with_identical_batches(vocab, tmp_path):
  records = random_records(60)
  write_shards(tmp_path, "train", records, shard_size=20)
  ids = [[(i + 5) % 60, (i + 11) % 60, -1] for i in range(60)]
  retrieved = retrieved_of(records, 2, ids, tmp_path / "neighbours", "train", 20)
  run = lambda **kw: stream(tmp_path, vocab, seq_len=128, retrieved=retrieved, **kw)
  first = run()
  batches = [next(first) for _ in range(10)]
  assert batches[-1]["position"][-1][0] >= 1  # crossed an epoch
  resumed = run(position=cm3.Position(*batches[4]["position"][0]))
  for want in batches[4:]:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
