"""The built-in image-caption data: coloured shapes on plain backgrounds with exact captions.

One or two objects per image; each object has a shape, a colour and a size, and two objects stand
in a spatial relation ("a small red circle above a large blue square"). Example `i` of a split is
a pure function of (seed, split, i). The test split holds out compositions: every test image
contains at least one (colour, shape) pair that never occurs in train or validation. The
tokenizer split draws every pair, held out or not, from a seed of its own: it trains the image
tokenizer (images only, as a real VQGAN trains on broad image data) and never the token model.
Pure numpy, so the renderer is usable without TensorFlow; `shapes_tfds.py` wraps it for TFDS.
"""

import dataclasses
from typing import Optional

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 190), "orange": (240, 140, 30),
}
BACKGROUNDS = ((255, 255, 255), (200, 200, 200), (30, 30, 30), (210, 230, 245))
SIZES = {"small": 0.14, "large": 0.24}  # Half-width of the shape as a fraction of the image.
RELATIONS = ("above", "below", "to the left of", "to the right of")
POSITIONS = {  # Centre of a lone object, in fractions of the image.
    "in the center": (0.5, 0.5), "at the top": (0.5, 0.25), "at the bottom": (0.5, 0.75),
    "on the left": (0.25, 0.5), "on the right": (0.75, 0.5),
}
# (colour, shape) pairs that appear only in the test split.
HELD_OUT = (("red", "triangle"), ("blue", "circle"), ("green", "square"), ("yellow", "diamond"),
            ("purple", "triangle"), ("orange", "circle"))
SPLITS = {"train": (0, 20000), "validation": (1, 1000), "test": (2, 1000),
          "tokenizer": (3, 20000)}  # (id, size)
SMALL_SPLITS = {"train": 512, "validation": 128, "test": 128, "tokenizer": 512}  # "shapes/small"
RESOLUTION = 32


@dataclasses.dataclass(frozen=True)
class Thing:
  shape: str
  colour: str
  size: str

  def words(self) -> str:
    return f"{self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  things: tuple[Thing, ...]  # One or two.
  place: str  # A POSITIONS key for one thing, a RELATIONS entry (first relative to second) for two.
  background: int

  def caption(self) -> str:
    if len(self.things) == 1:
      return f"a {self.things[0].words()} {self.place}"
    return f"a {self.things[0].words()} {self.place} a {self.things[1].words()}"

  def centres(self) -> list[tuple[float, float]]:
    """(x, y) of each thing's centre, in fractions of the image."""
    if len(self.things) == 1:
      return [POSITIONS[self.place]]
    first, second = {"above": ((0.5, 0.25), (0.5, 0.75)), "below": ((0.5, 0.75), (0.5, 0.25)),
                     "to the left of": ((0.25, 0.5), (0.75, 0.5)),
                     "to the right of": ((0.75, 0.5), (0.25, 0.5))}[self.place]
    return [first, second]


def _thing(rng, held_out: Optional[bool]) -> Thing:
  """A random thing; held_out=True draws a held-out pair, False never does, None either."""
  while True:
    shape, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
    if held_out is None or ((colour, shape) in HELD_OUT) == held_out:
      return Thing(shape, colour, list(SIZES)[rng.integers(len(SIZES))])


def scene(split: str, index: int, seed: int = 0) -> Scene:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
  rng = np.random.default_rng([seed, SPLITS[split][0], index])
  seen_only = False if split in ("train", "validation") else None  # held_out argument of _thing
  count = 1 + int(rng.integers(2))
  if split == "test":
    things = [_thing(rng, True)] + [_thing(rng, None) for _ in range(count - 1)]
    things = [things[i] for i in rng.permutation(count)]
  else:
    things = [_thing(rng, seen_only) for _ in range(count)]
  if count == 2:
    while things[1].colour == things[0].colour and things[1].shape == things[0].shape:
      things[1] = _thing(rng, seen_only)
  place = (list(POSITIONS)[rng.integers(len(POSITIONS))] if count == 1
           else RELATIONS[rng.integers(len(RELATIONS))])
  return Scene(tuple(things), place, int(rng.integers(len(BACKGROUNDS))))


def mask(shape: str, cx: float, cy: float, r: float, resolution: int) -> np.ndarray:
  ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
  dx, dy = (xs - cx) / r, (ys - cy) / r
  if shape == "circle":
    return dx**2 + dy**2 <= 1.0
  if shape == "square":
    return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= 1.0
  if shape == "triangle":  # pointing up, base at the bottom
    return (dy <= 0.8) & (dy >= -1.0 + 2 * np.abs(dx) * 0.9)
  raise ValueError(f"unknown shape {shape!r}")


def render(s: Scene, resolution: int = RESOLUTION) -> np.ndarray:
  """uint8 [resolution, resolution, 3]."""
  image = np.empty((resolution, resolution, 3), np.uint8)
  image[:] = BACKGROUNDS[s.background]
  for thing, (fx, fy) in zip(s.things, s.centres()):
    inside = mask(thing.shape, fx * resolution, fy * resolution, SIZES[thing.size] * resolution,
                  resolution)
    image[inside] = COLOURS[thing.colour]
  return image


def example(split: str, index: int, seed: int = 0, resolution: int = RESOLUTION) -> dict:
  s = scene(split, index, seed)
  return {"image": render(s, resolution), "caption": s.caption()}


Described = frozenset  # of (size, colour, shape, centre): a scene as its caption fixes it


def described(s: Scene) -> Described:
  """What a caption fixes: each thing with its centre; 'A above B' equals 'B below A'."""
  return frozenset((t.size, t.colour, t.shape, c) for t, c in zip(s.things, s.centres()))


def parse_caption(caption: str) -> Optional[Scene]:
  """The scene a shapes caption describes (background 0), or None for any other text."""
  words = caption.split(" ")

  def thing(at: int) -> Optional[Thing]:
    if len(words) < at + 4 or words[at] != "a":
      return None
    size, colour, shape = words[at + 1:at + 4]
    if size in SIZES and colour in COLOURS and shape in SHAPES:
      return Thing(shape, colour, size)
    return None

  first = thing(0)
  if first is None:
    return None
  rest = " ".join(words[4:])
  if rest in POSITIONS:
    return Scene((first,), rest, 0)
  for relation in RELATIONS:
    if rest.startswith(relation + " "):
      second = thing(4 + len(relation.split(" ")))
      if second and rest == f"{relation} a {second.words()}":
        return Scene((first, second), relation, 0)
  return None
