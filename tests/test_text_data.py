"""Text-only CM3 (data="text"): the corpora, tokenize_text's record shards and their resume, the
CM3 stream over text records (masking, packing, exact resume) and the source's refusals (the
text_tiny job from the command line: tests/jobs/test_text_data.py)."""

import collections
import json
import os
import time

import numpy as np
import pytest
import tensorflow as tf

from cm3jax import data
from cm3jax.config import ConfigError
from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import cm3, code_shards, text_corpus
from cm3jax.prepare import tokenize_text, train_tokenizer
from tests.helpers import load_config, override
from tests.test_cm3_data import unmask

DOCUMENTS = [text_corpus.shapes_document("train", i) for i in range(300)]


@pytest.fixture(scope="module")
def vocab():
  return Vocab(train_tokenizer.train(DOCUMENTS, 320), num_sentinels=8, num_image_codes=0)


def write_corpus(directory, split, documents):
  path = directory / f"corpus_{split}.txt"
  path.write_text("\n\n".join(documents) + "\n")
  return f"files:{directory}/corpus_{{split}}.txt"


def test_shapes_text_states_each_relation_and_its_converse():
  assert text_corpus.shapes_document("validation", 5) == text_corpus.shapes_document("validation", 5)
  assert text_corpus.shapes_document("train", 5) != text_corpus.shapes_document("validation", 5)
  two = [s for d in DOCUMENTS for s in d.split(". ") if ", so " in s]
  assert len(two) > 100
  for sentence in two:
    first_half, converse = sentence.rstrip(".").split(", so the ")
    for relation, inverse in text_corpus.CONVERSE.items():
      if f" {relation} a " in first_half:
        a, b = first_half[2:].split(f" {relation} a ")
        assert converse == f"{b} is {inverse} the {a}", sentence
        break
    else:
      raise AssertionError(sentence)


@pytest.mark.parametrize("max_chars", [1, 7, 40, 1000])
def test_chunks_cut_at_whitespace_and_keep_every_word(max_chars):
  text = "a small red circle above a large blue square,\nso the large blue square is below it."
  pieces = text_corpus.chunks(text, max_chars)
  assert all(1 <= len(p) <= max_chars for p in pieces)
  assert "".join("".join(p.split()) for p in pieces) == "".join(text.split())
  if max_chars >= 7:  # no word is longer than 6 characters: none is cut inside
    assert sum(len(p.split()) for p in pieces) == len(text.split())


def cut_by_the_rule(text, max_chars):
  """The cutting rule as stated: a text longer than max_chars loses its first piece, up to the
  last space or newline after its first character within max_chars + 1 characters (else its first
  max_chars characters); what follows, less its leading whitespace, is cut again."""
  if len(text) <= max_chars:
    return [text] if text else []
  cut = max((i for i, c in enumerate(text[:max_chars + 1]) if c in " \n" and i > 0),
            default=max_chars)
  return [text[:cut]] + cut_by_the_rule(text[cut:].lstrip(), max_chars)


def test_chunks_cut_a_varied_text_as_the_rule_says():
  """The linear cutter cuts as the rule says (as the quadratic one did) on a varied text: words
  longer than a piece, runs and mixes of whitespace (tabs, \\r, and U+3000, which is stripped
  but not cut at), leading whitespace, non-ASCII letters."""
  rng = np.random.default_rng(0)
  alphabet = list("abcdefgh") + ["é", "水", "🙂", " ", " ", "\n", "\t", "\r", "\u3000"]
  for case in range(150):
    words = ["".join(rng.choice(alphabet[:11], int(rng.integers(1, 30))))
             for _ in range(int(rng.integers(0, 60)))]
    gaps = ["".join(rng.choice(alphabet[11:], int(rng.integers(1, 4)))) for _ in words]
    text = "".join(g + w for g, w in zip(gaps, words))[int(rng.integers(0, 2)):]
    for max_chars in (1, 2, 5, 17, 100):
      assert text_corpus.chunks(text, max_chars) == cut_by_the_rule(text, max_chars), (case, text)


def test_chunks_take_less_time_than_a_linear_pass():
  """Before, chunks copied the rest of the text at each cut: an 8 MB document with no blank line
  took 40x to 67x the time of splitting it into words, a linear pass (here on 2 cores); now 0.2x.
  The best of 5 timings of each, interleaved, against 10x: a guard of the complexity with room for
  a loaded machine, not a performance figure (those are in benchmarks/tokenize_text.py)."""
  text = ("some words of a line\nand of the next " * 220_000)[:8_000_000]
  seconds = {"chunks": [], "split": []}
  for _ in range(5):
    for name, cut in (("chunks", lambda: text_corpus.chunks(text, 1000)), ("split", text.split)):
      start = time.perf_counter()
      cut()
      seconds[name].append(time.perf_counter() - start)
  assert min(seconds["chunks"]) < 10 * min(seconds["split"]), seconds


def test_file_documents_are_separated_by_blank_lines_and_bad_ones_counted(tmp_path):
  (tmp_path / "a_train.txt").write_bytes(b"one\nline two\n\n  \n\nthree\r\n\r\ncaf\xe9\n\n")
  skipped = collections.Counter()
  got, total = text_corpus.documents(f"files:{tmp_path}/*_{{split}}.txt", "train", skipped)
  assert [t for _, t in got] == [b"one\nline two", b"three"] and total is None
  assert skipped == {"not UTF-8": 1}


@pytest.mark.parametrize("dataset, max_chars, message", [
    ("wikitext", 1000, "--dataset='wikitext' is not one of shapes_text, files:PATTERN or tfds"),
    ("files:/nonexistent/*.txt", 1000, "files:/nonexistent/\\*.txt matches no file"),
    ("tfds:shapes", 1000, "tfds:shapes: expected tfds:NAME:FIELD"),
    ("shapes_text", 0, "--max_chars=0 must be at least 1"),
])
def test_corpus_refusals(dataset, max_chars, message):
  with pytest.raises(ConfigError, match=message):
    docs, _ = text_corpus.documents(dataset, "train", collections.Counter(), max_chars=max_chars)
    next(docs)


def records_of(directory, split):
  paths = code_shards.shard_paths(str(directory), split)
  return list(tf.data.TFRecordDataset(paths).as_numpy_iterator())


def test_tokenize_text_resumes_after_whole_shards_and_refuses_other_settings(tmp_path):
  dataset = write_corpus(tmp_path, "train", DOCUMENTS[:45])
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  summary = tokenize_text.tokenize_split(dataset, "train", str(whole), max_chars=120,
                                         shard_size=10)
  assert summary["tokens_per_image"] == 0 and summary["codebook_size"] == 0
  expected = sum(len(text_corpus.chunks(d, 120)) for d in DOCUMENTS[:45])
  assert summary["records"] == expected > 45 and summary["shards"] == -(-expected // 10)
  tokenize_text.tokenize_split(dataset, "train", str(cut), max_chars=120, shard_size=10)
  os.remove(code_shards.manifest_path(str(cut), "train"))  # as if stopped after 2 shards
  for shard in range(2, summary["shards"]):
    os.remove(code_shards.shard_path(str(cut), "train", shard))
  with pytest.raises(ConfigError, match="made with max_chars=120 \\(this run: 200\\)"):
    tokenize_text.tokenize_split(dataset, "train", str(cut), max_chars=200, shard_size=10)
  resumed = tokenize_text.tokenize_split(dataset, "train", str(cut), max_chars=120, shard_size=10)
  assert resumed == summary and records_of(cut, "train") == records_of(whole, "train")
  parse = code_shards.parser(0)
  first = parse(tf.constant(records_of(whole, "train")[0]))
  assert first["codes"].shape == (0,) and first["caption"].numpy() == DOCUMENTS[0][:120].rsplit(
      " ", 1)[0].encode()


def text_shards(tmp_path, split, documents, shard_size=20):
  dataset = write_corpus(tmp_path, split, documents)
  out = tmp_path / "codes"
  tokenize_text.tokenize_split(dataset, split, str(out), shard_size=shard_size)
  return out


def stream(directory, vocab, split="train", seq_len=256, rows=4, **kwargs):
  return cm3.batches(codes_dir=str(directory), split=split, vocab=vocab, seq_len=seq_len,
                     rows=rows, seed=(0, 1), **kwargs)


@pytest.mark.parametrize("host, num_hosts", [(0, 1), (1, 2)])
def test_text_records_are_masked_and_packed_whole(vocab, tmp_path, host, num_hosts):
  documents = DOCUMENTS[:40]
  out = text_shards(tmp_path, "validation", documents, shard_size=40)  # read in record order
  skipped = collections.Counter()
  rows = list(stream(out, vocab, "validation", rows=1, repeat=False, host=host,
                     num_hosts=num_hosts, skipped=skipped))
  base = cm3.stream_seed((0, 1), "validation", host)
  mine = documents[host::num_hosts]
  masked = [cm3.cm3_mask(np.array([EOS] + vocab.encode_text(d), np.int32),
                         tf.constant((base, i), tf.int64), vocab).numpy()
            for i, d in enumerate(mine)]
  for doc, text in zip(masked, mine):  # each document is `</s> text` with its spans moved
    restored, spans = unmask(doc, vocab)
    assert restored == [EOS] + vocab.encode_text(text) and 1 <= len(spans) <= 8
  expected = np.concatenate(masked)
  windows = np.concatenate([np.concatenate([r["inputs"][0], r["targets"][0, -1:]]) for r in rows])
  assert len(expected) - len(windows) < 257 and not skipped
  np.testing.assert_array_equal(windows, expected[:len(windows)])
  for r in rows:
    sentinel = vocab.is_sentinel(r["targets"][0])
    np.testing.assert_array_equal(r["weights"][0], (~sentinel).astype(np.float32))


def test_text_stream_resumes_with_identical_batches(vocab, tmp_path):
  out = text_shards(tmp_path, "train", DOCUMENTS[:50])
  first = stream(out, vocab, document_attention=True)
  batches = [next(first) for _ in range(14)]
  assert batches[-1]["position"][-1][0] >= 1  # past the first epoch
  for k in (2, 9):
    resumed = stream(out, vocab, document_attention=True,
                     position=cm3.Position(*batches[k]["position"][0]))
    for want in batches[k:]:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def source_config(tmp_path, data_kind, **cm3):
  config = load_config("text_tiny.py").get_config()
  return override(config, {"data": data_kind, "cm3.codes_dir": str(tmp_path / "codes"),
                           **{f"cm3.{k}": v for k, v in cm3.items()}})


def test_the_source_refuses_records_of_the_other_kind(vocab, tmp_path):
  with pytest.raises(ConfigError, match="no complete train split of text records .* "
                     "python -m cm3jax.tokenize_text"):
    data.source(source_config(tmp_path, "text"), str(tmp_path))
  for split in data.SPLITS:
    text_shards(tmp_path, split, DOCUMENTS[:10])
  with pytest.raises(ConfigError, match="holds text records with no image codes: data='text'"):
    data.source(source_config(tmp_path, "cm3"), str(tmp_path))
  with pytest.raises(ConfigError, match="cm3.retrieval.documents > 0 retrieves images"):
    data.source(source_config(tmp_path, "text", **{"retrieval.documents": 1}), str(tmp_path))
  with open(code_shards.manifest_path(str(tmp_path / "codes"), "train")) as f:
    manifest = json.load(f)
  manifest.update(tokens_per_image=16, codebook_size=64)
  with open(code_shards.manifest_path(str(tmp_path / "codes"), "train"), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(ConfigError, match="holds image codes: data='cm3' trains on them"):
    data.source(source_config(tmp_path, "text"), str(tmp_path))


def test_a_text_only_vocabulary_has_no_image_ids(vocab):
  assert vocab.num_image_codes == 0 and vocab.image_offset == vocab.sentinel_base + 8
  assert vocab.size == 384 and not vocab.is_image(np.arange(vocab.size)).any()
  with pytest.raises(ConfigError, match="at least 0 image codes"):
    Vocab(vocab.spm_model, 8, -1)
