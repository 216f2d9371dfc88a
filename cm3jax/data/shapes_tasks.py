"""The shapes task suite for instruction tuning, with exact ground truth.

Every picture of an example is a `Picture`: a shapes scene drawn as a photo, or as its
segmentation map (each thing flat in its shape's class colour on a dark background), so the
truth of each output is known and `shapes_analyser.analyse` reads generated ones back.

  edit        a photo and an instruction -> the edited photo: one thing's colour, shape or size
              changed, a lone thing moved, one of two removed, or a thing added beside a lone one
  grounded    a caption and each thing's box (pixels) -> the photo
  seg2image   a segmentation map and a caption -> the photo
  image2seg   a photo -> its segmentation map
  caption     a photo -> its caption
  vqa         a photo and a question (a thing's colour or shape, how many things, a relation)
              -> the answer
  text2image  a caption -> the photo (the pretraining document)

The source scenes are `shapes.scene(split, index, seed=SEED)`, so the splits keep the held-out
colour-shape pairs where `shapes` does: train and validation examples never show one, in any
picture or text (an edit never makes one), and every test example's source scene holds one.
"""

import dataclasses
from typing import Optional

import numpy as np

from cm3jax.data import sft, shapes

SEED = 7  # the suite's scenes are not the pretraining records
CLASS_COLOURS = {"circle": "red", "square": "blue", "triangle": "green", "diamond": "purple"}
MAP_BACKGROUND = 2  # the dark one
MOVES = {"in the center": "to the center", "at the top": "to the top",
         "at the bottom": "to the bottom", "on the left": "to the left",
         "on the right": "to the right"}
BESIDE = {"on the left": "to the right of", "on the right": "to the left of",
          "at the top": "below", "at the bottom": "above"}  # where a thing added beside goes
PLACE_AT = {centre: place for place, centre in shapes.POSITIONS.items()}
EDITS = ("colour", "shape", "size", "move", "remove", "add")
COUNTS = {1: "one", 2: "two"}


@dataclasses.dataclass(frozen=True)
class Picture:
  scene: shapes.Scene
  segmentation: bool = False  # the scene's segmentation map rather than its photo

  def drawn(self) -> shapes.Scene:
    """The scene whose photo this picture is."""
    return segmentation_scene(self.scene) if self.segmentation else self.scene

  def render(self) -> np.ndarray:
    """uint8 [32, 32, 3]."""
    return shapes.render(self.drawn())


def segmentation_scene(s: shapes.Scene) -> shapes.Scene:
  """The scene whose photo is `s`'s segmentation map. No class colour makes a held-out pair."""
  things = tuple(dataclasses.replace(t, colour=CLASS_COLOURS[t.shape]) for t in s.things)
  return shapes.Scene(things, s.place, MAP_BACKGROUND)


def _allowed(split: str, thing: shapes.Thing) -> bool:
  return split == "test" or (thing.colour, thing.shape) not in shapes.HELD_OUT


def _name(t: shapes.Thing) -> str:
  return f"{t.colour} {t.shape}"


def _valid(s: shapes.Scene) -> bool:
  return len(s.things) == 1 or _name(s.things[0]) != _name(s.things[1])


def edited(split: str, s: shapes.Scene, rng: np.random.Generator
           ) -> Optional[tuple[str, shapes.Scene]]:
  """(an instruction, the scene it makes of `s`), or None when the drawn edit does not apply."""
  kind = EDITS[rng.integers(len(EDITS))]
  i = int(rng.integers(len(s.things)))
  thing, things = s.things[i], list(s.things)
  if kind in ("colour", "shape", "size"):
    if kind == "colour":
      value = [c for c in shapes.COLOURS if c != thing.colour][rng.integers(len(shapes.COLOURS) - 1)]
      new, words = dataclasses.replace(thing, colour=value), f"make the {_name(thing)} {value}"
    elif kind == "shape":
      value = [h for h in shapes.SHAPES if h != thing.shape][rng.integers(len(shapes.SHAPES) - 1)]
      new, words = (dataclasses.replace(thing, shape=value),
                    f"turn the {_name(thing)} into a {value}")
    else:
      value = "large" if thing.size == "small" else "small"
      new, words = dataclasses.replace(thing, size=value), f"make the {_name(thing)} {value}"
    things[i] = new
    target = dataclasses.replace(s, things=tuple(things))
    return (words, target) if _allowed(split, new) and _valid(target) else None
  if kind == "move":
    if len(s.things) != 1:
      return None
    place = [p for p in shapes.POSITIONS if p != s.place][rng.integers(len(shapes.POSITIONS) - 1)]
    return f"move the {_name(thing)} {MOVES[place]}", dataclasses.replace(s, place=place)
  if kind == "remove":
    if len(s.things) != 2:
      return None
    kept = 1 - i
    place = PLACE_AT[s.centres()[kept]]
    return f"remove the {_name(thing)}", dataclasses.replace(s, things=(s.things[kept],),
                                                            place=place)
  if len(s.things) != 1 or s.place not in BESIDE:  # add
    return None
  new = shapes.Thing(shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
                     list(shapes.COLOURS)[rng.integers(len(shapes.COLOURS))],
                     list(shapes.SIZES)[rng.integers(len(shapes.SIZES))])
  target = shapes.Scene((new, thing), BESIDE[s.place], s.background)
  if not (_allowed(split, new) and _valid(target)):
    return None
  return f"add a {new.words()} {BESIDE[s.place]} the {_name(thing)}", target


def boxes(s: shapes.Scene, resolution: int = shapes.RESOLUTION) -> list[tuple[str, list[int]]]:
  """Each thing's name and box `[x0, y0, x1, y1]` in pixels (the square its shape fills)."""
  out = []
  for t, (fx, fy) in zip(s.things, s.centres()):
    r = shapes.SIZES[t.size]
    out.append((_name(t), [round((fx - r) * resolution), round((fy - r) * resolution),
                           round((fx + r) * resolution), round((fy + r) * resolution)]))
  return out


def question(s: shapes.Scene, rng: np.random.Generator) -> tuple[str, str]:
  """A question about the scene and its answer."""
  kinds = ["colour", "shape", "count"] + (["relation"] if len(s.things) == 2 else [])
  kind = kinds[rng.integers(len(kinds))]
  t = s.things[rng.integers(len(s.things))]
  if kind == "count":
    return "how many objects are there?", COUNTS[len(s.things)]
  if kind == "colour" and sum(o.shape == t.shape for o in s.things) == 1:
    return f"what colour is the {t.shape}?", t.colour
  if kind in ("colour", "shape") and sum(o.colour == t.colour for o in s.things) == 1:
    return f"what shape is the {t.colour} thing?", t.shape
  if kind in ("colour", "shape"):  # two of one shape and colour do not occur: ask the size
    return f"is the {_name(t)} large or small?", t.size
  relation = shapes.RELATIONS[rng.integers(len(shapes.RELATIONS))]
  truth = shapes.described(shapes.Scene(s.things, relation, 0)) == shapes.described(s)
  first, second = s.things
  return f"is the {_name(first)} {relation} the {_name(second)}?", "yes" if truth else "no"


def example(task: str, split: str, index: int) -> sft.Record:
  """The suite's `index`-th `task` example of `split` (deterministic)."""
  if task not in sft.TASKS:
    raise ValueError(f"task {task!r} is not one of {list(sft.TASKS)}")
  rng = np.random.default_rng([SEED, sft.TASKS.index(task), shapes.SPLITS[split][0], index])
  attempt = 0
  while True:
    s = shapes.scene(split, index * 1009 + attempt, SEED)
    attempt += 1
    photo = Picture(s)
    if task == "edit":
      made = edited(split, s, rng)
      if made is None:
        continue
      return sft.edit(photo, made[0], Picture(made[1]))
    if task == "grounded":
      return sft.grounded(s.caption(), boxes(s), photo)
    if task == "seg2image":
      return sft.seg2image(Picture(s, segmentation=True), s.caption(), photo)
    if task == "image2seg":
      return sft.image2seg(photo, Picture(s, segmentation=True))
    if task == "caption":
      return sft.caption(photo, s.caption())
    if task == "text2image":
      return sft.text_to_image(s.caption(), photo)
    return sft.vqa(photo, *question(s, rng))
