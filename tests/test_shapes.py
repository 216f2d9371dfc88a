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


def test_test_split_holds_out_compositions():
  def pairs(split, n):
    return [{(t.colour, t.shape) for t in shapes.scene(split, i).things} for i in range(n)]
  held_out = set(shapes.HELD_OUT)
  assert all(not (p & held_out) for p in pairs("train", 2000) + pairs("validation", 500))
  assert all(p & held_out for p in pairs("test", 500))
  seen = set().union(*pairs("train", 2000))
  assert seen == {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES} - held_out


def test_variety():
  scenes = [shapes.scene("train", i) for i in range(500)]
  assert {len(s.things) for s in scenes} == {1, 2}
  assert {s.place for s in scenes} == set(shapes.POSITIONS) | set(shapes.RELATIONS)
  assert {s.background for s in scenes} == set(range(len(shapes.BACKGROUNDS)))
  assert {t.size for s in scenes for t in s.things} == set(shapes.SIZES)


def test_unknown_split():
  with pytest.raises(ValueError, match="split 'dev' is not one of"):
    shapes.scene("dev", 0)
