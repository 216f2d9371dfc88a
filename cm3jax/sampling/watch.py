"""What a user watches a model learn by, in TensorBoard: the images and captions a training
run draws at each evaluation."""

from typing import Optional

import jax
import numpy as np

from cm3jax.core.paths import input_paths
from cm3jax.data import code_shards
from cm3jax.sampling import engine
from cm3jax.sampling.sample import grid
from cm3jax.vqgan.tokenizer import ImageTokenizer
from cm3jax.vqgan.tokenizer import progress as tokenizer_progress


class Watch:
  """What a user watches a model learn by: at each evaluation, images drawn greedily for fixed
  validation captions and greedy captions of fixed validation images, into TensorBoard."""

  def __init__(self, sampler: engine.Sampler, vqgan: ImageTokenizer, codes: np.ndarray,
               captions: list[str]):
    self.sampler, self.vqgan, self.codes, self.captions = sampler, vqgan, codes, captions

  @classmethod
  def of_run(cls, config, workdir: str, model_cfg, params, vocab) -> Optional["Watch"]:
    """The watch of a training run, or None where config.eval_samples is 0 or it cannot be
    made (saying why): it needs the cm3 data, its VQGAN and a single host."""
    if not config.eval_samples or config.data != "cm3":
      return None
    paths = input_paths(config.cm3, workdir)
    if jax.process_count() > 1 or tokenizer_progress(paths.vqgan_workdir) is None:
      print(f"eval_samples={config.eval_samples}: off, since it needs one host and a VQGAN in "
            f"{paths.vqgan_workdir}")
      return None
    codes, captions = code_shards.read_split(paths.codes_dir, "validation", config.eval_samples)
    sampler = engine.Sampler(model_cfg, params, vocab)
    return cls(sampler, ImageTokenizer.load(paths.vqgan_workdir), codes, captions)

  def log(self, progress, step: int, params):
    self.sampler.set_params(params)
    greedy, key = engine.SamplingConfig(greedy=True), jax.random.PRNGKey(0)
    drawn = engine.text_to_image(self.sampler, self.captions, 1, self.vqgan.cfg.tokens_per_image,
                                   key, 1.0, greedy)[:, 0]
    progress.image(step, "eval/samples", grid(self.vqgan.decode(drawn), scale=2))
    progress.text(step, "eval/samples", "\n".join(
        f"{i + 1}. {c}" for i, c in enumerate(self.captions)))
    written = engine.caption_images(self.sampler, self.codes, key)
    progress.text(step, "eval/captions", "\n".join(
        f"- {got!r} for an image of {want!r}" for got, want in zip(written, self.captions)))
