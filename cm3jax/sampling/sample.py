"""Sample images from a caption, or captions from an image, with a trained model.

The library of `python -m cm3jax.sample` (cm3jax/sample.py)."""

import dataclasses
import io
import os

import jax
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.data import code_shards
from cm3jax.prepare import tokenize_images
from cm3jax.sampling import defaults, engine, instruct
from cm3jax.vqgan.tokenizer import ImageTokenizer

GRID_COLUMNS = 8
SAMPLE_FILES = ("samples.png", "captions.txt")  # what write_samples writes


def grid(images: np.ndarray, scale: int = 1) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 image, GRID_COLUMNS per row, 2-pixel gaps, upscaled."""
  n, h, w, _ = images.shape
  columns = min(n, GRID_COLUMNS)
  rows = -(-n // columns)
  out = np.full((rows * (h + 2) - 2, columns * (w + 2) - 2, 3), 255, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    out[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = image
  return out.repeat(scale, 0).repeat(scale, 1)


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> the bytes of a PNG file."""
  from PIL import Image
  png = io.BytesIO()
  Image.fromarray(image).save(png, format="PNG")
  return png.getvalue()


def save_png(image: np.ndarray, path: str):
  files.write_atomic(path, png_bytes(image))


def write_samples(sampler: engine.Sampler, vqgan: ImageTokenizer, codes_dir: str, out_dir: str,
                  seed: int = 0) -> list[str]:
  """SAMPLE_FILES in out_dir: 4 images for each of 4 validation captions (top-p 0.9 without
  guidance, which small models draw better) and greedy captions of 8 validation images; returns
  the lines of captions.txt."""
  codes, captions = code_shards.read_split(codes_dir, "validation", 8)
  key = jax.random.PRNGKey(seed)
  made = engine.text_to_image(sampler, captions[:4], 4, vqgan.cfg.tokens_per_image, key, 1.0,
                                engine.SamplingConfig(top_p=0.9))
  grid_path, captions_path = (os.path.join(out_dir, f) for f in SAMPLE_FILES)
  save_png(grid(vqgan.decode(made.reshape(16, -1)), scale=4), grid_path)
  lines = [f"{c}  (images {4 * i + 1} to {4 * i + 4} of samples.png)"
           for i, c in enumerate(captions[:4])]
  generated = engine.caption_images(sampler, codes, jax.random.fold_in(key, 1))
  lines += [f"image of {want!r}: {got!r}" for got, want in zip(generated, captions)]
  files.write_atomic(captions_path, "\n".join(lines) + "\n")
  return lines


TASK_NEEDS = {"edit": ("image", "instruction"), "vqa": ("image", "question"),
              "grounded": ("prompt", "objects"), "seg2image": ("image", "prompt"),
              "image2seg": ("image",), "caption": ("image",),
              "html_image": ("prompt",), "infill": ("page",), "continue": ("prompt",)}
TEXT_TASKS = ("infill", "continue")  # tasks without images: any run, a text-only one too
DRAWN_TASKS = ("edit", "grounded", "seg2image", "image2seg", "html_image")  # images, by a Setting
SAMPLING_FLAGS = tuple(f.name for f in dataclasses.fields(engine.SamplingConfig))
BEST_OF_FLAGS = ("rerank", "rerank_by", "uncond_retrieved")
SETTING_FLAGS = ("cfg", "s_img", "s_txt") + SAMPLING_FLAGS + BEST_OF_FLAGS  # of every use
UNMEASURED = engine.Setting(sampling=dict(greedy=True))  # images of a run without a report
TEXT_SAMPLING = engine.SamplingConfig(top_p=0.9)  # text where no flag says otherwise


def read_image(path: str, resolution: int) -> np.ndarray:
  """An image file as uint8 [resolution, resolution, 3]; a ConfigError if it does not read."""
  try:
    image_bytes = files.read_bytes(path)
  except OSError as e:
    raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    return tokenize_images.decode_image(image_bytes, resolution)
  except Exception:  # PIL raises many types (some of them OSError) for data that is not an image
    raise ConfigError(f"cannot read {path}: not an image PIL can decode") from None


def parse_objects(text: str) -> list[tuple[str, list[int]]]:
  """`NAME:X0 Y0 X1 Y1;...` -> [(name, box)]."""
  out = []
  for item in filter(None, (p.strip() for p in text.split(";"))):
    name, _, box = item.partition(":")
    values = box.split()
    if not name.strip() or len(values) != 4 or not all(v.lstrip("-").isdigit() for v in values):
      raise ConfigError(f"--objects item {item!r} is not NAME:X0 Y0 X1 Y1")
    out.append((name.strip(), [int(v) for v in values]))
  if not out:
    raise ConfigError("--objects names no object")
  return out


def setting_flags(use: str) -> tuple[str, ...]:
  """The flags that set fields of the setting `use` draws with (a --task of DRAWN_TASKS, or a
  `defaults.text_to_image_use`)."""
  guidance = {"edit": ("s_img", "s_txt"), "image2seg": ()}.get(use, ("cfg",))
  best_of = BEST_OF_FLAGS if use.startswith("text_to_image") else ()
  return guidance + SAMPLING_FLAGS + best_of


def sampling_config(given: dict, base: engine.SamplingConfig) -> engine.SamplingConfig:
  """`base` with each field that `given` ({flag: value}, None: not given) sets."""
  return dataclasses.replace(base, **{f: given[f] for f in SAMPLING_FLAGS
                                      if given.get(f) is not None})


def chosen_setting(workdir: str, use: str, given: dict, at_hand: str = "model"
                   ) -> tuple[engine.Setting, str]:
  """The setting `use` draws with: each field that `given` sets ({flag of `setting_flags`:
  value}, None: not given), else from the run's best measured setting of `use`
  (`defaults.sampling_defaults`), else from UNMEASURED; and a line saying which setting it is and
  where it came from. `at_hand` ("model" or "retriever") reranks where nothing else says by what."""
  measured = defaults.sampling_defaults(workdir).get(use)
  base = measured.setting if measured else UNMEASURED
  named = [n for n in setting_flags(use) if given.get(n) is not None]
  asks_for_draws = (given.get("rerank") or 1) > 1 or {"temperature", "top_k", "top_p"} & set(named)
  if base.config.greedy and "greedy" not in named and asks_for_draws:
    # N argmax images are N copies of one, and a warper does nothing to an argmax.
    base = dataclasses.replace(base, sampling=dataclasses.asdict(TEXT_SAMPLING))
  flag = lambda name, value: given[name] if name in named else value
  rerank_by = base.rerank_by if base.candidates > 1 else at_hand
  setting = dataclasses.replace(
      base, sampling=dataclasses.asdict(sampling_config(given, base.config)),
      guidance=flag("s_txt" if use == "edit" else "cfg", base.guidance),
      image_guidance=flag("s_img", base.image_guidance), candidates=flag("rerank", base.candidates),
      rerank_by=flag("rerank_by", rerank_by),
      uncond_retrieved=flag("uncond_retrieved", base.uncond_retrieved))
  path = os.path.join(workdir, defaults.SAMPLING_DEFAULTS_FILE)
  origin = (f"the best measured, {measured.describe()}, recorded in {path}" if measured else
            f"{path} records no measured setting of {use}: greedy without guidance")
  overridden = f"; {' '.join('--' + n for n in named)} as given" if named else ""
  return setting, f"sampling {use} with {describe(setting, use)} ({origin}{overridden})"


def describe(setting: engine.Setting, use: str) -> str:
  """`setting` as the flags that ask for it."""
  c, plain = setting.config, engine.SamplingConfig()
  warpers = [f"--{f}={getattr(c, f):g}" for f in ("temperature", "top_k", "top_p")
             if getattr(c, f) != getattr(plain, f)]
  parts = ["--greedy"] if c.greedy else warpers or [f"--temperature={c.temperature:g}"]
  if c.cd_k:
    parts += [f"--cd_k={c.cd_k}", f"--cd_alpha={c.cd_alpha:g}"]
  names = setting_flags(use)
  if "s_txt" in names:
    parts += [f"--s_img={setting.image_guidance:g}", f"--s_txt={setting.guidance:g}"]
  if "cfg" in names:
    parts.append(f"--cfg={setting.guidance:g}")
  if "rerank" in names and setting.candidates > 1:
    parts += [f"--rerank={setting.candidates}", f"--rerank_by={setting.rerank_by}"]
  if use != defaults.text_to_image_use(0) and "uncond_retrieved" in names:
    parts.append("--uncond_retrieved" if setting.uncond_retrieved else "--nouncond_retrieved")
  return " ".join(parts)


def run_task(FLAGS, sampler, vqgan, key, setting: engine.Setting = UNMEASURED,
             text: engine.SamplingConfig = TEXT_SAMPLING) -> list[str]:
  """Does --task, a task of DRAWN_TASKS with `setting`, the text tasks with `text`; returns
  what it printed or wrote, in lines."""
  missing = [f"--{f}" for f in TASK_NEEDS[FLAGS.task] if not getattr(FLAGS, f)]
  if missing:
    raise ConfigError(f"--task={FLAGS.task} needs {' and '.join(missing)}")
  if FLAGS.task == "infill":
    return engine.infill_text(sampler, [FLAGS.page], key, FLAGS.max_tokens, text)
  if FLAGS.task == "continue":
    return [FLAGS.prompt + t for t in engine.continue_text(
        sampler, [FLAGS.prompt] * FLAGS.num_captions, key, FLAGS.max_tokens, text)]
  n, T = FLAGS.num_images, vqgan.cfg.tokens_per_image
  if FLAGS.image:
    codes = np.repeat(vqgan.encode(read_image(FLAGS.image, vqgan.cfg.resolution)[None]), n, 0)
  if FLAGS.task == "vqa":
    return instruct.vqa(sampler, codes[:1], [FLAGS.question], key)
  if FLAGS.task == "caption":
    return instruct.caption(sampler, codes[:1], key)
  cfg, guidance = setting.config, setting.guidance
  if FLAGS.task == "edit":
    made = instruct.edit(sampler, codes, [FLAGS.instruction] * n, key, setting.image_guidance,
                         guidance, cfg)
  elif FLAGS.task == "grounded":
    made = instruct.grounded(sampler, [FLAGS.prompt] * n, [parse_objects(FLAGS.objects)] * n, T,
                             key, guidance, cfg)
  elif FLAGS.task == "html_image":
    made = engine.text_to_image(sampler, [FLAGS.prompt], n, T, key, guidance, cfg,
                                  form="html")[0]
  elif FLAGS.task == "seg2image":
    made = instruct.seg2image(sampler, codes, [FLAGS.prompt] * n, key, guidance, cfg)
  else:
    made = instruct.image2seg(sampler, codes, key, cfg)
  save_png(grid(vqgan.decode(made), FLAGS.scale), FLAGS.out)
  return [f"wrote {n} images of --task={FLAGS.task} to {FLAGS.out}"]
