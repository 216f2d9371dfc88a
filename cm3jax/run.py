"""A trained run as one object, the library API:

  import cm3jax
  run = cm3jax.load("workdirs/tiny")
  images = run.text_to_image(["a red circle above a blue square"])  # uint8 [1, 4, H, W, 3]
  captions = run.caption(images[0])

`load` binds the run's config, latest step, vocabulary, sampler and (for a run with images) its
VQGAN once. Methods take and return what a person has: captions and uint8 pixels. Images are
drawn with the run's best measured setting (WORKDIR/sampling_defaults.json, as
`python -m cm3jax.sample` draws them) unless an argument says otherwise. A request the run cannot
serve raises `RequestError`, a ValueError, in one line.
"""

import dataclasses
import types
from typing import Optional, Sequence

import jax
import numpy as np

from cm3jax.core import checkpoint, paths
from cm3jax.sampling import defaults, engine, sample
from cm3jax.vqgan.tokenizer import ImageTokenizer


class RequestError(ValueError):
  """A request the run cannot serve: no captions, pixels of the wrong shape, images from a
  text-only run."""


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict
  step: int
  sampler: engine.Sampler
  vqgan: Optional[ImageTokenizer]  # None for a text-only run

  @property
  def vocab(self):
    return self.sampler.vocab

  def setting(self, guidance: Optional[float] = None, top_p: Optional[float] = None,
              rerank: Optional[int] = None) -> engine.Setting:
    """The setting text->image draws with: the run's best measured one, each given argument in
    place of its field (as `cm3jax.sample`'s --cfg, --top_p and --rerank)."""
    given = {name: None for name in sample.setting_flags(defaults.text_to_image_use(0))}
    given.update(cfg=guidance, top_p=top_p, rerank=rerank)
    asked = types.SimpleNamespace(workdir=self.workdir, retriever=None, memory=None, **given)
    return sample.chosen_setting(asked, defaults.text_to_image_use(0))[0]

  def text_to_image(self, captions: Sequence[str], num_images: int = 4,
                    guidance: Optional[float] = None, top_p: Optional[float] = None,
                    rerank: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """uint8 images [len(captions), num_images, H, W, 3], each caption's drawn from one key."""
    vqgan = self._image_model()
    captions = _captions(captions)
    if num_images < 1 or (rerank is not None and rerank < 1):
      raise RequestError(f"num_images and rerank must be at least 1, got {num_images}, {rerank}")
    setting = self.setting(guidance, top_p, rerank)
    if setting.candidates > 1 and setting.rerank_by == "retriever":
      raise RequestError("this run's measured setting reranks by a retriever, which a Run without "
                         "a memory lacks: pass rerank=1 or use python -m cm3jax.sample --memory")
    codes = engine.text_to_image_reranked(
        self.sampler, [c for c in captions for _ in range(num_images)], setting.candidates,
        vqgan.cfg.tokens_per_image, jax.random.PRNGKey(seed), setting.guidance, setting.config)
    images = vqgan.decode(codes)
    return images.reshape(len(captions), num_images, *images.shape[1:])

  def caption(self, images: np.ndarray, seed: int = 0) -> list[str]:
    """A caption of each uint8 image [N, H, W, 3] (or one [H, W, 3]), greedy."""
    vqgan = self._image_model()
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8 \
        or not len(images):
      raise RequestError(f"images must be uint8 [N, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    return engine.caption_images(self.sampler, vqgan.encode(images), jax.random.PRNGKey(seed))

  def continue_text(self, texts: Sequence[str], seed: int = 0) -> list[str]:
    """What the model writes after each text (top-p 0.9, as `cm3jax.sample --task=continue`)."""
    return engine.continue_text(self.sampler, _captions(texts), jax.random.PRNGKey(seed),
                                sampling=sample.TEXT_SAMPLING)

  def _image_model(self) -> ImageTokenizer:
    if self.vqgan is None:
      raise RequestError(f"{self.workdir} is a text-only model (no image codes): use "
                         "continue_text")
    return self.vqgan


def _captions(captions: Sequence[str]) -> list[str]:
  if isinstance(captions, str) or not captions or not all(isinstance(c, str) for c in captions):
    raise RequestError(f"captions must be a non-empty list of strings, got {captions!r:.80}")
  return list(captions)


def load(workdir: str) -> Run:
  """The latest checkpoint of a `cm3jax.train` (or pipeline) workdir, with its VQGAN."""
  sampler, config = engine.load(workdir)
  vqgan = None
  if sampler.vocab.num_image_codes:
    vqgan = ImageTokenizer.load(paths.input_paths(config["cm3"], workdir).vqgan_workdir)
  return Run(workdir, config, checkpoint.latest_step(workdir), sampler, vqgan)
