"""The instruction-tuning stream and its shards: the loss weights of loss_on, the task mixture's
rounds, exact resume, the hosts' partition, and tokenize_tasks with its bad rows."""

import collections
import dataclasses
import itertools
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cm3jax import data
from cm3jax.config import ConfigError
from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import cm3, sft, sft_stream, shapes, shapes_tasks, task_shards
from cm3jax.prepare import tokenize_tasks, train_tokenizer
from tests.helpers import tiny_config
from tests.test_cm3_data import unmask

CODES, T = 64, 8


@pytest.fixture(scope="module")
def vocab():
  texts = [shapes.scene("train", i).caption() for i in range(500)]
  return Vocab(train_tokenizer.train(texts, 320), num_sentinels=16, num_image_codes=CODES)


def text_to_image(n, seed=0, task="draw"):
  """Records of text in and an image out, so a token's kind tells which part it came from."""
  rng = np.random.default_rng(seed)
  return [sft.Record(task, (shapes.scene("train", seed * 1000 + i).caption(),),
                     (rng.integers(0, CODES, T),)) for i in range(n)]


def stream(vocab, records, split="validation", rows=4, seq_len=64, **kwargs):
  return sft_stream.dataset(tasks_dir="", split=split, vocab=vocab, seq_len=seq_len, rows=rows,
                            seed=(0,), records=records, **kwargs).as_numpy_iterator()


def windows(batches, count):
  """The stream's first `count` batches as windows: tokens [seq_len + 1] and their weights."""
  out = []
  for _ in range(count):
    b = next(batches)
    for inputs, targets, weights in zip(b["inputs"], b["targets"], b["weights"]):
      out.append((np.concatenate([inputs[:1], targets]), np.concatenate([[0.0], weights])))
  return out


@pytest.mark.parametrize("loss_on", ["all", "output"])
def test_loss_on_weights_the_output_or_every_token(vocab, loss_on):
  """Each masked document, moved back: with loss_on="output" exactly its image tokens (the
  output), the <eoss> of a span of them and its </s> are weighted targets; with "all" every
  token but the sentinels."""
  records = {"draw": text_to_image(40)}
  made = windows(stream(vocab, records, loss_on=loss_on, span_rate=2.0, max_spans=4), 12)
  tokens = np.concatenate([w[0] for w in made])
  weights = np.concatenate([w[1] for w in made])
  known = np.concatenate([np.arange(len(w[0])) > 0 for w in made])  # a window's first: no target
  starts = np.flatnonzero(tokens == EOS)
  checked = 0
  for begin, end in zip(starts[:-1], starts[1:]):
    doc, w, seen = tokens[begin:end], weights[begin:end], known[begin:end]
    _, spans = unmask(doc, vocab)  # a whole CM3-masked document; <eoss> i closes span i
    eoss = iter(bool(vocab.is_image(span[0])) for span in spans)
    expected = []
    for i, t in enumerate(doc):
      if vocab.is_sentinel(t):
        expected.append(0.0)
      elif loss_on == "all" or i == 0:
        expected.append(1.0)
      elif t == vocab.eoss_id:
        expected.append(float(next(eoss)))
      else:
        expected.append(float(vocab.is_image(t)))
    np.testing.assert_array_equal(w[seen], np.array(expected)[seen])
    checked += 1
  assert checked > 5


def test_round_draws_repeat_or_take_part_of_each_task_by_its_rate():
  sizes, rates = [10, 20, 5], [2.0, 0.5, 0.0]
  first = sft_stream.round_draws(sizes, rates, seed=3, round_=0)
  counts = collections.Counter(first.tolist())
  assert sorted(set(counts.values())) == [1, 2]
  assert all(counts[i] == 2 for i in range(10))  # the upsampled task: each record twice
  halves = [set(sft_stream.round_draws(sizes, rates, 3, r).tolist()) - set(range(10))
            for r in range(2)]
  assert all(len(h) == 10 and h <= set(range(10, 30)) for h in halves)  # half of task 2
  assert halves[0] != halves[1]  # another half each round
  assert len(first) == 30 and not set(first.tolist()) & set(range(30, 35))  # rate 0: none
  np.testing.assert_array_equal(first, sft_stream.round_draws(sizes, rates, 3, 0))
  assert not np.array_equal(np.sort(first), first)  # the tasks are mixed, not one after another


@pytest.mark.parametrize("mixture, message", [
    ("draw:x", "is not TASK:RATE with a rate >= 0"), ("draw:-1", "is not TASK:RATE"),
    ("paint:2", r"names task 'paint'; the shards hold \['draw', 'say'\]"),
    ("draw:0,say:0", "gives every task rate 0")])
def test_bad_mixtures_are_one_line_errors(mixture, message):
  with pytest.raises(ConfigError, match=message):
    sft_stream.rates(mixture, ["draw", "say"])


def test_the_train_stream_follows_the_mixture(vocab):
  """Task `say` (rate 3, its codes in the upper half) holds a third of the records and gives
  60% of the draws."""
  say = [dataclasses.replace(r, output=(r.output[0] // 2 + CODES // 2,))
         for r in text_to_image(20, 1, "say")]
  records = {"draw": [dataclasses.replace(r, output=(r.output[0] // 2,))
                      for r in text_to_image(40, 0, "draw")], "say": say}
  made = windows(stream(vocab, records, "train", rows=8, mixture="say:3"), 30)
  codes = vocab.image_codes(np.concatenate([w[0][vocab.is_image(w[0])] for w in made]))
  share = np.mean(codes >= CODES // 2)
  assert 0.55 < share < 0.65, share


def test_the_first_validation_batch_holds_every_task(vocab):
  """Evaluations read a few batches: they must not be all of the first task."""
  records = {t: [dataclasses.replace(r, output=(r.output[0] // 4 + i * CODES // 4,))
                 for r in text_to_image(30, i, t)] for i, t in enumerate(("a", "b", "c", "d"))}
  made = windows(stream(vocab, records, "validation", rows=4), 1)
  codes = vocab.image_codes(np.concatenate([w[0][vocab.is_image(w[0])] for w in made]))
  assert set(codes // (CODES // 4)) == {0, 1, 2, 3}


@pytest.mark.parametrize("host, num_hosts", [(0, 1), (1, 2)])
def test_resume_continues_with_identical_batches(vocab, host, num_hosts):
  records = {"draw": text_to_image(30, 0, "draw"), "say": text_to_image(12, 1, "say")}
  kwargs = dict(split="train", mixture="say:2.5,draw:0.5", host=host, num_hosts=num_hosts,
                loss_on="output")
  straight = stream(vocab, records, **kwargs)
  batches = [next(straight) for _ in range(14)]  # crosses rounds
  for k in (3, 9):
    position = cm3.Position(*batches[k]["position"][0])
    resumed = stream(vocab, records, position=position, **kwargs)
    for want in batches[k:k + 4]:
      got = next(resumed)
      for key in ("inputs", "targets", "weights", "position"):
        np.testing.assert_array_equal(got[key], want[key])


def documents_of(vocab, made):
  """The records whose documents the windows hold whole, by their codes (see `numbered`)."""
  tokens = np.concatenate([w[0] for w in made])
  starts = np.flatnonzero(tokens == EOS)
  ids = []
  for begin, end in zip(starts[:-1], starts[1:]):
    doc, _ = unmask(tokens[begin:end], vocab)
    codes = vocab.image_codes(np.array([t for t in doc if vocab.is_image(t)]))
    ids.append(int(codes[0]) * CODES + int(codes[1]))
  return ids


def numbered(n, task):
  """Records whose first two codes number them."""
  return [sft.Record(task, (r.input[0],), (np.concatenate([[i // CODES, i % CODES],
                                                           r.output[0][2:]]),))
          for i, r in enumerate(text_to_image(n))]


def test_the_hosts_read_their_share_of_each_round_in_order(vocab):
  records = {"draw": numbered(40, "draw")}
  kwargs = dict(split="train", mixture="draw:1.5", span_rate=0.5, max_spans=1)
  rounds = [sft_stream.round_draws([40], [1.5], cm3.stream_seed((0,), "train"), r)
            for r in range(3)]
  for host in (0, 1):
    made = windows(stream(vocab, records, host=host, num_hosts=2, **kwargs), 6)
    ids = documents_of(vocab, made)
    share = np.concatenate([draws[host::2] for draws in rounds]).tolist()
    assert len(ids) > 30 and ids == share[:len(ids)]  # past the first round of 30 each


def test_records_too_long_are_skipped_and_counted(vocab):
  skipped = collections.Counter()
  long = sft.Record("draw", ("a small red circle " * 20,), (np.zeros(T, int),))
  next(stream(vocab, {"draw": text_to_image(10) + [long]}, seq_len=64, max_spans=4,
              skipped=skipped))
  assert skipped == {"record longer than the sequence": 1}
  with pytest.raises(ConfigError, match="sft.max_spans=17 must be in"):
    stream(vocab, {"draw": text_to_image(10)}, max_spans=17)
  with pytest.raises(ConfigError, match="sft.loss_on='inputs' is not one of"):
    stream(vocab, {"draw": text_to_image(10)}, loss_on="inputs")


class Tokenizer:
  """A VQGAN stand-in: an image's codes are its first T pixels' red values modulo CODES."""

  @dataclasses.dataclass
  class Config:
    resolution: int = 8
    tokens_per_image: int = T
    n_embed: int = CODES

  cfg = Config()
  fingerprint, step = "red", 0

  def encode(self, images):
    return np.stack([np.asarray(i)[0, :T, 0].astype(np.int64) % CODES for i in images])


def test_tokenize_tasks_writes_jsonl_records_and_counts_bad_rows(tmp_path):
  rng = np.random.default_rng(0)
  pixels = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)]
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(tmp_path / f"{i}.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  lines = [{"task": "edit", "input": ["Edit", {"image": "0.png"}, "make it blue"],
            "output": [{"image": "1.png"}]},
           {"task": "vqa", "input": [{"image": "1.png"}, "Question: what?"],
            "output": ["Answer: red."]},
           {"task": "edit", "input": [{"image": "broken.png"}, "x"],
            "output": [{"image": "0.png"}]},
           {"task": "vqa", "input": "not a list", "output": ["x"]}]
  (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\nnot json\n")
  out = str(tmp_path / "tasks")
  summary = tokenize_tasks.tokenize_split(Tokenizer(), f"jsonl:{tmp_path}/{{split}}.jsonl",
                                          "train", out, examples_per_task=1, shard_size=1)
  assert summary["tasks"] == {"edit": 1, "vqa": 1} and summary["shards"] == 2
  assert summary["skipped"] == {"unreadable image": 1, "not JSON": 1,
                                "input or output is not a list": 1}
  assert json.load(open(task_shards.manifest_path(out, "train"))) == summary
  edit, vqa = task_shards.read_split(out, "train")
  codes = [p[0, :T, 0].astype(np.int32) % CODES for p in pixels]
  assert edit.task == "edit" and edit.input[0] == "Edit" and edit.input[2] == "make it blue"
  np.testing.assert_array_equal(edit.input[1], codes[0])
  np.testing.assert_array_equal(edit.output[0], codes[1])
  np.testing.assert_array_equal(vqa.input[0], codes[1])
  assert vqa.input[1:] == ("Question: what?",) and vqa.output == ("Answer: red.",)
  # A complete split is reused as it is; a dataset of no record is refused.
  assert tokenize_tasks.tokenize_split(Tokenizer(), f"jsonl:{tmp_path}/{{split}}.jsonl", "train",
                                       out, 1, shard_size=1) == summary
  (tmp_path / "validation.jsonl").write_text("not json\n")
  with pytest.raises(ConfigError, match="split validation has no usable example"):
    tokenize_tasks.tokenize_split(Tokenizer(), f"jsonl:{tmp_path}/{{split}}.jsonl",
                                  "validation", out, 1)
  with pytest.raises(ConfigError, match="is not shapes_tasks or jsonl:PATH"):
    tokenize_tasks.tokenize_split(Tokenizer(), "csv:x", "test", out, 1)


def test_tokenize_tasks_refuses_a_finished_split_made_otherwise(tmp_path):
  """Before, a rerun into a finished --out with another --dataset or VQGAN returned the old
  counts (the command printed them and exited 0)."""
  out = str(tmp_path / "tasks")
  summary = tokenize_tasks.tokenize_split(Tokenizer(), "shapes_tasks", "validation", out, 2)
  assert summary["records"] == 2 * len(sft.TASKS) and summary["dataset"] == "shapes_tasks"
  other_vqgan = Tokenizer()
  other_vqgan.fingerprint = "blue"
  (tmp_path / "validation.jsonl").write_text("")
  for args, field in (((Tokenizer(), f"jsonl:{tmp_path}/{{split}}.jsonl", 2), "dataset"),
                      ((other_vqgan, "shapes_tasks", 2), "vqgan"),
                      ((Tokenizer(), "shapes_tasks", 3), "examples_per_task")):
    with pytest.raises(ConfigError, match=rf"the complete validation split in {out}: made with "
                       rf"{field}=\S+ \(this run: \S+\); run with the settings"):
      tokenize_tasks.tokenize_split(args[0], args[1], "validation", out, args[2])
  with pytest.raises(ConfigError, match=r"made with shard_size=4096 \(this run: 5\)"):
    tokenize_tasks.tokenize_split(Tokenizer(), "shapes_tasks", "validation", out, 2, shard_size=5)
  assert tokenize_tasks.tokenize_split(Tokenizer(), "shapes_tasks", "validation", out, 2) == summary


def test_tokenize_tasks_resumes_after_the_whole_shards_of_a_killed_run(tmp_path):
  made_from = tokenize_tasks.source("shapes_tasks", 2)
  suite = lambda: tokenize_tasks.records("shapes_tasks", "validation", 2, collections.Counter())
  clean = tokenize_tasks.write_split(Tokenizer(), suite(), str(tmp_path / "clean"), "validation",
                                     shard_size=5, made_from=made_from)

  def killed_at_the_eighth():
    for i, record in enumerate(suite()):
      if i == 7:
        raise KeyboardInterrupt
      yield record
  out = str(tmp_path / "tasks")
  with pytest.raises(KeyboardInterrupt):
    tokenize_tasks.write_split(Tokenizer(), killed_at_the_eighth(), out, "validation",
                               shard_size=5, made_from=made_from)
  assert sorted(os.listdir(out)) == ["validation-00000.tfrecord", "validation.settings.json"]
  class Counting(Tokenizer):
    images = 0

    def encode(self, images):
      self.images += len(images)
      return super().encode(images)
  again, resuming = Counting(), Counting()
  tokenize_tasks.write_split(again, suite(), str(tmp_path / "again"), "validation", shard_size=5,
                             made_from=made_from)
  resumed = tokenize_tasks.write_split(resuming, suite(), out, "validation", shard_size=5,
                                       made_from=made_from)
  assert 0 < resuming.images < again.images  # the first shard's records are not encoded again
  assert resumed == clean and resumed["tasks"] == {t: 2 for t in sorted(sft.TASKS)}
  for got, want in zip(task_shards.read_split(out, "validation"),
                       task_shards.read_split(str(tmp_path / "clean"), "validation"), strict=True):
    assert got.task == want.task and len(got.input) == len(want.input)
    for a, b in zip(got.input + got.output, want.input + want.output, strict=True):
      np.testing.assert_array_equal(a, b)


def test_tokenize_tasks_writes_the_shapes_suite_with_each_picture_encoded(tmp_path):
  out = str(tmp_path / "tasks")
  summary = tokenize_tasks.tokenize_split(Tokenizer(), "shapes_tasks", "validation", out, 3)
  assert summary["tasks"] == {t: 3 for t in sorted(sft.TASKS)} and summary["skipped"] == {}
  made = task_shards.read_split(out, "validation")
  suite = [shapes_tasks.example(t, "validation", i) for t in sft.TASKS for i in range(3)]
  for record, truth in zip(made, suite, strict=True):  # in the order written
    assert record.task == truth.task
    for got, want in zip(record.input + record.output, truth.input + truth.output, strict=True):
      if isinstance(want, str):
        assert got == want
      else:
        np.testing.assert_array_equal(got, Tokenizer().encode([want.render()])[0])


def test_the_configs_mixture_reaches_the_stream(vocab, tmp_path):
  """data.source passes sft.mixture on: with task `draw` at rate 0 every train batch holds
  `say` records alone (their codes in the upper half); validation still reads both."""
  records = [dataclasses.replace(r, output=(r.output[0] // 2,)) for r in text_to_image(20)]
  records += [dataclasses.replace(r, output=(r.output[0] // 2 + CODES // 2,))
              for r in text_to_image(20, 1, "say")]
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  for split in data.SPLITS:
    with tf.io.TFRecordWriter(task_shards.shard_path(str(tasks), split, 0)) as writer:
      for record in records:
        writer.write(task_shards.serialize(record))
    with open(task_shards.manifest_path(str(tasks), split), "w") as f:
      json.dump({"split": split, "records": 40, "tasks": {"draw": 20, "say": 20}, "shards": 1,
                 "tokens_per_image": T, "codebook_size": CODES, "skipped": {}}, f)
  (tmp_path / "tokenizer.model").write_bytes(vocab.spm_model)
  config = tiny_config(data="sft", seq_len=64, global_batch_size=4,
                       **{"sft.mixture": "draw:0", "cm3.max_spans": vocab.num_sentinels})
  source = data.source(config, str(tmp_path))
  upper = lambda batches: [vocab.image_codes(b["inputs"][vocab.is_image(b["inputs"])])
                           >= CODES // 2 for b in itertools.islice(batches, 8)]
  assert np.concatenate(upper(source.batches("train", (0,)))).all()
  assert not np.concatenate(upper(source.batches("validation", (0,)))).all()
