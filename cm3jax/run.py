"""A trained run as one object, the library API:

  import cm3jax
  run = cm3jax.load("workdirs/tiny")
  images = run.text_to_image(["a red circle above a blue square"])  # uint8 [1, 4, H, W, 3]
  captions = run.caption(images[0])

`load` binds the run's config, latest step, vocabulary, sampler and (for a run with images) its
VQGAN once, and its memory bank (with the bank's retriever) on first use. Methods take and
return what a person has: captions, texts and uint8 pixels [N, H, W, 3]. Images are drawn with
the run's best measured setting of each use (WORKDIR/sampling_defaults.json, as
`python -m cm3jax.sample` draws them) unless an argument says otherwise. A request the run
cannot serve raises `RequestError`, a ValueError, in one line.
"""

import dataclasses
import math
import os
from typing import Optional, Sequence

import jax
import numpy as np

from cm3jax.core import files, paths
from cm3jax.retrieval import augment
from cm3jax.retrieval import memory as memory_lib
from cm3jax.sampling import defaults, engine, instruct, sample
from cm3jax.vqgan.tokenizer import ImageTokenizer


class RequestError(ValueError):
  """A request the run cannot serve: no captions, pixels of the wrong shape, images from a
  text-only run, documents from a run without a memory bank."""


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict
  step: int
  sampler: engine.Sampler
  vqgan: Optional[ImageTokenizer]  # None for a text-only run
  memory_bank: Optional[str]  # the bank `retrieve` and `text_to_image(retrieve=k)` read
  _memory: Optional[augment.Memory] = dataclasses.field(default=None, repr=False)

  @property
  def vocab(self):
    return self.sampler.vocab

  @property
  def quantize(self) -> str:
    """How the sampler stores its weights: "none" (the compute dtype) or "int8"."""
    return self.sampler.quantize

  @property
  def paths(self) -> paths.InputPaths:
    """The VQGAN, image codes and tokenizer the run was trained on."""
    return paths.input_paths(self.config["cm3"], self.workdir)

  @property
  def memory(self) -> augment.Memory:
    if self.memory_bank is None:
      raise RequestError(f"{self.workdir} has no memory bank: pass load(workdir, memory=BANK)")
    if self._memory is None:
      self._memory = augment.Memory.load(self.memory_bank)
    return self._memory

  def setting(self, use: str = "text_to_image", **given) -> engine.Setting:
    """The setting `use` (a text->image use of `defaults.text_to_image_use`, or a task of
    `sample.DRAWN_TASKS`) draws with: the run's best measured one, with each field `given`
    (named as `cm3jax.sample`'s flags: cfg, s_img, s_txt, top_p, rerank, ...) in its place."""
    at_hand = "retriever" if self.memory_bank else "model"
    return sample.chosen_setting(self.workdir, use, given, at_hand)[0]

  def text_to_image(self, captions: Sequence[str], num_images: int = 4,
                    guidance: Optional[float] = None, top_p: Optional[float] = None,
                    rerank: Optional[int] = None, retrieve: int = 0, seed: int = 0
                    ) -> np.ndarray:
    """uint8 images [len(captions), num_images, H, W, 3], drawn by `draw` with the keys of
    `seed` split in len(captions) * num_images; with `retrieve` > 0 each caption follows its
    `retrieve` nearest documents of the memory."""
    captions = _texts(captions)
    if num_images < 1:
      raise RequestError(f"num_images must be at least 1, got {num_images}")
    rows = [c for c in captions for _ in range(num_images)]
    images = self.draw(rows, jax.random.split(jax.random.PRNGKey(seed), len(rows)), guidance,
                       top_p, rerank, retrieve)
    return images.reshape(len(captions), num_images, *images.shape[1:])

  def draw(self, captions: Sequence[str], keys: jax.Array, guidance: Optional[float] = None,
           top_p: Optional[float] = None, rerank: Optional[int] = None, retrieve: int = 0
           ) -> np.ndarray:
    """uint8 images [len(captions), H, W, 3]: one of each caption, drawn with its key of `keys`
    [len(captions), 2] whatever the rows beside it (the server batches requests through this)."""
    vqgan, captions = self._image_model(), _texts(captions)
    if (rerank is not None and rerank < 1) or retrieve < 0:
      raise RequestError(f"rerank must be at least 1 and retrieve at least 0, got {rerank}, "
                         f"{retrieve}")
    setting = self.setting(defaults.text_to_image_use(retrieve), cfg=guidance, top_p=top_p,
                           rerank=rerank)
    by_retriever = setting.candidates > 1 and setting.rerank_by == "retriever"
    if by_retriever and self.memory_bank is None:
      raise RequestError("this run's measured setting reranks by a retriever, which a run "
                         "without a memory bank lacks: pass rerank=1 or load(workdir, memory=BANK)")
    context = self.memory.context(self.vocab, captions, retrieve) if retrieve else None
    score = augment.retriever_score(self.memory.retriever, vqgan) if by_retriever else None
    codes = engine.text_to_image_reranked(
        self.sampler, captions, setting.candidates, vqgan.cfg.tokens_per_image, keys,
        setting.guidance, setting.config, context, setting.uncond_retrieved, score)
    return vqgan.decode(codes)

  def caption(self, images: np.ndarray, seed: int = 0) -> list[str]:
    """A caption of each uint8 image [N, H, W, 3] (or one [H, W, 3]), greedy, by CM3's
    infilling of the caption."""
    return engine.caption_images(self.sampler, self._codes(images), jax.random.PRNGKey(seed))

  def infill(self, image: np.ndarray, box: Sequence[int], caption: str, seed: int = 0
             ) -> np.ndarray:
    """uint8 [H, W, 3] at the VQGAN's resolution: `image` with `box` (x0, y0, x1, y1 in its
    pixels, x1 and y1 excluded) drawn anew for `caption`, given the rest of the image. A CM3
    mask is one span of codes in raster order, so every code from the box's first to its last
    is drawn anew: a box narrower than the image redraws the codes beside it on its rows too."""
    vqgan = self._image_model()
    codes = self._codes(image)
    if len(codes) != 1:
      raise RequestError(f"infill takes one image, got {len(codes)}")
    height, width = np.shape(image)[-3:-1]
    if len(box) != 4 or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
      raise RequestError(f"box {list(box)} is not x0 < x1 <= {width}, y0 < y1 <= {height} "
                         "inside the image")
    side = math.isqrt(vqgan.cfg.tokens_per_image)
    first = (box[1] * side // height) * side + box[0] * side // width
    last = (-(-box[3] * side // height) - 1) * side + -(-box[2] * side // width) - 1
    filled = engine.infill_image(self.sampler, _texts([caption])[0], codes[0], first, last + 1,
                                 jax.random.PRNGKey(seed), self.setting().config)
    return vqgan.decode(filled[None])[0]

  def continue_text(self, texts: Sequence[str], seed: int = 0) -> list[str]:
    """What the model writes after each text (top-p 0.9, as `cm3jax.sample --task=continue`)."""
    return engine.continue_text(self.sampler, _texts(texts), jax.random.PRNGKey(seed),
                                sampling=sample.TEXT_SAMPLING)

  def infill_text(self, pages: Sequence[str], seed: int = 0) -> list[str]:
    """Each text or HTML page with its `<mask>` replaced by what the model writes there (top-p
    0.9, as `cm3jax.sample --task=infill`)."""
    pages = _texts(pages)
    if not all("<mask>" in p for p in pages):
      raise RequestError("each page must hold one <mask> to fill")
    return engine.infill_text(self.sampler, pages, jax.random.PRNGKey(seed),
                              sampling=sample.TEXT_SAMPLING)

  # The instruction-tuned tasks (docs/instruction_tuning.md).

  def edit(self, images: np.ndarray, instructions: Sequence[str],
           image_guidance: Optional[float] = None, text_guidance: Optional[float] = None,
           seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: each image edited as its instruction says (instruct guidance)."""
    codes, instructions = self._codes(images), self._per_image(images, instructions)
    setting = self.setting("edit", s_img=image_guidance, s_txt=text_guidance)
    return self.vqgan.decode(instruct.edit(
        self.sampler, codes, instructions, jax.random.PRNGKey(seed), setting.image_guidance,
        setting.guidance, setting.config))

  def vqa(self, images: np.ndarray, questions: Sequence[str], seed: int = 0) -> list[str]:
    """The answer to each question about its image, greedy."""
    codes, questions = self._codes(images), self._per_image(images, questions)
    return instruct.vqa(self.sampler, codes, questions, jax.random.PRNGKey(seed))

  def grounded(self, captions: Sequence[str],
               objects: Sequence[Sequence[tuple[str, Sequence[int]]]],
               guidance: Optional[float] = None, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: an image of each caption with its objects, [(name, (x0, y0, x1,
    y1))], in their boxes."""
    vqgan, captions = self._image_model(), _texts(captions)
    if len(objects) != len(captions):
      raise RequestError(f"{len(captions)} captions but {len(objects)} lists of objects")
    setting = self.setting("grounded", cfg=guidance)
    return vqgan.decode(instruct.grounded(
        self.sampler, captions, [[(n, list(b)) for n, b in o] for o in objects],
        vqgan.cfg.tokens_per_image, jax.random.PRNGKey(seed), setting.guidance, setting.config))

  def seg2image(self, maps: np.ndarray, captions: Sequence[str],
                guidance: Optional[float] = None, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: an image of each caption laid out as its segmentation map."""
    codes, captions = self._codes(maps), self._per_image(maps, captions)
    setting = self.setting("seg2image", cfg=guidance)
    return self.vqgan.decode(instruct.seg2image(
        self.sampler, codes, captions, jax.random.PRNGKey(seed), setting.guidance,
        setting.config))

  def image2seg(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3]: each image's segmentation map."""
    codes = self._codes(images)
    return self.vqgan.decode(instruct.image2seg(self.sampler, codes, jax.random.PRNGKey(seed),
                                                self.setting("image2seg").config))

  def retrieve(self, texts: Sequence[str], k: int = 2) -> tuple[list[list[str]], np.ndarray]:
    """The `k` documents of the memory bank nearest each text, best first: their captions
    [len(texts)][k] and images uint8 [len(texts), k, H, W, 3]."""
    vqgan, texts = self._image_model(), _texts(texts)
    if k < 1:
      raise RequestError(f"k={k}: retrieve at least 1 document")
    ids = self.memory.retrieve(texts, k)
    if (ids < 0).any():
      raise RequestError(f"k={k}: the memory bank holds fewer documents")
    captions, codes = self.memory.bank.get(ids.ravel())
    images = vqgan.decode(codes)
    return ([[c.decode("utf-8", "replace") for c in captions[i * k:(i + 1) * k]]
             for i in range(len(ids))], images.reshape(*ids.shape, *images.shape[1:]))

  def _image_model(self) -> ImageTokenizer:
    if self.vqgan is None:
      raise RequestError(f"{self.workdir} is a text-only model (no image codes): use "
                         "continue_text or infill_text")
    return self.vqgan

  def _codes(self, images: np.ndarray) -> np.ndarray:
    """int codes [N, T] of uint8 images [N, H, W, 3] (or one [H, W, 3])."""
    vqgan = self._image_model()
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or images.dtype != np.uint8 \
        or not len(images):
      raise RequestError(f"images must be uint8 [N, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    return vqgan.encode(images)

  def _per_image(self, images: np.ndarray, texts: Sequence[str]) -> list[str]:
    texts, count = _texts(texts), 1 if np.ndim(images) == 3 else len(images)
    if len(texts) != count:
      raise RequestError(f"{count} images but {len(texts)} texts: give one text per image")
    return texts


def _texts(texts: Sequence[str]) -> list[str]:
  if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
    raise RequestError(f"give a non-empty list of strings, got {texts!r:.80}")
  return list(texts)


def load(workdir: str, memory: str = "", quantize: str = "none") -> Run:
  """The latest checkpoint of a `cm3jax.train` (or pipeline) workdir, with its VQGAN, and the
  memory bank `memory` (by default the run's own, where it has one). `quantize`: how the token
  model's weights are stored for decoding, "none" (its compute dtype) or "int8" (weight-only
  int8, about half the bytes of bf16: cm3jax/sampling/quantize.py); any other value is a
  ConfigError."""
  sampler, config, step = engine.load(workdir, quantize=quantize)
  vqgan = None
  if sampler.vocab.num_image_codes:
    vqgan = ImageTokenizer.load(paths.input_paths(config["cm3"], workdir).vqgan_workdir)
  bank = memory or paths.retrieval_paths(config["cm3"], workdir).memory
  has_bank = files.exists(os.path.join(bank, memory_lib.MANIFEST))
  if memory and not has_bank:
    memory_lib.read_manifest(memory)  # says what is missing
  return Run(workdir, config, step, sampler, vqgan, bank if has_bank else None)
