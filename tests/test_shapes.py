import numpy as np
import pytest

from cm3jax.data import shapes


def test_examples_are_deterministic_and_exactly_captioned():
  a, b = shapes.example("train", 7), shapes.example("train", 7)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"]
  assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
  assert shapes.example("train", 8)["caption"] != a["caption"] or not np.array_equal(
      shapes.example("train", 8)["image"], a["image"])
  assert shapes.example("train", 7, seed=1)["caption"] != a["caption"] or not np.array_equal(
      shapes.example("train", 7, seed=1)["image"], a["image"])


def test_caption_grammar_and_rendered_colours():
  for i in range(200):
    s = shapes.scene("train", i)
    words = s.caption().split()
    assert words[0] == "a" and words[1] in shapes.SIZES and words[2] in shapes.COLOURS
    assert words[3] in shapes.SHAPES
    image = shapes.render(s)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {shapes.BACKGROUNDS[s.background]} | {shapes.COLOURS[t.colour] for t in s.things}


def _pairs(split, n):
  return [{(t.colour, t.shape) for t in shapes.scene(split, i).things} for i in range(n)]


ALL_PAIRS = {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}


def test_test_split_holds_out_compositions():
  held_out = set(shapes.HELD_OUT)
  train, validation = (_pairs(s, shapes.SPLITS[s][1]) for s in ("train", "validation"))
  assert len(train) == 20000 and len(validation) == 1000
  assert all(not (p & held_out) for p in train + validation)  # every record of both splits
  assert all(p & held_out for p in _pairs("test", 1000))
  assert set().union(*train) == ALL_PAIRS - held_out


def test_the_tokenizer_split_covers_every_pair_with_images_of_its_own():
  tokenizer = _pairs("tokenizer", 2000)
  assert set().union(*tokenizer) == ALL_PAIRS
  held_out_share = np.mean([bool(p & set(shapes.HELD_OUT)) for p in tokenizer])
  assert 0.25 < held_out_share < 0.45, held_out_share  # 1/4 of lone things, about 7/16 of pairs
  captions = {shapes.scene(s, i).caption() for s in ("train", "test") for i in range(200)}
  assert not {shapes.scene("tokenizer", i).caption() for i in range(200)} <= captions
  for i in range(50):  # no image is another split's: the renderer draws from its own seed
    image = shapes.render(shapes.scene("tokenizer", i))
    assert not any(np.array_equal(image, shapes.render(shapes.scene(s, i)))
                   for s in ("train", "validation", "test"))


def test_variety():
  scenes = [shapes.scene("train", i) for i in range(500)]
  assert {len(s.things) for s in scenes} == {1, 2}
  assert {s.place for s in scenes} == set(shapes.POSITIONS) | set(shapes.RELATIONS)
  assert {s.background for s in scenes} == set(range(len(shapes.BACKGROUNDS)))
  assert {t.size for s in scenes for t in s.things} == set(shapes.SIZES)


def test_unknown_split():
  with pytest.raises(ValueError, match="split 'dev' is not one of"):
    shapes.scene("dev", 0)
