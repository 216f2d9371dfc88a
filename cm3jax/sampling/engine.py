"""On-device sampling (docs/design.md, "Decoding"): a prefill, then jitted `lax.scan`s with
static trip counts over a KV cache that is sharded like the model and donated. The steps run in
phases of `Sampler.phase_steps`, each a scan whose attention reads only the cache prefix filled
by the phase's end (a static length), not all of it: after a 16-token prompt, the 1,024 steps
of an image in phases of 256 read 63% of the slots that full-length reads would.

Requests are rows. Prompts of different lengths are left-padded into one prefill, so every row
writes the same cache slot at each step, and positions count real tokens only. Each step turns
the logits into a token: modality constraint, then classifier-free guidance or contrastive top-k
over the (conditional, unconditional) row pairs, then temperature, top-k and top-p, then a draw
with the request's own key (the same key gives the same sample) or the argmax.

  image mode  exactly N image codes, nothing else
  text mode   no image codes, sentinels or <break>; a row stops at </s> or <eoss> (then <pad>)
"""

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, sharding
from cm3jax.core import model as model_lib
from cm3jax.core.vocab import EOS, PAD, Vocab
from cm3jax.data import html

MODES = ("image", "text")
# How the sampler stores the weights it decodes with: in the model's compute dtype, or weight-only
# int8 (cm3jax/sampling/quantize.py).
QUANTIZE = ("none", "int8")


def check_quantize(quantize: str):
  if quantize not in QUANTIZE:
    raise ConfigError(f"quantize={quantize!r} is not one of {list(QUANTIZE)}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 1.0
  top_k: int = 0  # 0: off.
  top_p: float = 1.0  # 1: off.
  greedy: bool = False
  cd_k: int = 0  # Contrastive top-k over the guided rows: 0 off, else k (paper: CD-K).
  cd_alpha: float = 0.1  # CD-K keeps tokens with p_cond >= cd_alpha * (k-th largest p_cond).

  def __post_init__(self):
    if not self.temperature > 0:
      raise ConfigError(f"temperature must be > 0, got {self.temperature}")
    if self.top_k < 0:
      raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.cd_k < 0:
      raise ConfigError(f"cd_k must be >= 0 (0: off), got {self.cd_k}")
    if not 0 < self.cd_alpha <= 1:
      raise ConfigError(f"cd_alpha must be in (0, 1], got {self.cd_alpha}")


RERANKERS = ("model", "retriever")


@dataclasses.dataclass(frozen=True)
class Setting:
  """How images are drawn: guidance, the warpers and best-of-N reranking. The reports score
  settings and record a run's best (`defaults.sampling_defaults`); `cm3jax.sample` draws with it."""
  guidance: float = 1.0  # alpha_c, or s_txt of instruct guidance; 1: none
  sampling: dict = dataclasses.field(default_factory=dict)  # SamplingConfig fields
  candidates: int = 1  # > 1: the best of these by `rerank_by`
  rerank_by: str = "model"  # its likelihood of the caption given the image, or "retriever"
  uncond_retrieved: bool = True  # with retrieval: the unconditional stream keeps the documents
  image_guidance: float = 1.0  # s_img of instruct guidance (edit); 1: none

  def __post_init__(self):
    SamplingConfig(**self.sampling)  # a field it lacks is a TypeError, a bad value a ConfigError
    if not (self.guidance >= 0 and self.image_guidance >= 0):
      raise ConfigError(f"guidance scales must be >= 0 (1: none), got {self.guidance} and "
                        f"{self.image_guidance}")
    if not isinstance(self.candidates, int) or self.candidates < 1:
      raise ConfigError(f"candidates must be an integer >= 1, got {self.candidates!r}")
    if self.rerank_by not in RERANKERS or not isinstance(self.uncond_retrieved, bool):
      raise ConfigError(f"rerank_by={self.rerank_by!r} must be one of {list(RERANKERS)} and "
                        f"uncond_retrieved={self.uncond_retrieved!r} a bool")

  @property
  def config(self) -> SamplingConfig:
    return SamplingConfig(**self.sampling)


def guide(cond_BxV, uncond_BxV, alpha_B):
  """Classifier-free guidance: uncond + alpha * (cond - uncond)."""
  return uncond_BxV + alpha_B[:, None] * (cond_BxV - uncond_BxV)


def instruct_guide(full_BxV, image_BxV, uncond_BxV, s_img_B, s_txt_B):
  """Instruct guidance over three streams (InstructPix2Pix; CM3Leon §4):
  uncond + s_img * (image - uncond) + s_txt * (full - image)."""
  return (uncond_BxV + s_img_B[:, None] * (image_BxV - uncond_BxV)
          + s_txt_B[:, None] * (full_BxV - image_BxV))


def contrastive_top_k(cond_BxV, uncond_BxV, k: int, alpha: float):
  """CD-K: log p_cond - log p_uncond on {t : p_cond(t) >= alpha * (k-th largest p_cond)}."""
  logp_cond = jax.nn.log_softmax(cond_BxV, axis=-1)
  logp_uncond = jax.nn.log_softmax(uncond_BxV, axis=-1)
  kth_B1 = jax.lax.top_k(logp_cond, k)[0][:, -1:]
  keep = logp_cond >= kth_B1 + jnp.log(alpha)
  return jnp.where(keep, logp_cond - logp_uncond, -jnp.inf)


def warp(logits_BxV, cfg: SamplingConfig):
  """Temperature, then top-k, then top-p, as transformers' logits warpers do."""
  logits_BxV = logits_BxV / cfg.temperature
  if cfg.top_k:
    kth_B1 = jax.lax.top_k(logits_BxV, min(cfg.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
  if cfg.top_p < 1:
    logits_BxV = jnp.where(logits_BxV < top_p_cutoff(logits_BxV, cfg.top_p), -jnp.inf,
                           logits_BxV)
  return logits_BxV


TOP_P_BISECTIONS = 40


def top_p_cutoff(logits_BxV, top_p: float):
  """The least logit of the tokens top-p keeps, [B, 1]: token i stays when the tokens more likely
  than it hold less than top_p of the mass (transformers' rule). Found by bisecting on the logit,
  which costs passes over the scores but no sort of the vocabulary."""
  probs_BxV = jax.nn.softmax(logits_BxV, axis=-1)
  finite_BxV = jnp.isfinite(logits_BxV)
  hi_B1 = jnp.max(logits_BxV, -1, keepdims=True)  # nothing lies above: mass 0 < top_p
  lo_B1 = jnp.min(jnp.where(finite_BxV, logits_BxV, jnp.inf), -1, keepdims=True) - 1.0

  def bisect(_, bounds):
    lo_B1, hi_B1 = bounds
    mid_B1 = (lo_B1 + hi_B1) / 2
    above_B1 = jnp.sum(jnp.where(logits_BxV > mid_B1, probs_BxV, 0.0), -1, keepdims=True)
    keeps = above_B1 < top_p
    return jnp.where(keeps, lo_B1, mid_B1), jnp.where(keeps, mid_B1, hi_B1)

  _, hi_B1 = jax.lax.fori_loop(0, TOP_P_BISECTIONS, bisect, (lo_B1, hi_B1))
  return hi_B1


def allowed_tokens(vocab: Vocab, mode: str, size: int) -> np.ndarray:
  """bool [size]: the tokens a step of `mode` may produce."""
  ids = np.arange(size)
  if mode == "image":
    return vocab.is_image(ids)
  return vocab.is_text(ids) | (ids == EOS) | (ids == vocab.eoss_id)


def next_token_scores(logits_RxV, scales_Bx2, allowed_V, cfg: SamplingConfig, streams: int):
  """Rows R = streams * B -> scores [B, V] to sample from. One stream: the conditional rows; two:
  conditional, then unconditional rows, mixed by classifier-free guidance (scale
  scales_Bx2[:, 0]) or CD-K; three: full, image-only, then unconditional rows, mixed by instruct
  guidance (s_txt = scales_Bx2[:, 0], s_img = scales_Bx2[:, 1])."""
  minus_inf = jnp.asarray(-jnp.inf, logits_RxV.dtype)
  if streams == 1:
    scores = jnp.where(allowed_V, logits_RxV, minus_inf)
  elif streams == 3:
    full, image, uncond = jnp.split(logits_RxV, 3)
    scores = jnp.where(allowed_V, instruct_guide(full, image, uncond, scales_Bx2[:, 1],
                                                 scales_Bx2[:, 0]), minus_inf)
  else:
    cond, uncond = jnp.split(logits_RxV, 2)
    alpha_B = scales_Bx2[:, 0]
    if cfg.cd_k:
      scores = contrastive_top_k(jnp.where(allowed_V, cond, minus_inf),
                                 jnp.where(allowed_V, uncond, minus_inf), cfg.cd_k, cfg.cd_alpha)
    else:
      scores = jnp.where(allowed_V, guide(cond, uncond, alpha_B), minus_inf)
  return warp(scores, cfg)


@dataclasses.dataclass
class Request:
  prompt: np.ndarray  # int tokens
  key: jax.Array  # this request's PRNG key
  uncond_prompt: Optional[np.ndarray] = None  # the unconditional stream, for guidance
  guidance: float = 1.0  # alpha_c, or s_txt with image_prompt (1: the conditional stream alone)
  image_prompt: Optional[np.ndarray] = None  # with uncond_prompt: instruct guidance's third
  image_guidance: float = 1.0  # s_img of instruct guidance


class Sampler:
  """A token model's parameters, in its compute dtype (bf16 weights are read once per step, not
  cast from float32 every step) and placed on a mesh, with jitted generation. It decodes with
  the layers unrolled, so that each layer's cache is its own buffer, updated in place, in phases
  of `phase_steps` steps, each reading the cache up to its last step's slot (0: one phase).
  `quantize="int8"`: weight-only int8 (cm3jax/sampling/quantize.py); `set_params` quantizes, and
  generation and scoring use the int8 weights."""

  def __init__(self, model_cfg: model_lib.ModelConfig, params, vocab: Vocab, mesh=None,
               phase_steps: int = 256, quantize: str = "none"):
    vocab.check_fits(model_cfg.vocab_size)
    if not isinstance(phase_steps, int) or phase_steps < 0:
      raise ConfigError(f"phase_steps must be an integer >= 0 (0: one phase), got {phase_steps!r}")
    check_quantize(quantize)
    self.phase_steps = phase_steps
    self.quantize = quantize
    self.vocab = vocab
    self.mesh = mesh or default_mesh()
    self.batch_devices = sharding.batch_devices(self.mesh)
    self.trained_cfg = model_cfg
    self.shardings = sharding.shardings_of(abstract_params(model_cfg, self.mesh))
    self.cfg = dataclasses.replace(model_cfg, scan_layers=False, remat_policy="none")
    self.model = model_lib.Decoder(self.cfg)
    self._quantize_params = None
    if quantize == "int8":
      from cm3jax.sampling import quantize as quantize_lib  # imports qwix
      self.model, self._quantize_params = quantize_lib.int8_model(
          self.model, jnp.zeros((1, 1), jnp.int32))
    self.set_params(params)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self._init_cache = jax.jit(functools.partial(model_lib.init_cache, self.cfg))
    self._generate = jax.jit(self._generate_impl, static_argnames=("num_new", "mode", "sampling",
                                                                   "streams"),
                             donate_argnames=("cache",))
    self._log_likelihood = jax.jit(self._log_likelihood_impl)

  def set_params(self, params):
    """Samples from now on with `params` (trained ones, of this model's config): no recompile.
    With quantize="int8" they are quantized here (the scales placed as XLA's propagation of
    the weights' shardings leaves them)."""
    params = jax.device_put(nn.unbox(params), self.shardings)
    params = jax.tree.map(lambda p: p.astype(self.trained_cfg.compute_dtype), params)
    if self.trained_cfg.scan_layers:
      params = model_lib.unstack_layers(params, self.trained_cfg.num_layers)
    if self._quantize_params is not None:
      params = self._quantize_params(params)
    self.params = params

  @property
  def weight_bytes(self) -> int:
    """The bytes of the parameters as stored for decoding: in the compute dtype, or with
    quantize="int8" the int8 weights and their scales (and what stays in the compute dtype)."""
    return sum(x.nbytes for x in jax.tree.leaves(self.params))

  def generate(self, requests: Sequence[Request], num_new: int, mode: str,
               sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
    """Tokens [len(requests), num_new]; in text mode a row ends at its stop token, then <pad>."""
    if mode not in MODES:
      raise ConfigError(f"mode {mode!r} is not one of {MODES}")
    if not requests:
      return np.zeros((0, num_new), np.int32)
    streams = _streams(requests[0])  # rows of a request; all rows divide over the batch devices
    if any(_streams(r) != streams for r in requests):
      raise ConfigError("either every request has an unconditional prompt or none has, and "
                        "either every request has an image-only prompt or none has")
    if sampling.cd_k and streams != 2:
      raise ConfigError("contrastive top-k (cd_k) compares two streams: give unconditional "
                        "prompts (guidance) and no image-only prompts")
    if any(r.guidance < 0 or r.image_guidance < 0 for r in requests):
      raise ConfigError("guidance must be >= 0 (1: the conditional stream alone)")
    rows = len(requests)
    pad_rows = -rows % (self.batch_devices // math.gcd(streams, self.batch_devices))
    dummy = np.array([EOS], np.int32)
    by_stream = [[r.prompt for r in requests]]  # full, (image-only,) unconditional
    if streams == 3:
      by_stream.append([r.image_prompt for r in requests])
    if streams > 1:
      by_stream.append([r.uncond_prompt for r in requests])
    prompts = [p for stream in by_stream for p in stream]
    for p in prompts:
      self._check_prompt(np.asarray(p))
    longest = max(len(p) for p in prompts)
    if longest + num_new > self.cfg.max_seq_len:
      raise ConfigError(f"a prompt of {longest} tokens and {num_new} new tokens exceed the "
                        f"model's context of {self.cfg.max_seq_len}")
    if num_new == 0:  # no decoding phase to run
      return np.zeros((rows, 0), np.int32)
    # Left padding takes cache slots but no positions, so it may go past the context.
    tokens, valid = _left_pad([p for stream in by_stream for p in stream + [dummy] * pad_rows],
                              _bucket(longest))
    # One transfer, then one host array: jnp.stack of many keys compiles an N-operand
    # concatenation (44 s for 8,000 keys on the CPU).
    keys = np.stack(jax.device_get([r.key for r in requests]
                                   + [jax.random.PRNGKey(0)] * pad_rows))
    scales = np.array([(r.guidance, r.image_guidance) for r in requests] + [(1.0, 1.0)] * pad_rows,
                      np.float32)
    valid = np.concatenate([valid, np.ones((len(valid), num_new), bool)], 1)
    with sharding.use_mesh(self.mesh):
      cache = self._init_cache(jax.device_put(valid, self.batch_sharding))
      out, _ = self._generate(self.params, jax.device_put(tokens, self.batch_sharding), cache,
                              keys, scales, num_new=num_new, mode=mode, sampling=sampling,
                              streams=streams)
    return np.asarray(out)[:rows]

  def log_likelihood(self, prompts: Sequence[np.ndarray], continuations: Sequence[np.ndarray]
                     ) -> np.ndarray:
    """float32 [len(prompts)]: log p(continuation | prompt) under the model, summed over the
    continuation's tokens (one forward pass over each row; causal, so right padding is inert)."""
    if len(prompts) != len(continuations):
      raise ConfigError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    rows = [np.concatenate([p, c]).astype(np.int32) for p, c in zip(prompts, continuations)]
    for row, c in zip(rows, continuations):
      self._check_prompt(row)
      if len(c) == 0:
        raise ConfigError("a continuation to score is empty")
    longest = max(len(r) for r in rows)
    if longest > self.cfg.max_seq_len:
      raise ConfigError(f"a row of {longest} tokens exceeds the model's context of "
                        f"{self.cfg.max_seq_len}")
    width = min(_bucket(longest), self.cfg.max_seq_len)
    padded = len(rows) + -len(rows) % self.batch_devices
    tokens = np.full((padded, width), PAD, np.int32)
    scored = np.zeros((padded, width), bool)  # marks each continuation token's target slot
    for i, (row, c) in enumerate(zip(rows, continuations)):
      tokens[i, :len(row)] = row
      scored[i, len(row) - len(c) - 1:len(row) - 1] = True
    with sharding.use_mesh(self.mesh):
      out = self._log_likelihood(self.params, jax.device_put(tokens, self.batch_sharding),
                                 jax.device_put(scored, self.batch_sharding))
    return np.asarray(out)[:len(rows)]

  def _log_likelihood_impl(self, params, tokens_BxL, scored_BxL):
    logits_BxLxV = self.model.apply({"params": params}, tokens_BxL).astype(jnp.float32)
    targets_BxL = jnp.roll(tokens_BxL, -1, axis=1)
    logp_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV), targets_BxL[..., None],
                                   -1)[..., 0]
    return jnp.sum(jnp.where(scored_BxL, logp_BxL, 0.0), -1)

  def _check_prompt(self, prompt: np.ndarray):
    if prompt.ndim != 1 or len(prompt) == 0:
      raise ConfigError(f"a prompt is a non-empty 1-D array of tokens; got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer) or prompt.min() < 0 or (
        prompt.max() >= self.vocab.size):
      raise ConfigError(f"prompt tokens must be integers in [0, {self.vocab.size}); got "
                        f"{prompt.min()}..{prompt.max()}")

  def _generate_impl(self, params, tokens_RxP, cache, keys_Bx2, scales_Bx2, *, num_new, mode,
                     sampling, streams):
    R, P = tokens_RxP.shape
    B = keys_Bx2.shape[0]
    valid_RxP = cache.valid_BxT[:, :P]
    lengths_R = valid_RxP.sum(-1)
    positions_RxP = jnp.maximum(jnp.cumsum(valid_RxP, -1) - 1, 0)
    decode = lambda tok, pos, c, slots: self.model.apply({"params": params}, tok, pos, c, slots,
                                                         method="decode")
    logits_RxV, cache = decode(tokens_RxP, positions_RxP, cache, P)
    allowed_V = jnp.asarray(allowed_tokens(self.vocab, mode, self.cfg.vocab_size))
    stops = jnp.array([EOS, self.vocab.eoss_id])

    def step(read_slots, carry, i):
      logits_RxV, cache, done_B = carry
      scores_BxV = next_token_scores(logits_RxV, scales_Bx2, allowed_V, sampling, streams)
      if sampling.greedy:
        token_B = jnp.argmax(scores_BxV, -1)
      else:
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys_Bx2, i)
        token_B = jax.vmap(jax.random.categorical)(step_keys, scores_BxV)
      token_B = jnp.where(done_B, PAD, token_B).astype(jnp.int32)
      if mode == "text":
        done_B = done_B | jnp.isin(token_B, stops)
      token_R = jnp.tile(token_B, R // B)  # the same token goes to every stream
      position_R = lengths_R + i
      logits_RxV, cache = decode(token_R[:, None], position_R[:, None], cache, read_slots)
      return (logits_RxV, cache, done_B), token_B

    carry = (logits_RxV, cache, jnp.zeros((B,), bool))
    phase = self.phase_steps or num_new
    tokens = []  # [steps of the phase, B] each
    for start in range(0, num_new, phase):
      end = min(start + phase, num_new)
      # Step i writes slot P + i, so the phase's steps read the first P + end slots.
      carry, tokens_SxB = jax.lax.scan(functools.partial(step, P + end), carry,
                                       jnp.arange(start, end))
      tokens.append(tokens_SxB)
    # The cache is returned so that its donated buffers alias it.
    return jnp.concatenate(tokens).T, carry[1]


def _streams(r: Request) -> int:
  if r.image_prompt is not None and r.uncond_prompt is None:
    raise ConfigError("an image-only prompt (instruct guidance) needs an unconditional prompt")
  return 1 + (r.uncond_prompt is not None) + (r.image_prompt is not None)


def default_mesh():
  """This process's devices: on several hosts, each samples on its own (the pipeline's report
  stage runs on process 0 alone)."""
  return sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.local_devices())


def abstract_params(model_cfg: model_lib.ModelConfig, mesh):
  """ShapeDtypeStructs of the parameters, sharded on `mesh` by the logical-axis table."""
  return sharding.sharded_shapes(lambda: model_lib.Decoder(model_cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"], mesh)


def load(workdir: str, mesh=None, quantize: str = "none") -> tuple[Sampler, dict, int]:
  """A sampler of the latest checkpoint in a `cm3jax.train` workdir (its parameters only, as
  `quantize` says: "none" or "int8"), the run config saved with it, and its step."""
  check_quantize(quantize)  # before reading the checkpoint
  step = checkpoint.latest_step(workdir)
  config = checkpoint.saved_config(workdir, step)
  vocab = checkpoint.load_vocab(workdir, step)
  model_cfg = model_lib.ModelConfig.from_dict(config["model"])
  mesh = mesh or default_mesh()
  params = checkpoint.restore_params(workdir, step, abstract_params(model_cfg, mesh))
  return Sampler(model_cfg, params, vocab, mesh, quantize=quantize), config, step


def _bucket(length: int) -> int:
  """`length` rounded up to a multiple of 16: fewer prompt widths, fewer compilations."""
  return -(-length // 16) * 16


def _left_pad(prompts: Sequence[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(prompts), length), PAD, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    valid[row, length - len(prompt):] = True
  return tokens, valid


# Tasks.

def image_prompt(vocab: Vocab, caption: str) -> np.ndarray:
  """`</s> caption <break>`: what precedes an image in a training document."""
  return np.append(vocab.encode_document([caption]), vocab.break_id).astype(np.int32)


def unconditional_image_prompt(vocab: Vocab) -> np.ndarray:
  """`</s> <sentinel:0> <break>`: the caption masked out."""
  return np.array([EOS, vocab.sentinel(0), vocab.break_id], np.int32)


def caption_prompt(vocab: Vocab, codes) -> np.ndarray:
  """`</s> <sentinel:0> <break> image <sentinel:0>`: captioning is infilling."""
  s0 = vocab.sentinel(0)
  return np.concatenate([[EOS, s0, vocab.break_id], vocab.image_tokens(codes), [s0]]).astype(np.int32)


# cm3.document_form -> (the prompt of a caption, the unconditional prompt)
IMAGE_PROMPTS = {
    "break": (image_prompt, unconditional_image_prompt),
    "html": (html.alt_prompt, lambda vocab: html.alt_prompt(vocab, "")),
}


def text_to_image(sampler: Sampler, captions: Sequence[str], num_images: int, tokens_per_image: int,
                  key: jax.Array, guidance: float = 1.0, sampling: SamplingConfig = SamplingConfig(),
                  context: Optional[Sequence[np.ndarray]] = None,
                  context_in_uncond: bool = True, form: str = "break") -> np.ndarray:
  """Codes [len(captions), num_images, tokens_per_image], drawn by `draw_images` with the keys
  of `key` split in len(captions) * num_images, caption by caption."""
  if context is not None and len(context) != len(captions):
    raise ConfigError(f"{len(context)} contexts for {len(captions)} captions")
  rows = [c for c in captions for _ in range(num_images)]
  context = None if context is None else [x for x in context for _ in range(num_images)]
  codes = draw_images(sampler, rows, jax.random.split(key, len(rows)), tokens_per_image,
                      guidance, sampling, context, context_in_uncond, form)
  return codes.reshape(len(captions), num_images, tokens_per_image)


def draw_images(sampler: Sampler, captions: Sequence[str], keys: jax.Array, tokens_per_image: int,
                guidance: float = 1.0, sampling: SamplingConfig = SamplingConfig(),
                context: Optional[Sequence[np.ndarray]] = None,
                context_in_uncond: bool = True, form: str = "break") -> np.ndarray:
  """Codes [len(captions), tokens_per_image]: one image of each caption, drawn with its key of
  `keys` [len(captions), 2], so a row's image does not depend on the rows beside it. guidance
  != 1 (or CD-K) runs the unconditional stream beside each row. `context`: per caption, tokens
  placed before its prompt (retrieved documents, `augment.Memory.context`); the unconditional
  stream keeps them with `context_in_uncond`, else it is the caption-free prompt alone. `form`:
  the document form the model was trained on (cm3.document_form); "html" prompts
  `</s> <img alt="caption" src="`, its unconditional stream with an empty alt."""
  vocab = sampler.vocab
  if form not in IMAGE_PROMPTS:
    raise ConfigError(f"form={form!r} is not one of {list(IMAGE_PROMPTS)}")
  prompt, unconditional = IMAGE_PROMPTS[form]
  guided = guidance != 1.0 or sampling.cd_k > 0
  if context is not None and len(context) != len(captions):
    raise ConfigError(f"{len(context)} contexts for {len(captions)} captions")
  if len(keys) != len(captions):
    raise ConfigError(f"{len(keys)} keys for {len(captions)} captions")
  none = np.zeros(0, np.int32)
  before = lambda i: none if context is None else np.asarray(context[i], np.int32)

  def uncond(i):
    if not guided:
      return None
    return np.concatenate([before(i) if context_in_uncond else none,
                           unconditional(vocab)]).astype(np.int32)

  requests = [Request(np.concatenate([before(i), prompt(vocab, c)]).astype(np.int32), keys[i],
                      uncond(i), guidance)
              for i, c in enumerate(captions)]
  return vocab.image_codes(sampler.generate(requests, tokens_per_image, "image", sampling))


def infill_text(sampler: Sampler, pages: Sequence[str], key: jax.Array, max_tokens: int = 32,
                sampling: SamplingConfig = SamplingConfig(greedy=True)) -> list[str]:
  """Each text or HTML page with its `<mask>` replaced by the span the model writes (CM3's
  infilling)."""
  spans = complete_texts(sampler, [html.infill_prompt(sampler.vocab, p) for p in pages], key,
                         max_tokens, sampling)
  return [before + span + after
          for (before, after), span in zip(map(html.split_mask, pages), spans)]


def caption_log_likelihood(sampler: Sampler, codes: np.ndarray, captions: Sequence[str]
                           ) -> np.ndarray:
  """log p(caption <eoss> | image) for each row of codes [B, T], the caption read as captioning
  is sampled (`caption_prompt`)."""
  vocab = sampler.vocab
  prompts = [caption_prompt(vocab, c) for c in codes]
  continuations = [np.array(vocab.encode_text(t) + [vocab.eoss_id], np.int32) for t in captions]
  return sampler.log_likelihood(prompts, continuations)


def text_to_image_reranked(sampler: Sampler, captions: Sequence[str], candidates: int,
                           tokens_per_image: int, keys: jax.Array, guidance: float = 1.0,
                           sampling: SamplingConfig = SamplingConfig(),
                           context: Optional[Sequence[np.ndarray]] = None,
                           context_in_uncond: bool = True,
                           score: Optional[Callable[[np.ndarray, Sequence[str]], np.ndarray]] = None
                           ) -> np.ndarray:
  """Codes [len(captions), tokens_per_image]: of `candidates` images drawn per caption (by
  `draw_images`, with the keys of its key of `keys` [len(captions), 2] split in `candidates`; one
  candidate is drawn with the key itself), the one that `score(codes [N, T], their N captions)`
  rates highest; by default the model's own likelihood of the caption given the image
  (self-reranking: the model captions), else e.g. the retriever's (`augment.retriever_score`)."""
  if len(keys) != len(captions):
    raise ConfigError(f"{len(keys)} keys for {len(captions)} captions")
  if candidates == 1:
    return draw_images(sampler, captions, keys, tokens_per_image, guidance, sampling, context,
                       context_in_uncond)
  if context is not None and len(context) != len(captions):
    raise ConfigError(f"{len(context)} contexts for {len(captions)} captions")
  rows = [c for c in captions for _ in range(candidates)]
  row_keys = jax.vmap(lambda k: jax.random.split(k, candidates))(jnp.asarray(keys))
  drawn = draw_images(sampler, rows, row_keys.reshape(len(rows), -1), tokens_per_image,
                      guidance, sampling,
                      None if context is None else [x for x in context for _ in range(candidates)],
                      context_in_uncond)
  score = score or functools.partial(caption_log_likelihood, sampler)
  scores = np.asarray(score(drawn, rows)).reshape(len(captions), candidates)
  return drawn.reshape(len(captions), candidates, -1)[np.arange(len(captions)), scores.argmax(-1)]


def decode_text(vocab: Vocab, tokens: np.ndarray) -> str:
  """Generated text tokens up to the first stop token."""
  stop = np.flatnonzero(np.isin(tokens, [EOS, vocab.eoss_id, PAD]))
  return vocab.decode_text(tokens[:stop[0]] if len(stop) else tokens)


def caption_images(sampler: Sampler, codes: np.ndarray, key: jax.Array, max_tokens: int = 32,
                   sampling: SamplingConfig = SamplingConfig(greedy=True),
                   context: Optional[Sequence[np.ndarray]] = None) -> list[str]:
  """A caption of each image's codes; `context`: per image, tokens placed before its prompt
  (retrieved documents)."""
  if context is not None and len(context) != len(codes):
    raise ConfigError(f"{len(context)} contexts for {len(codes)} images")
  before = lambda i: np.zeros(0, np.int32) if context is None else np.asarray(context[i], np.int32)
  prompts = [np.concatenate([before(i), caption_prompt(sampler.vocab, c)])
             for i, c in enumerate(codes)]
  return complete_texts(sampler, prompts, key, max_tokens, sampling)


def continue_text(sampler: Sampler, texts: Sequence[str], key: jax.Array, max_tokens: int = 32,
                  sampling: SamplingConfig = SamplingConfig()) -> list[str]:
  return complete_texts(sampler, [sampler.vocab.encode_document([t]) for t in texts], key,
                        max_tokens, sampling)


def complete_texts(sampler: Sampler, prompts: Sequence[np.ndarray], key: jax.Array,
                   max_tokens: int, sampling: SamplingConfig) -> list[str]:
  """The text each prompt continues with, up to its stop token; one key per prompt."""
  keys = jax.random.split(key, len(prompts))
  tokens = sampler.generate([Request(p, k) for p, k in zip(prompts, keys)], max_tokens, "text",
                            sampling)
  return [decode_text(sampler.vocab, t) for t in tokens]


def infill_image(sampler: Sampler, caption: str, codes: np.ndarray, start: int, end: int,
                 key: jax.Array, sampling: SamplingConfig = SamplingConfig()) -> np.ndarray:
  """`codes` with codes [start, end) (raster order) regenerated given the caption and the rest."""
  codes = np.asarray(codes)
  if not 0 <= start < end <= len(codes):
    raise ConfigError(f"the region [{start}, {end}) is not inside the {len(codes)} codes")
  vocab = sampler.vocab
  s0 = vocab.sentinel(0)
  prompt = np.concatenate([image_prompt(vocab, caption), vocab.image_tokens(codes[:start]), [s0],
                           vocab.image_tokens(codes[end:]), [s0]]).astype(np.int32)
  tokens = sampler.generate([Request(prompt, key)], end - start, "image", sampling)[0]
  return np.concatenate([codes[:start], vocab.image_codes(tokens), codes[end:]])
