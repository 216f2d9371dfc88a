"""The pixel analyser and the caption reader that eval_shapes scores with: every shape, colour,
size, place and relation is read back exactly, a scene that differs in any of them is not, and
'A above B' is the same scene as 'B below A'."""

import dataclasses
import itertools

import numpy as np
import pytest

from cm3jax.data import shapes, shapes_analyser

THINGS = [shapes.Thing(shape, colour, size) for shape in shapes.SHAPES
          for colour in shapes.COLOURS for size in shapes.SIZES]
INVERSE = {"above": "below", "below": "above", "to the left of": "to the right of",
           "to the right of": "to the left of"}


def single_scenes():
  """Every thing in every place, on every background in turn."""
  return [shapes.Scene((thing,), place, i % len(shapes.BACKGROUNDS))
          for i, (thing, place) in enumerate(itertools.product(THINGS, shapes.POSITIONS))]


def pair_scenes():
  """Every relation with every thing first, and every thing second (a rotation of the list)."""
  scenes = []
  for r, relation in enumerate(shapes.RELATIONS):
    for i, first in enumerate(THINGS):
      second = THINGS[(i * 7 + r * 5 + 3) % len(THINGS)]
      if (second.shape, second.colour) == (first.shape, first.colour):
        second = THINGS[(i * 7 + r * 5 + 5) % len(THINGS)]
      scenes.append(shapes.Scene((first, second), relation, (i + r) % len(shapes.BACKGROUNDS)))
  return scenes


def read(scene) -> bool:
  return shapes_analyser.analyse(shapes.render(scene)) == shapes.described(scene)


def test_every_shape_colour_size_and_place_is_read_back():
  scenes = single_scenes()
  assert len(scenes) == 4 * 6 * 2 * 5
  missed = [s.caption() for s in scenes if not read(s)]
  assert not missed, missed[:5]


def test_every_relation_and_pair_is_read_back():
  scenes = pair_scenes()
  assert {s.things[1] for s in scenes} == set(THINGS)
  missed = [s.caption() for s in scenes if not read(s)]
  assert not missed, missed[:5]


def test_every_image_of_each_split_is_read_back():
  """What the README states of the analyser, on 3,000 images of the built-in data."""
  for split in ("train", "validation", "test"):
    missed = [i for i in range(1000) if not read(shapes.scene(split, i))]
    assert not missed, (split, missed[:5])


def perturbations(scene):
  """Scenes that differ from `scene` in one colour, shape, size, place or relation."""
  first = scene.things[0]
  out = [dataclasses.replace(scene, things=(dataclasses.replace(first, **change),)
                             + scene.things[1:])
         for change in ({"colour": next(c for c in shapes.COLOURS if c != first.colour)},
                        {"shape": next(s for s in shapes.SHAPES if s != first.shape)},
                        {"size": next(s for s in shapes.SIZES if s != first.size)})]
  if len(scene.things) == 1:
    out.append(dataclasses.replace(scene, place=next(p for p in shapes.POSITIONS
                                                     if p != scene.place)))
  else:
    out.append(dataclasses.replace(scene, place=INVERSE[scene.place]))
  return out


def test_a_scene_that_differs_in_one_attribute_is_rejected():
  for scene in single_scenes()[::7] + pair_scenes()[::5]:
    truth = shapes.described(scene)
    for other in perturbations(scene):
      if other.things[0] in other.things[1:]:
        continue
      assert shapes_analyser.analyse(shapes.render(other)) != truth, (scene, other)
      assert not shapes_analyser.caption_matches(other.caption(), truth), (scene, other)


def test_a_relation_read_from_either_side_is_the_same_scene():
  for scene in pair_scenes():
    truth = shapes.described(scene)
    flipped = shapes.Scene(scene.things[::-1], INVERSE[scene.place], scene.background)
    assert shapes_analyser.caption_matches(scene.caption(), truth)
    assert shapes_analyser.caption_matches(flipped.caption(), truth), flipped.caption()
    assert shapes_analyser.analyse(shapes.render(flipped)) == truth


def test_parse_caption_inverts_caption_and_refuses_other_text():
  for scene in single_scenes() + pair_scenes():
    parsed = shapes.parse_caption(scene.caption())
    assert parsed == dataclasses.replace(scene, background=0)
  for text in ("", "a red circle in the center", "a small red circle", "a small red circle above",
               "a small red circle in the center of", "a huge red circle in the center",
               "a small red circle above a large blue", "the small red circle at the top",
               "a small red circle above a large blue square at the top"):
    assert shapes.parse_caption(text) is None, text
    assert not shapes_analyser.caption_matches(text, shapes.described(single_scenes()[0]))


@pytest.mark.parametrize("blur", [0.25, 0.5])
def test_blurred_renders_are_still_read(blur):
  """VQGAN reconstructions are soft at the edges: each pixel mixed with its neighbours."""
  for scene in single_scenes()[::11] + pair_scenes()[::9]:
    image = shapes.render(scene).astype(np.float32)
    neighbours = (np.roll(image, 1, 0) + np.roll(image, -1, 0) + np.roll(image, 1, 1)
                  + np.roll(image, -1, 1)) / 4
    soft = ((1 - blur) * image + blur * neighbours).round().astype(np.uint8)
    assert shapes_analyser.analyse(soft) == shapes.described(scene), scene.caption()
