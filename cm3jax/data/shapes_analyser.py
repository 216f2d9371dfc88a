"""The pixel analyser of the shapes data: what a 32x32 picture shows, read back exactly as
`shapes.described` states a scene, so generated pictures and captions are scored against the
truth (cm3jax.eval_shapes, cm3jax.eval.eval_tasks)."""

import numpy as np

from cm3jax.data import shapes

PALETTE = np.array(list(shapes.BACKGROUNDS) + list(shapes.COLOURS.values()), np.float32)
COLOUR_NAMES = list(shapes.COLOURS)
MIN_PIXELS = 6  # smaller specks of colour are noise
MAX_EXTENT = 24  # pixels; only two large things in adjacent slots touch, and they span 32
SLOTS = sorted(set(shapes.POSITIONS.values()))


def analyse(image: np.ndarray) -> shapes.Described:
  """uint8 [32, 32, 3] -> the things it shows (see shapes.described).

  Pixels are snapped to the palette; the border's colour is the background. Each blob of other
  colours is a thing (blobs wider or taller than one thing are cut in two): its colour is the
  blob's commonest, its centre the nearest slot, and its shape and size the rendered template at
  that slot that best fits the blob's coverage (blur-tolerant: coverage is graded by colour)."""
  image = image.astype(np.float32)
  distance = ((image[:, :, None, :] - PALETTE) ** 2).sum(-1)
  snapped = distance.argmin(-1)
  border = np.concatenate([snapped[0], snapped[-1], snapped[:, 0], snapped[:, -1]])
  background = np.bincount(border, minlength=len(PALETTE)).argmax()
  things = []
  for mask in _components(snapped != background):
    for part in _split(mask):
      if part.sum() < MIN_PIXELS:
        continue
      colour = np.bincount(snapped[part], minlength=len(PALETTE)).argmax()
      if colour < len(shapes.BACKGROUNDS):
        continue
      ys, xs = np.nonzero(part)
      n = image.shape[0]
      centre = ((xs.min() + xs.max() + 1) / 2 / n, (ys.min() + ys.max() + 1) / 2 / n)
      slot = min(SLOTS, key=lambda s: (s[0] - centre[0]) ** 2 + (s[1] - centre[1]) ** 2)
      coverage = _coverage(image, PALETTE[background], PALETTE[colour], slot)
      shape, size = min(TEMPLATES, key=lambda t: np.sum((coverage - _template(*t, slot, n)) ** 2))
      things.append((size, COLOUR_NAMES[colour - len(shapes.BACKGROUNDS)], shape, slot))
  return frozenset(things)


TEMPLATES = [(shape, size) for shape in shapes.SHAPES for size in shapes.SIZES]


def _coverage(image, background, colour, slot) -> np.ndarray:
  """How much of each pixel near `slot` is `colour` rather than background, in [0, 1]; 0 away
  from the slot, so that another thing does not count."""
  n = image.shape[0]
  span = colour - background
  fraction = np.clip(((image - background) @ span) / (span @ span), 0.0, 1.0)
  ys, xs = np.mgrid[0:n, 0:n] + 0.5
  near = (np.abs(xs - slot[0] * n) <= n / 4) & (np.abs(ys - slot[1] * n) <= n / 4)
  return np.where(near, fraction, 0.0)


def _template(shape: str, size: str, slot, n: int) -> np.ndarray:
  return shapes.mask(shape, slot[0] * n, slot[1] * n, shapes.SIZES[size] * n, n).astype(np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
  """4-connected components of a boolean image."""
  labels = np.zeros(mask.shape, int)
  found = []
  for start in zip(*np.nonzero(mask)):
    if labels[start]:
      continue
    label = len(found) + 1
    stack, members = [start], []
    labels[start] = label
    while stack:
      y, x = stack.pop()
      members.append((y, x))
      for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
        if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
          labels[ny, nx] = label
          stack.append((ny, nx))
    found.append(labels == label)
  return found


def _split(mask: np.ndarray) -> list[np.ndarray]:
  """Things in adjacent slots touch: a blob taller or wider than one thing is cut at the middle."""
  ys, xs = np.nonzero(mask)
  half = mask.shape[0] // 2
  if ys.max() - ys.min() + 1 > MAX_EXTENT:
    top = mask.copy()
    top[half:] = False
    return [top, mask & ~top]
  if xs.max() - xs.min() + 1 > MAX_EXTENT:
    left = mask.copy()
    left[:, half:] = False
    return [left, mask & ~left]
  return [mask]


def caption_matches(caption: str, truth: shapes.Described) -> bool:
  scene = shapes.parse_caption(caption)
  return scene is not None and shapes.described(scene) == truth
