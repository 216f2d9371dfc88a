"""Sample images from a caption, or captions from an image, with a trained model.

  python -m cm3jax.sample --workdir=workdirs/tiny --prompt="a red circle above a blue square"       --num_images=8 --out=grid.png
  python -m cm3jax.sample --workdir=workdirs/tiny --image=photo.png --num_captions=3
  python -m cm3jax.sample --workdir=workdirs/tiny_ra --prompt="a red circle above a blue square"       --memory=workdirs/tiny_ra/memory --retrieve=3

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

An instruction-tuned run (configs/tiny_sft.py) does its tasks (cm3jax/sampling/instruct.py):

  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=edit --image=in.png       --instruction="make the red circle blue" --out=edited.png
  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=vqa --image=in.png       --question="what colour is the circle?"
  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=grounded       --prompt="a small red circle on the left" --objects="red circle:2 10 14 22"
  python -m cm3jax.sample --workdir=workdirs/tiny_sft --task=seg2image --image=map.png       --prompt="a small red circle on the left"

A run trained on CM3's HTML documents (cm3.document_form="html") draws from an `alt` prompt:

  python -m cm3jax.sample --workdir=W --task=html_image --prompt="a red circle" --out=img.png

Any run continues a text or fills the one <mask> of a text or HTML page (CM3's infilling); a
text-only run (data="text", configs/text_tiny.py) does these two tasks only:

  python -m cm3jax.sample --workdir=W --task=continue --prompt="a small red circle above" --greedy
  python -m cm3jax.sample --workdir=W --task=infill --page='<p><mask></p><img alt="a car"'

edit uses instruct guidance (--s_img, --s_txt; 1 and 1: none), grounded, seg2image and
html_image classifier-free guidance (--cfg); image2seg draws the segmentation map of --image, caption
describes it. Image tasks write --num_images images to --out; text tasks print the answer.
--quantize=int8 decodes with weight-only int8 weights (about half the bytes of bf16; docs/design.md,
"Decoding").
"""

import jax
import numpy as np
from absl import flags

from cm3jax import cli
from cm3jax import run as run_lib
from cm3jax.config import ConfigError
from cm3jax.sampling import defaults
from cm3jax.retrieval import augment, retriever
from cm3jax.sampling import engine, sample


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
  flags.DEFINE_enum("rerank_by", None, list(engine.RERANKERS), "model: its likelihood of the "
                    "prompt given the image; retriever: the retriever's image-text score. "
                    "Default: the measured setting's, else the retriever where one is given.")
  flags.DEFINE_string("retriever", None, "The retriever that reranks (a train_retriever workdir "
                      "or a CLIP checkpoint); default: --memory's.")
  flags.DEFINE_enum("task", None, list(sample.TASK_NEEDS), "An instruction-tuned task (see the "
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
  flags.DEFINE_enum("quantize", "none", list(engine.QUANTIZE), "How the token model's weights "
                    "are stored for decoding: none (its compute dtype) or int8 (weight-only int8: "
                    "int8 values with a float scale per output channel or table row).")


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
  given = {name: getattr(FLAGS, name) for name in sample.SETTING_FLAGS}
  text = sample.sampling_config(given, sample.TEXT_SAMPLING)
  use = FLAGS.task if FLAGS.task in sample.DRAWN_TASKS else (
      defaults.text_to_image_use(FLAGS.retrieve) if FLAGS.prompt and not FLAGS.task else None)
  setting = sample.UNMEASURED
  if use:
    at_hand = "retriever" if FLAGS.retriever or FLAGS.memory else "model"
    setting, line = sample.chosen_setting(FLAGS.workdir, use, given, at_hand)
    if setting.candidates > 1 and setting.rerank_by == "retriever" and at_hand == "model":
      raise ConfigError("--rerank_by=retriever needs a retriever: --retriever or --memory (its "
                        "bank's)")
    print(line)
  run = run_lib.load(FLAGS.workdir, quantize=FLAGS.quantize)
  sampler, vqgan, key = run.sampler, run.vqgan, jax.random.PRNGKey(FLAGS.seed)
  if FLAGS.task in sample.TEXT_TASKS:
    print("\n".join(sample.run_task(FLAGS, sampler, None, key, text=text)))
    return
  if vqgan is None:
    raise ConfigError(f"{FLAGS.workdir} is a text-only model (no image codes): sample it with "
                      f"--task={' or --task='.join(sample.TEXT_TASKS)}")
  if FLAGS.task:
    print("\n".join(sample.run_task(FLAGS, sampler, vqgan, key, setting)))
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
      for caption in found.bank.get(ids[0])[0]:
        print(f"retrieved: {caption.decode('utf-8', 'replace')!r}")
    score = None
    if by_retriever:
      scorer = retriever.load(FLAGS.retriever) if FLAGS.retriever else found.retriever
      score = augment.retriever_score(scorer, vqgan)
    codes = engine.text_to_image_reranked(
        sampler, [FLAGS.prompt] * FLAGS.num_images, setting.candidates,
        vqgan.cfg.tokens_per_image, jax.random.split(key, FLAGS.num_images), setting.guidance,
        setting.config, context, setting.uncond_retrieved, score)
    sample.save_png(sample.grid(vqgan.decode(codes), FLAGS.scale), FLAGS.out)
    judge = "the retriever" if by_retriever else "the model's likelihood of the prompt"
    best_of = (f", each the best of {setting.candidates} by {judge},"
               if setting.candidates > 1 else "")
    print(f"wrote {FLAGS.num_images} images{best_of} of {FLAGS.prompt!r} to {FLAGS.out}")
  if FLAGS.image:
    pixels = sample.read_image(FLAGS.image, vqgan.cfg.resolution)
    codes = np.repeat(vqgan.encode(pixels[None]), FLAGS.num_captions, 0)
    if FLAGS.num_captions == 1:
      captions = engine.caption_images(sampler, codes, key)
    else:
      captions = engine.caption_images(sampler, codes, key, sampling=text)
    for caption in captions:
      print(caption)


if __name__ == "__main__":
  cli.run("sample", _define_flags, main)
