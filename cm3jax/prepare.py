"""The inputs of the CM3 stream, made where missing and reused where present (`config.cm3`):

  1. the image tokenizer: a VQGAN checkpoint in cm3.vqgan_workdir, trained with cm3.vqgan_config
     on the shapes dataset (built under cm3.data_dir on first use) if the checkpoint is missing
     or unfinished;
  2. image codes: every split of cm3.splits encoded into shards in cm3.codes_dir
     (cm3jax.tokenize_images; an interrupted split resumes);
  3. the text tokenizer: the sentencepiece model cm3.tokenizer, trained on the train captions
     (cm3jax.train_tokenizer) if missing.

Empty paths default to WORKDIR/vqgan, WORKDIR/codes and WORKDIR/tokenizer.model.
"""

import os
import time

from cm3jax.config import ConfigError, load_config_file
from cm3jax.vocab import Vocab


def input_paths(cm3, workdir: str) -> tuple[str, str, str]:
  """The VQGAN workdir, the code shards and the tokenizer of a run's `cm3` config section (the
  live ConfigDict or the JSON saved with a checkpoint), empty paths resolved in `workdir`."""
  return (cm3["vqgan_workdir"] or os.path.join(workdir, "vqgan"),
          cm3["codes_dir"] or os.path.join(workdir, "codes"),
          cm3["tokenizer"] or os.path.join(workdir, "tokenizer.model"))


def cm3_inputs(config, workdir: str) -> tuple[Vocab, str, str]:
  """Makes what is missing; returns the vocabulary, the code shards' and the VQGAN's directory."""
  c = config.cm3
  vqgan_workdir, codes_dir, tokenizer = input_paths(c, workdir)
  splits = [s.strip() for s in c.splits.split(",") if s.strip()]
  if "train" not in splits or "validation" not in splits:
    raise ConfigError(f"cm3.splits={c.splits!r} must include train and validation")

  if not all(os.path.exists(os.path.join(codes_dir, f"{s}.json")) for s in splits):
    _image_tokenizer(c, vqgan_workdir)
    _image_codes(c, vqgan_workdir, codes_dir, splits)
  else:
    _say(2, f"image codes: found in {codes_dir}")
  _text_tokenizer(c, codes_dir, tokenizer)

  from cm3jax.data import code_shards
  manifest = code_shards.read_manifest(codes_dir, "train")
  vocab = Vocab.from_spm_file(tokenizer, c.max_spans, manifest["codebook_size"])
  _say(3, f"vocabulary: {vocab.describe()}")
  return vocab, codes_dir, vqgan_workdir


def _say(stage: int, message: str):
  print(f"[data {stage}/3] {message}", flush=True)


def _image_tokenizer(c, vqgan_workdir: str):
  from cm3jax import train_vqgan
  from cm3jax.vqgan import tokenizer
  saved = tokenizer.progress(vqgan_workdir)
  if saved is not None and saved[0] >= saved[1]:
    _say(1, f"image tokenizer: found {vqgan_workdir} (step {saved[0]})")
    return
  step = saved[0] if saved else 0
  vq_config = load_config_file(c.vqgan_config)
  if c.dataset.split("/")[0] != "shapes":
    raise ConfigError(f"no finished VQGAN in {vqgan_workdir}, and cm3jax trains one on shapes "
                      f"only: train one on your images, or set cm3.vqgan_workdir to one")
  vq_config.data, vq_config.data_dir = c.dataset, c.data_dir
  _say(1, f"image tokenizer: training {c.vqgan_config} into {vqgan_workdir}"
       + (f" from step {step}" if step else ""))
  t = time.perf_counter()
  history = train_vqgan.train(vq_config, vqgan_workdir)
  evals = [h for h in history if "eval_psnr" in h]
  done = (f"validation PSNR {evals[-1]['eval_psnr']:.1f} dB, "
          f"{evals[-1]['eval_codebook_usage']:.0%} of the codebook in use; " if evals else "")
  _say(1, f"image tokenizer: {done}{time.perf_counter() - t:.0f}s")


def _image_codes(c, vqgan_workdir: str, codes_dir: str, splits: list[str]):
  from cm3jax import tokenize_images
  from cm3jax.vqgan.tokenizer import ImageTokenizer
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  for split in splits:
    t = time.perf_counter()
    summary = tokenize_images.tokenize_split(tokenizer, c.dataset, split, codes_dir, c.data_dir)
    _say(2, f"image codes: {tokenize_images.describe(summary)} ({time.perf_counter() - t:.0f}s)")


def _text_tokenizer(c, codes_dir: str, path: str):
  if os.path.exists(path):
    _say(3, f"text tokenizer: found {path}")
    return
  import collections
  from cm3jax import train_tokenizer
  skipped = collections.Counter()
  model = train_tokenizer.train(train_tokenizer.read_sentences(codes_dir, skipped),
                                c.text_vocab_size)
  train_tokenizer.write_atomically(path, model)
  _say(3, f"text tokenizer: trained {train_tokenizer.num_pieces(model)} pieces on the train "
       f"captions of {codes_dir} into {path}")
