"""Sample images from a caption, or captions from an image, with a trained model.

  python -m cm3jax.sample --workdir=workdirs/tiny --prompt="a red circle above a blue square" \
      --num_images=8 --out=grid.png
  python -m cm3jax.sample --workdir=workdirs/tiny --image=photo.png --num_captions=3
  python -m cm3jax.sample --workdir=workdirs/tiny_ra --prompt="a red circle above a blue square" \
      --memory=workdirs/tiny_ra/memory --retrieve=3

The model, its vocabulary and (from the run's config) its VQGAN come from the workdir's latest
checkpoint. Images are drawn with the run's best measured setting: the report (cm3jax.eval_shapes,
the pipeline's last stage) records it in WORKDIR/sampling_defaults.json, for text->image and
each instruction-tuned task. A flag given on the command line overrides its field of it; a run
without one draws greedily without guidance (top-p 0.9 where --rerank or a warper flag asks
for draws; the paper's guidance scales measure worst on every run reported so far). The
command says in one line which setting it draws with and whence.
--cfg is the classifier-free guidance scale alpha_c (1: none); --cd_k turns on contrastive
top-k. Captions are greedy unless --num_captions > 1. --retrieve=K places the K documents of
--memory nearest the prompt (by the bank's retriever) before it, as a model of
configs/tiny_ra.py was trained; with guidance the unconditional stream keeps them unless
--nouncond_retrieved. --rerank=N draws N images for each one kept, and keeps the one the model
finds the prompt likeliest under (--rerank_by=model) or the retriever (--retriever, else the
bank's) scores closest to it (--rerank_by=retriever, the default when there is one).

An instruction-tuned run (configs/tiny_sft.py) does its tasks (cm3jax/instruct.py):

  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=edit --image=in.png \
      --instruction="make the red circle blue" --out=edited.png
  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=vqa --image=in.png \
      --question="what colour is the circle?"
  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=grounded \
      --prompt="a small red circle on the left" --objects="red circle:2 10 14 22"
  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=seg2image --image=map.png \
      --prompt="a small red circle on the left"

A run trained on CM3's HTML documents (cm3.document_form="html") draws from an `alt` prompt:

  python -m cm3jax.sample --workdir=W --task=html_image --prompt="a red circle" --out=img.png

Any run continues a text or fills the one <mask> of a text or HTML page (CM3's infilling); a
text-only run (data="text", configs/text_tiny.py) does these two tasks only:

  python -m cm3jax.sample --workdir=W --task=continue --prompt="a small red circle above" --greedy
  python -m cm3jax.sample --workdir=W --task=infill --page='<p><mask></p><img alt="a car"'

edit uses instruct guidance (--s_img, --s_txt; 1 and 1: none), grounded, seg2image and
html_image classifier-free guidance (--cfg); image2seg draws the segmentation map of --image, caption
describes it. Image tasks write --num_images images to --out; text tasks print the answer.
"""

import dataclasses
import os
from typing import Optional

import jax
import numpy as np
from absl import flags

from cm3jax import cli, data, instruct, reports, sampling, tokenize_images
from cm3jax.config import ConfigError
from cm3jax.data import code_shards
from cm3jax.retrieval import augment, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer
from cm3jax.vqgan.tokenizer import progress as tokenizer_progress

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


def save_png(image: np.ndarray, path: str):
  from PIL import Image
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)


def write_samples(sampler: sampling.Sampler, vqgan: ImageTokenizer, codes_dir: str, out_dir: str,
                  seed: int = 0) -> list[str]:
  """SAMPLE_FILES in out_dir: 4 images for each of 4 validation captions (top-p 0.9 without
  guidance, which small models draw better) and greedy captions of 8 validation images; returns
  the lines of captions.txt."""
  codes, captions = code_shards.read_split(codes_dir, "validation", 8)
  key = jax.random.PRNGKey(seed)
  made = sampling.text_to_image(sampler, captions[:4], 4, vqgan.cfg.tokens_per_image, key, 1.0,
                                sampling.SamplingConfig(top_p=0.9))
  grid_path, captions_path = (os.path.join(out_dir, f) for f in SAMPLE_FILES)
  save_png(grid(vqgan.decode(made.reshape(16, -1)), scale=4), grid_path)
  lines = [f"{c}  (images {4 * i + 1} to {4 * i + 4} of samples.png)"
           for i, c in enumerate(captions[:4])]
  generated = sampling.caption_images(sampler, codes, jax.random.fold_in(key, 1))
  lines += [f"image of {want!r}: {got!r}" for got, want in zip(generated, captions)]
  with open(captions_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return lines


class Watch:
  """What a user watches a model learn by: at each evaluation, images drawn greedily for fixed
  validation captions and greedy captions of fixed validation images, into TensorBoard."""

  def __init__(self, sampler: sampling.Sampler, vqgan: ImageTokenizer, codes: np.ndarray,
               captions: list[str]):
    self.sampler, self.vqgan, self.codes, self.captions = sampler, vqgan, codes, captions

  @classmethod
  def of_run(cls, config, workdir: str, model_cfg, params, vocab) -> Optional["Watch"]:
    """The watch of a training run, or None where config.eval_samples is 0 or it cannot be
    made (saying why): it needs the cm3 data, its VQGAN and a single host."""
    if not config.eval_samples or config.data != "cm3":
      return None
    paths = data.input_paths(config.cm3, workdir)
    if jax.process_count() > 1 or tokenizer_progress(paths.vqgan_workdir) is None:
      print(f"eval_samples={config.eval_samples}: off, since it needs one host and a VQGAN in "
            f"{paths.vqgan_workdir}")
      return None
    codes, captions = code_shards.read_split(paths.codes_dir, "validation", config.eval_samples)
    sampler = sampling.Sampler(model_cfg, params, vocab)
    return cls(sampler, ImageTokenizer.load(paths.vqgan_workdir), codes, captions)

  def log(self, progress, step: int, params):
    self.sampler.set_params(params)
    greedy, key = sampling.SamplingConfig(greedy=True), jax.random.PRNGKey(0)
    drawn = sampling.text_to_image(self.sampler, self.captions, 1, self.vqgan.cfg.tokens_per_image,
                                   key, 1.0, greedy)[:, 0]
    progress.image(step, "eval/samples", grid(self.vqgan.decode(drawn), scale=2))
    progress.text(step, "eval/samples", "\n".join(
        f"{i + 1}. {c}" for i, c in enumerate(self.captions)))
    written = sampling.caption_images(self.sampler, self.codes, key)
    progress.text(step, "eval/captions", "\n".join(
        f"- {got!r} for an image of {want!r}" for got, want in zip(written, self.captions)))


TASK_NEEDS = {"edit": ("image", "instruction"), "vqa": ("image", "question"),
              "grounded": ("prompt", "objects"), "seg2image": ("image", "prompt"),
              "image2seg": ("image",), "caption": ("image",),
              "html_image": ("prompt",), "infill": ("page",), "continue": ("prompt",)}
TEXT_TASKS = ("infill", "continue")  # tasks without images: any run, a text-only one too
DRAWN_TASKS = ("edit", "grounded", "seg2image", "image2seg", "html_image")  # images, by a Setting
SAMPLING_FLAGS = tuple(f.name for f in dataclasses.fields(sampling.SamplingConfig))
UNMEASURED = sampling.Setting(sampling=dict(greedy=True))  # images of a run without a report
TEXT_SAMPLING = sampling.SamplingConfig(top_p=0.9)  # text where no flag says otherwise


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a cm3jax.train run.")
  flags.DEFINE_string("prompt", None, "Caption to draw.")
  flags.DEFINE_integer("num_images", 8, "Images to draw for --prompt.")
  measured = " Default: the run's best measured setting (see the module doc)."
  flags.DEFINE_float("cfg", None, "Classifier-free guidance scale alpha_c; 1: none." + measured)
  flags.DEFINE_string("out", "samples.png", "PNG grid of the images.")
  flags.DEFINE_integer("scale", 4, "Upscaling of the PNG grid.")
  flags.DEFINE_string("image", None, "Image file to caption.")
  flags.DEFINE_integer("num_captions", 1, "Captions to draw for --image (1: greedy).")
  flags.DEFINE_float("temperature", None, "Softmax temperature." + measured)
  flags.DEFINE_integer("top_k", None, "Top-k filtering; 0: off." + measured)
  flags.DEFINE_float("top_p", None, "Nucleus filtering; 1: off." + measured + " Text: 0.9.")
  flags.DEFINE_integer("cd_k", None, "Contrastive top-k; 0: off." + measured)
  flags.DEFINE_float("cd_alpha", None, "Contrastive top-k's alpha." + measured)
  flags.DEFINE_bool("greedy", None, "Argmax instead of sampling." + measured)
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("memory", None, "A memory bank (cm3jax.build_memory) to retrieve from.")
  flags.DEFINE_integer("retrieve", 0, "Documents retrieved by --prompt and placed before it; "
                       "0: none.")
  flags.DEFINE_bool("uncond_retrieved", None, "With --cfg, the unconditional stream keeps the "
                    "retrieved documents (else it is the caption-free prompt alone)." + measured)
  flags.DEFINE_integer("rerank", None, "Each image is the best of this many drawn, by "
                       "--rerank_by; 1: no reranking." + measured)
  flags.DEFINE_enum("rerank_by", None, list(sampling.RERANKERS), "model: its likelihood of the "
                    "prompt given the image; retriever: the retriever's image-text score. "
                    "Default: the measured setting's, else the retriever where one is given.")
  flags.DEFINE_string("retriever", None, "The retriever that reranks (a train_retriever workdir "
                      "or a CLIP checkpoint); default: --memory's.")
  flags.DEFINE_enum("task", None, list(TASK_NEEDS), "An instruction-tuned task (see the "
                    "module doc; text to image is --prompt); its input image is --image.")
  flags.DEFINE_string("instruction", None, "--task=edit: what to change.")
  flags.DEFINE_string("question", None, "--task=vqa: the question about --image.")
  flags.DEFINE_string("objects", None, "--task=grounded: NAME:X0 Y0 X1 Y1;... boxes in pixels.")
  flags.DEFINE_string("page", None, "--task=infill: a text or HTML page with one <mask> to fill.")
  flags.DEFINE_integer("max_tokens", 64, "--task=continue and infill: the most tokens written.")
  flags.DEFINE_float("s_img", None, "--task=edit: instruct guidance scale of the image; 1: "
                     "none." + measured)
  flags.DEFINE_float("s_txt", None, "--task=edit: instruct guidance scale of the instruction; "
                     "1: none." + measured)


def read_image(path: str, resolution: int) -> np.ndarray:
  """An image file as uint8 [resolution, resolution, 3]; a ConfigError if it does not read."""
  try:
    with open(path, "rb") as f:
      image_bytes = f.read()
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
  `reports.text_to_image_use`)."""
  guidance = {"edit": ("s_img", "s_txt"), "image2seg": ()}.get(use, ("cfg",))
  best_of = ("rerank", "rerank_by", "uncond_retrieved") if use.startswith("text_to_image") else ()
  return guidance + SAMPLING_FLAGS + best_of


def sampling_config(FLAGS, base: sampling.SamplingConfig) -> sampling.SamplingConfig:
  """`base` with each field whose flag is given set to the flag's value."""
  return dataclasses.replace(base, **{f: getattr(FLAGS, f) for f in SAMPLING_FLAGS
                                      if getattr(FLAGS, f) is not None})


def chosen_setting(FLAGS, use: str) -> tuple[sampling.Setting, str]:
  """The setting `use` draws with: each field from its flag where one is given, else from the
  run's best measured setting of `use` (`reports.sampling_defaults`), else from UNMEASURED; and
  a line saying which setting it is and where it came from."""
  measured = reports.sampling_defaults(FLAGS.workdir).get(use)
  base = measured.setting if measured else UNMEASURED
  given = [n for n in setting_flags(use) if getattr(FLAGS, n) is not None]
  asks_for_draws = (FLAGS.rerank or 1) > 1 or {"temperature", "top_k", "top_p"} & set(given)
  if base.config.greedy and "greedy" not in given and asks_for_draws:
    # N argmax images are N copies of one, and a warper does nothing to an argmax.
    base = dataclasses.replace(base, sampling=dataclasses.asdict(TEXT_SAMPLING))
  flag = lambda name, value: getattr(FLAGS, name) if name in given else value
  at_hand = "retriever" if FLAGS.retriever or FLAGS.memory else "model"
  rerank_by = base.rerank_by if base.candidates > 1 else at_hand
  setting = dataclasses.replace(
      base, sampling=dataclasses.asdict(sampling_config(FLAGS, base.config)),
      guidance=flag("s_txt" if use == "edit" else "cfg", base.guidance),
      image_guidance=flag("s_img", base.image_guidance), candidates=flag("rerank", base.candidates),
      rerank_by=flag("rerank_by", rerank_by),
      uncond_retrieved=flag("uncond_retrieved", base.uncond_retrieved))
  path = os.path.join(FLAGS.workdir, reports.SAMPLING_DEFAULTS_FILE)
  origin = (f"the best measured, {measured.describe()}, recorded in {path}" if measured else
            f"{path} records no measured setting of {use}: greedy without guidance")
  overridden = f"; {' '.join('--' + n for n in given)} as given" if given else ""
  return setting, f"sampling {use} with {describe(setting, use)} ({origin}{overridden})"


def describe(setting: sampling.Setting, use: str) -> str:
  """`setting` as the flags that ask for it."""
  c, plain = setting.config, sampling.SamplingConfig()
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
  if use != reports.text_to_image_use(0) and "uncond_retrieved" in names:
    parts.append("--uncond_retrieved" if setting.uncond_retrieved else "--nouncond_retrieved")
  return " ".join(parts)


def run_task(FLAGS, sampler, vqgan, key, setting: sampling.Setting = UNMEASURED,
             text: sampling.SamplingConfig = TEXT_SAMPLING) -> list[str]:
  """Does --task, a task of DRAWN_TASKS with `setting`, the text tasks with `text`; returns
  what it printed or wrote, in lines."""
  missing = [f"--{f}" for f in TASK_NEEDS[FLAGS.task] if not getattr(FLAGS, f)]
  if missing:
    raise ConfigError(f"--task={FLAGS.task} needs {' and '.join(missing)}")
  if FLAGS.task == "infill":
    return sampling.infill_text(sampler, [FLAGS.page], key, FLAGS.max_tokens, text)
  if FLAGS.task == "continue":
    return [FLAGS.prompt + t for t in sampling.continue_text(
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
    made = sampling.text_to_image(sampler, [FLAGS.prompt], n, T, key, guidance, cfg,
                                  form="html")[0]
  elif FLAGS.task == "seg2image":
    made = instruct.seg2image(sampler, codes, [FLAGS.prompt] * n, key, guidance, cfg)
  else:
    made = instruct.image2seg(sampler, codes, key, cfg)
  save_png(grid(vqgan.decode(made), FLAGS.scale), FLAGS.out)
  return [f"wrote {n} images of --task={FLAGS.task} to {FLAGS.out}"]


def main(FLAGS):
  if not FLAGS.workdir or not (FLAGS.prompt or FLAGS.image or FLAGS.task):
    raise ConfigError("--workdir and one of --prompt, --image or --task are required")
  if FLAGS.num_images < 1 or FLAGS.num_captions < 1 or (FLAGS.rerank is not None
                                                       and FLAGS.rerank < 1):
    raise ConfigError("--num_images, --num_captions and --rerank must be at least 1")
  if FLAGS.retrieve and not (FLAGS.memory and FLAGS.prompt):
    raise ConfigError("--retrieve needs --memory and --prompt")
  if (FLAGS.rerank or 1) > 1 and not FLAGS.prompt:
    raise ConfigError("--rerank needs --prompt")
  text = sampling_config(FLAGS, TEXT_SAMPLING)
  use = FLAGS.task if FLAGS.task in DRAWN_TASKS else (
      reports.text_to_image_use(FLAGS.retrieve) if FLAGS.prompt and not FLAGS.task else None)
  setting = UNMEASURED
  if use:
    setting, line = chosen_setting(FLAGS, use)
    if (setting.candidates > 1 and setting.rerank_by == "retriever"
        and not (FLAGS.retriever or FLAGS.memory)):
      raise ConfigError("--rerank_by=retriever needs a retriever: --retriever or --memory (its "
                        "bank's)")
    print(line)
  sampler, config = sampling.load(FLAGS.workdir)
  key = jax.random.PRNGKey(FLAGS.seed)
  if FLAGS.task in TEXT_TASKS:
    print("\n".join(run_task(FLAGS, sampler, None, key, text=text)))
    return
  if not sampler.vocab.num_image_codes:
    raise ConfigError(f"{FLAGS.workdir} is a text-only model (no image codes): sample it with "
                      f"--task={' or --task='.join(TEXT_TASKS)}")
  vqgan = ImageTokenizer.load(data.input_paths(config["cm3"], FLAGS.workdir).vqgan_workdir)
  if FLAGS.task:
    print("\n".join(run_task(FLAGS, sampler, vqgan, key, setting)))
    return
  if FLAGS.prompt:
    by_retriever = setting.candidates > 1 and setting.rerank_by == "retriever"
    found = None
    if FLAGS.retrieve or (by_retriever and not FLAGS.retriever):
      found = augment.Memory.load(FLAGS.memory)
    context = None
    if FLAGS.retrieve:
      ids = found.retrieve([FLAGS.prompt], FLAGS.retrieve)
      context = found.documents(sampler.vocab, ids) * FLAGS.num_images
      for i in ids[0]:
        print(f"retrieved: {found.captions[i]!r}")
    score = None
    if by_retriever:
      scorer = retriever.load(FLAGS.retriever) if FLAGS.retriever else found.retriever
      score = augment.retriever_score(scorer, vqgan)
    codes = sampling.text_to_image_reranked(
        sampler, [FLAGS.prompt] * FLAGS.num_images, setting.candidates,
        vqgan.cfg.tokens_per_image, key, setting.guidance, setting.config, context,
        setting.uncond_retrieved, score)
    save_png(grid(vqgan.decode(codes), FLAGS.scale), FLAGS.out)
    judge = "the retriever" if by_retriever else "the model's likelihood of the prompt"
    best_of = (f", each the best of {setting.candidates} by {judge},"
               if setting.candidates > 1 else "")
    print(f"wrote {FLAGS.num_images} images{best_of} of {FLAGS.prompt!r} to {FLAGS.out}")
  if FLAGS.image:
    pixels = read_image(FLAGS.image, vqgan.cfg.resolution)
    codes = np.repeat(vqgan.encode(pixels[None]), FLAGS.num_captions, 0)
    if FLAGS.num_captions == 1:
      captions = sampling.caption_images(sampler, codes, key)
    else:
      captions = sampling.caption_images(sampler, codes, key, sampling=text)
    for caption in captions:
      print(caption)


if __name__ == "__main__":
  cli.run("sample", _define_flags, main)
