"""Score a trained model on the shapes data: seen and held-out colour-shape compositions.

  python -m cm3jax.eval_shapes --workdir=workdirs/tiny [--splits=validation,test]

Text->image: an image is generated for each caption of a split and read back by a deterministic
pixel analyser (`analyse`); it counts as right when it shows exactly the things, sizes, colours,
shapes and places of the caption. Image->text: each image's codes are captioned by infilling; a
caption counts as right when it describes the image exactly ('A above B' = 'B below A'). Text
to image is scored greedy and with top-p, with and without classifier-free guidance, with
contrastive top-k, and best of 8 top-p samples reranked by the model's own likelihood of the
caption given each image; its ceiling is the share of the split's own VQGAN codes that decode
to an image the analyser reads right ("VQGAN reconstructions"). The validation split holds
compositions seen in training, the test split held-out ones. The report goes to
WORKDIR/eval_shapes.json and, as a markdown table, WORKDIR/eval_shapes.md.
"""

import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np
from absl import flags

from cm3jax import checkpoint, cli, data, sampling
from cm3jax.config import ConfigError
from cm3jax.data import code_shards, shapes
from cm3jax.vqgan.tokenizer import ImageTokenizer

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


@dataclasses.dataclass(frozen=True)
class Setting:
  guidance: float = 1.0
  sampling: dict = dataclasses.field(default_factory=dict)  # SamplingConfig fields
  candidates: int = 1  # > 1: the image under which the model finds the caption likeliest


SETTINGS = {
    "greedy, no guidance": Setting(sampling=dict(greedy=True)),
    "top-p 0.9, no guidance": Setting(sampling=dict(top_p=0.9)),
    "top-p 0.9, CFG 1.5": Setting(1.5, dict(top_p=0.9)),
    "top-p 0.9, CFG 3": Setting(3.0, dict(top_p=0.9)),
    # k = 1 is Li et al.'s plausibility set (p_cond >= alpha * max p_cond). At k = 8 the set admits
    # tail codes, whose log-ratio is the largest, and a tiny model's samples turn to noise.
    "CD-K (k=1, alpha=0.1)": Setting(sampling=dict(cd_k=1, cd_alpha=0.1)),
    "top-p 0.9, best of 8 by the caption's likelihood": Setting(sampling=dict(top_p=0.9),
                                                                candidates=8),
}
SPLITS = ("validation", "test")
REPORT_FILES = ("eval_shapes.json", "eval_shapes.md")  # in the workdir


def evaluate(workdir: str, split: str, num_examples: int = 1000, batch_size: int = 128,
             seed: int = 0, settings: Optional[dict] = None) -> dict:
  """Text->image accuracy per sampling setting and caption accuracy on a shapes split (test: the
  held-out compositions; validation: compositions seen in training), of the workdir's newest
  checkpoint."""
  step = checkpoint.latest_step(workdir)
  sampler, config = sampling.load(workdir)
  paths = data.input_paths(config["cm3"], workdir)
  vqgan = ImageTokenizer.load(paths.vqgan_workdir)
  codes, captions = code_shards.read_split(paths.codes_dir, split, num_examples)
  truths = [shapes.described(shapes.parse_caption(c)) for c in captions]
  image_key, caption_key = jax.random.split(jax.random.PRNGKey(seed))
  results = {"split": split, "step": step, "examples": len(captions)}
  # The ceiling of text->image: how many of the split's own codes decode to a readable image.
  readable = sum(_shown(vqgan, codes[start:start + batch_size], truths[start:start + batch_size])
                 for start in range(0, len(captions), batch_size))
  results["VQGAN reconstructions"] = readable / len(captions)
  for name, setting in (settings or SETTINGS).items():
    cfg = sampling.SamplingConfig(**setting.sampling)
    right = 0
    per_batch = max(1, batch_size // setting.candidates)
    for start in range(0, len(captions), per_batch):
      batch = captions[start:start + per_batch]
      key = jax.random.fold_in(image_key, start)
      generated = sampling.text_to_image_reranked(
          sampler, batch, setting.candidates, vqgan.cfg.tokens_per_image, key, setting.guidance,
          cfg)
      right += _shown(vqgan, generated, truths[start:start + per_batch])
    results[f"text_to_image, {name}"] = right / len(captions)
  right, examples = 0, []
  for start in range(0, len(captions), batch_size):
    made = sampling.caption_images(sampler, codes[start:start + batch_size],
                                   jax.random.fold_in(caption_key, start))
    right += sum(caption_matches(c, t) for c, t in zip(made, truths[start:start + batch_size]))
    examples += made[:max(0, 8 - len(examples))]
  results["image_to_text, greedy"] = right / len(captions)
  results["caption examples"] = [f"{got!r} for {want!r}" for got, want in zip(examples, captions)]
  return results


def _shown(vqgan, codes, truths) -> int:
  """How many of these images' codes decode to an image that the analyser reads as its truth."""
  return sum(analyse(image) == truth for image, truth in zip(vqgan.decode(codes), truths))


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a cm3jax.train run on the shapes data.")
  flags.DEFINE_integer("num_examples", 1000, "Examples to score per split (each has 1,000).")
  flags.DEFINE_integer("batch_size", 128, "Images generated together.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_list("splits", list(SPLITS), "test: held-out compositions; validation: "
                    "compositions seen in training.")


def report(workdir: str, splits: Sequence[str], num_examples: int, batch_size: int = 128,
           seed: int = 0) -> dict:
  """`evaluate` of each split, written to WORKDIR/eval_shapes.json (by split) and, as the
  table that `table` makes, WORKDIR/eval_shapes.md."""
  unknown = [s for s in splits if s not in SPLITS]
  if unknown or not splits:
    raise ConfigError(f"splits {list(splits)}: each must be one of {list(SPLITS)}")
  results = {split: evaluate(workdir, split, num_examples, batch_size, seed) for split in splits}
  json_path, markdown_path = (os.path.join(workdir, f) for f in REPORT_FILES)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1)
  with open(markdown_path, "w") as f:
    f.write("\n".join(table(results)) + "\n")
  return results


def saved(workdir: str) -> dict:
  """The saved report, {split: results}; {} when there is none."""
  try:
    with open(os.path.join(workdir, REPORT_FILES[0])) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}


def table(results: dict) -> list[str]:
  """A markdown table of `results` ({split: evaluate's dict}), a column per split, then some
  captions the model wrote."""
  splits = list(results)
  kinds = {"validation": "seen compositions", "test": "held-out compositions"}
  first = results[splits[0]]
  lines = [f"eval_shapes of step {first['step']}, {first['examples']} examples per split",
           "", "| task, sampling | " + " | ".join(f"{s} ({kinds[s]})" for s in splits) + " |",
           "|---|" + "---|" * len(splits)]
  lines += [f"| {name} | " + " | ".join(f"{results[s][name]:.1%}" for s in splits) + " |"
            for name, value in first.items() if isinstance(value, float)]
  for s in splits:
    lines += ["", f"Captions of {s} images:"] + [f"- {line}" for line in results[s]["caption examples"]]
  return lines


def main(FLAGS):
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required")
  if FLAGS.num_examples < 1 or FLAGS.batch_size < 1:
    raise ConfigError(f"--num_examples={FLAGS.num_examples} and --batch_size={FLAGS.batch_size} "
                      "must be at least 1")
  t = time.perf_counter()
  results = report(FLAGS.workdir, FLAGS.splits, FLAGS.num_examples, FLAGS.batch_size, FLAGS.seed)
  print("\n".join(table(results)))
  print(f"{time.perf_counter() - t:.0f}s; written to "
        + " and ".join(os.path.join(FLAGS.workdir, f) for f in REPORT_FILES))


if __name__ == "__main__":
  cli.run("eval_shapes", _define_flags, main)
