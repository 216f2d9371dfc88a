"""Decoding the instruction-tuned tasks (CM3Leon §4; docs/design.md, "Instruction tuning").

Each task's prompt is its `data.sft` template's input followed by `<break>`, where the output
starts in training. A guided task adds streams in which conditions are masked as the CM3
objective masks spans, `<sentinel:i>` for the i-th masked segment:

  edit        instruct guidance over three streams: full (image and instruction), image-only
              (the instruction masked) and unconditional (both masked),
              uncond + s_img (image - uncond) + s_txt (full - image); the paper's s_img 1.5,
              s_txt 7.5
  grounded    classifier-free guidance against the prompt with its text masked
  seg2image   classifier-free guidance against the prompt with map and caption masked (the
              paper's CFG 3)
  image2seg   the map, drawn like an image
  caption     the template's caption, as text
  vqa         the answer, read from the `Answer: {answer}.` segment
  text2image  the pretraining document's prompt: `sampling.text_to_image`

The scales default to 1 (no guidance): the paper's ruin the tiny model's images on every task
(benchmarks/RESULTS.md, "Instruction tuning"). `cm3jax.sample` decodes with the run's best
measured setting (`defaults.sampling_defaults`).
"""

from typing import Sequence, Union

import jax
import numpy as np

from cm3jax.core.vocab import EOS, Vocab
from cm3jax.data import sft
from cm3jax.sampling.engine import Request, Sampler, SamplingConfig, complete_texts

MASKED = None  # a segment of `prompt` replaced by the next sentinel
PromptSegment = Union[str, np.ndarray, None]


def prompt(vocab: Vocab, segments: Sequence[PromptSegment]) -> np.ndarray:
  """`</s> seg_1 <break> ... seg_n <break>`: strings as text, arrays as image codes, MASKED as
  `<sentinel:0>`, `<sentinel:1>`, ... in order."""
  out, masked = [EOS], 0
  for segment in segments:
    if segment is MASKED:
      out.append(vocab.sentinel(masked))
      masked += 1
    elif isinstance(segment, str):
      out.extend(vocab.encode_text(segment))
    else:
      out.extend(vocab.image_tokens(segment).tolist())
    out.append(vocab.break_id)
  return np.asarray(out, np.int32)


def _images(sampler: Sampler, requests: list[Request], tokens_per_image: int,
            sampling: SamplingConfig) -> np.ndarray:
  return sampler.vocab.image_codes(sampler.generate(requests, tokens_per_image, "image", sampling))


def edit(sampler: Sampler, codes_BxT: np.ndarray, instructions: Sequence[str], key: jax.Array,
         s_img: float = 1.0, s_txt: float = 1.0,
         sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
  """Codes [B, T]: each image edited as its instruction says, by instruct guidance."""
  vocab, P = sampler.vocab, sft.EDIT_PROMPT
  keys = jax.random.split(key, len(instructions))
  requests = [Request(prompt(vocab, [P, c, i]), k, prompt(vocab, [P, MASKED, MASKED]), s_txt,
                      prompt(vocab, [P, c, MASKED]), s_img)
              for c, i, k in zip(codes_BxT, instructions, keys, strict=True)]
  return _images(sampler, requests, codes_BxT.shape[1], sampling)


def grounded(sampler: Sampler, captions: Sequence[str],
             objects: Sequence[Sequence[tuple[str, Sequence[int]]]], tokens_per_image: int,
             key: jax.Array, guidance: float = 1.0,
             sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
  """Codes [B, T]: an image of each caption with its objects in their boxes."""
  vocab = sampler.vocab
  keys = jax.random.split(key, len(captions))
  uncond = prompt(vocab, [MASKED]) if guidance != 1.0 else None
  requests = [Request(prompt(vocab, [sft.grounded_text(c, o)]), k, uncond, guidance)
              for c, o, k in zip(captions, objects, keys, strict=True)]
  return _images(sampler, requests, tokens_per_image, sampling)


def seg2image(sampler: Sampler, maps_BxT: np.ndarray, captions: Sequence[str], key: jax.Array,
              guidance: float = 1.0, sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
  """Codes [B, T]: an image of each caption laid out as its segmentation map."""
  vocab = sampler.vocab
  keys = jax.random.split(key, len(captions))
  head = sft.SEG2IMAGE_PROMPT
  uncond = prompt(vocab, [head, MASKED, MASKED]) if guidance != 1.0 else None
  requests = [Request(prompt(vocab, [head, m, c]), k, uncond, guidance)
              for m, c, k in zip(maps_BxT, captions, keys, strict=True)]
  return _images(sampler, requests, maps_BxT.shape[1], sampling)


def image2seg(sampler: Sampler, codes_BxT: np.ndarray, key: jax.Array,
              sampling: SamplingConfig = SamplingConfig(greedy=True)) -> np.ndarray:
  """Codes [B, T]: each image's segmentation map."""
  keys = jax.random.split(key, len(codes_BxT))
  requests = [Request(prompt(sampler.vocab, [sft.SEGMENTATION_PROMPT, c]), k)
              for c, k in zip(codes_BxT, keys)]
  return _images(sampler, requests, codes_BxT.shape[1], sampling)


def caption(sampler: Sampler, codes_BxT: np.ndarray, key: jax.Array, max_tokens: int = 32,
            sampling: SamplingConfig = SamplingConfig(greedy=True)) -> list[str]:
  """A caption of each image, by the captioning template."""
  prompts = [prompt(sampler.vocab, [c, sft.CAPTION_PROMPT]) for c in codes_BxT]
  return complete_texts(sampler, prompts, key, max_tokens, sampling)


def vqa(sampler: Sampler, codes_BxT: np.ndarray, questions: Sequence[str], key: jax.Array,
        max_tokens: int = 16, sampling: SamplingConfig = SamplingConfig(greedy=True)
        ) -> list[str]:
  """The answer to each question about its image ('' where the model wrote no answer)."""
  prompts = [prompt(sampler.vocab, [c, sft.question_text(q)])
             for c, q in zip(codes_BxT, questions, strict=True)]
  return [sft.answer_of(t) for t in complete_texts(sampler, prompts, key, max_tokens, sampling)]

