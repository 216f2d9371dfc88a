"""Instruction-tuning records and the shapes task suite: template layouts, ground truth that the
pixel analyser reads back, the held-out pairs kept out of training, and JSONL input."""

import collections
import json

import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import sft, shapes, shapes_analyser, shapes_tasks
from cm3jax.prepare import tokenize_tasks, train_tokenizer

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def vocab():
  texts = [shapes.scene("train", i).caption() for i in range(300)]
  texts += [r.input[0] for r in (shapes_tasks.example(t, "train", i)
                                 for t in ("grounded", "seg2image") for i in range(50))]
  return Vocab(train_tokenizer.train(texts, 400), num_sentinels=16, num_image_codes=64)


def pictures(record):
  return [s for s in record.input + record.output if isinstance(s, shapes_tasks.Picture)]


def read(picture):
  return shapes_analyser.analyse(picture.render())


def truth(picture):
  return shapes.described(picture.drawn())


@pytest.mark.parametrize("task", sft.TASKS)
def test_each_template_lays_out_its_document_and_marks_where_the_output_starts(vocab, task):
  record = shapes_tasks.example(task, "train", 3)
  codes = {}
  image_codes = lambda p: codes.setdefault(p, np.arange(4) + 4 * len(codes))
  tokens, start = sft.encode(vocab, record, image_codes)
  segments = [s if isinstance(s, str) else codes[s] for s in record.input + record.output]
  np.testing.assert_array_equal(tokens, vocab.encode_document(segments))
  assert tokens[0] == EOS and tokens[start - 1] == vocab.break_id
  assert list(tokens[:start - 1]) == list(vocab.encode_document(segments[:len(record.input)]))
  outputs = vocab.decode_document(np.concatenate([[EOS], tokens[start:]]))
  for got, want in zip(outputs, segments[len(record.input):], strict=True):
    if isinstance(want, str):
      assert got == want
    else:
      np.testing.assert_array_equal(got, want)


def test_the_templates_words():
  photo, seg = "IMG", "MAP"
  assert sft.edit(photo, "make the red circle blue", "OUT") == sft.Record(
      "edit", ("Edit first image following the instruction", "IMG", "make the red circle blue"),
      ("OUT",))
  assert sft.grounded("a red circle", [("red circle", [1, 2, 3, 4])], photo).input == (
      "Generate high quality image of a red circle with segmentations red circle at 1 2 3 4",)
  assert sft.seg2image(seg, "a red circle", photo).input == (
      "Make high quality image from segmentation map features", "MAP", "a red circle")
  assert sft.caption(photo, "a red circle") == sft.Record(
      "caption", ("IMG", "Describe the given picture."), ("a red circle",))
  record = sft.vqa(photo, "how many objects are there?", "one")
  assert record.output == ("Answer: one.",) and sft.answer_of(record.output[0]) == "one"
  assert sft.answer_of("one") == "" and sft.answer_of("Answer: two") == ""
  with pytest.raises(ConfigError, match="needs an input and an output"):
    sft.Record("caption", ("IMG",), ())


@pytest.mark.parametrize("split", SPLITS)
def test_every_picture_of_the_suite_is_read_back_as_its_ground_truth(split):
  for task in sft.TASKS:
    for i in range(25):
      for picture in pictures(shapes_tasks.example(task, split, i)):
        assert read(picture) == truth(picture), (task, i, picture)


def test_an_edit_changes_what_it_says_and_nothing_else():
  kinds = set()
  for i in range(300):
    record = shapes_tasks.example("edit", "train", i)
    _, source, instruction = record.input
    before, after = source.scene, record.output[0].scene
    assert after.background == before.background
    words = instruction.split(" ")
    old = {t.words() for t in before.things}
    new = {t.words() for t in after.things}
    if words[0] == "make":  # make the C S {colour | size}
      kinds.add("colour" if words[-1] in shapes.COLOURS else "size")
      assert after.place == before.place and len(old - new) == len(new - old) == 1
      (a,), (b,) = old - new, new - old
      a, b = a.split(" "), b.split(" ")
      changed = [k for k in range(3) if a[k] != b[k]]
      assert changed == [1 if words[-1] in shapes.COLOURS else 0] and b[changed[0]] == words[-1]
      assert " ".join(a[1:]) == " ".join(words[2:4])
    elif words[0] == "turn":  # turn the C S into a S2
      kinds.add("shape")
      (a,), (b,) = old - new, new - old
      assert a.split(" ")[:2] == b.split(" ")[:2] and b.split(" ")[2] == words[-1]
    elif words[0] == "move":
      kinds.add("move")
      assert new == old and shapes_tasks.MOVES[after.place] == " ".join(words[4:])
    elif words[0] == "remove":
      kinds.add("remove")
      assert len(after.things) == 1 and " ".join(words[2:]) not in {
          f"{t.colour} {t.shape}" for t in after.things}
      assert shapes.described(after) < shapes.described(before)
    else:
      assert words[0] == "add"
      kinds.add("add")
      assert shapes.described(before) < shapes.described(after)
      added, _, beside = " ".join(words[2:]).rpartition(" the ")
      assert after.caption() == f"a {added} a {before.things[0].size} {beside}"
  assert kinds == set(shapes_tasks.EDITS)


def test_the_answers_and_boxes_are_true_of_the_picture():
  for i in range(200):
    record = shapes_tasks.example("vqa", "validation", i)
    image, asked = record.input
    things = read(image)
    q, answer = asked[len("Question: "):], sft.answer_of(record.output[0])
    if q.startswith("how many"):
      assert answer == shapes_tasks.COUNTS[len(things)]
    elif q.startswith("what colour is the "):
      shape = q[len("what colour is the "):-1]
      assert [c for _, c, s, _ in things if s == shape] == [answer]
    elif q.startswith("what shape is the "):
      colour = q[len("what shape is the "):].split(" ")[0]
      assert [s for _, c, s, _ in things if c == colour] == [answer]
    elif q.endswith("large or small?"):
      colour, shape = q.split(" ")[2:4]
      assert [z for z, c, s, _ in things if (c, s) == (colour, shape)] == [answer]
    else:
      first, second = image.scene.things
      for relation in shapes.RELATIONS:
        if q == f"is the {first.colour} {first.shape} {relation} the {second.colour} {second.shape}?":
          same = shapes.described(shapes.Scene((first, second), relation, 0)) == things
          assert answer == ("yes" if same else "no")
          break
      else:
        raise AssertionError(q)
  for i in range(50):
    record = shapes_tasks.example("grounded", "train", i)
    s = record.output[0].scene
    for thing, (name, (x0, y0, x1, y1)) in zip(s.things, shapes_tasks.boxes(s)):
      alone = shapes.Scene((thing,), shapes_tasks.PLACE_AT[s.centres()[s.things.index(thing)]], 0)
      ys, xs = np.nonzero(np.any(shapes.render(alone) != shapes.BACKGROUNDS[0], -1))
      assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, name
      assert f"{name} at {x0} {y0} {x1} {y1}" in record.input[0]


def test_training_examples_never_show_a_held_out_pair_and_each_test_source_holds_one():
  held = set(shapes.HELD_OUT)
  for task in sft.TASKS:
    for split in ("train", "validation"):
      for i in range(40):
        record = shapes_tasks.example(task, split, i)
        for picture in pictures(record):
          assert not {(c, s) for _, c, s, _ in read(picture)} & held, (task, split, i)
        text = " ".join(s for s in record.input + record.output if isinstance(s, str))
        assert not any(f"{c} {s}" in text for c, s in held), (task, text)
    for i in range(40):
      source = pictures(shapes_tasks.example(task, "test", i))[0].scene
      assert {(t.colour, t.shape) for t in source.things} & held, (task, i)


def test_the_suite_is_deterministic_and_refuses_unknown_tasks():
  assert shapes_tasks.example("edit", "train", 5) == shapes_tasks.example("edit", "train", 5)
  assert shapes_tasks.example("edit", "train", 5) != shapes_tasks.example("edit", "train", 6)
  with pytest.raises(ValueError, match="'draw' is not one of"):
    shapes_tasks.example("draw", "train", 0)


def test_jsonl_keeps_good_lines_and_counts_bad_ones(tmp_path):
  path = tmp_path / "data.jsonl"
  good = {"task": "edit", "input": ["Edit first image following the instruction",
                                    {"image": "a.png"}, "make it blue"],
          "output": [{"image": "b.png"}]}
  rows = [json.dumps(good), "", "{not json", json.dumps([1, 2]),
          json.dumps({**good, "extra": 1}), json.dumps({**good, "task": ""}),
          json.dumps({**good, "input": "text"}), json.dumps({**good, "output": []}),
          json.dumps({**good, "input": [{"image": 3}]}), json.dumps({**good, "input": [7]}),
          json.dumps({"task": "caption", "input": [{"image": "c.png"}], "output": ["a cat"]})]
  path.write_text("\n".join(rows) + "\n")
  records, bad = sft.read_jsonl(str(path))
  assert [r.task for r in records] == ["edit", "caption"]
  assert records[0].input[1] == sft.ImagePath("a.png") and records[0].output == (
      sft.ImagePath("b.png"),)
  assert bad == {"not JSON": 1, "not an object of task, input and output": 2,
                 "task is not a name": 1, "input or output is not a list": 1,
                 "empty input or output": 1, "an item is text or {\"image\": PATH}": 2}
  with pytest.raises(ConfigError, match="cannot read"):
    sft.read_jsonl(str(tmp_path / "none.jsonl"))


def test_jsonl_lines_that_broke_tokenize_tasks_are_skipped_and_counted(tmp_path):
  """Before, one line not UTF-8 (a 0xe9 byte), nested 200k deep (RecursionError) or with a lone
  surrogate escape (json reads it; writing the shard failed) stopped the whole split with a
  traceback. Now each is counted by its reason, and the good lines, \\r\\n ones too, are kept."""
  good = {"task": "caption", "input": ["a picture"], "output": ["a red circle"]}
  cafe = json.dumps({**good, "output": ["caf\u00e9"]}, ensure_ascii=False)
  lines = [json.dumps(good).encode(), cafe.encode() + b"\r", cafe.encode("latin-1"),
           b"[" * 200_000 + b"]" * 200_000, b'{"task": "caption", "input": ' + b"[" * 200_000,
           b'{"task": "caption", "input": [7' + b"0" * 5000 + b'], "output": ["x"]}',
           json.dumps({**good, "input": ["\ud800"]}).encode(),
           json.dumps({**good, "input": [{"image": "\udfff.png"}]}).encode(),
           json.dumps({**good, "task": "\ud800"}).encode(), b'"just a string"', b"",
           json.dumps({"task": "caption", "input": ["a picture"]}).encode()]
  (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  records, bad = sft.read_jsonl(str(tmp_path / "train.jsonl"))
  assert records == [sft.Record("caption", ("a picture",), ("a red circle",)),
                     sft.Record("caption", ("a picture",), ("caf\u00e9",))]
  expected = {"not UTF-8": 1, "nested too deeply": 2, "not JSON": 1,
              "text with a lone surrogate": 3, "not an object of task, input and output": 2}
  assert bad == expected
  skipped = collections.Counter()
  made = tokenize_tasks.records(f"jsonl:{tmp_path}/{{split}}.jsonl", "train", 1, skipped)
  assert list(made) == records and skipped == expected  # the split's counts by reason
