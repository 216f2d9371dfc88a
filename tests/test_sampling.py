"""The KV-cache sampler: cached logits, the guidance and warper formulas against references,
modality constraints, keys, batching of prompts, tasks and bad input."""

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cm3jax.config import ConfigError
from cm3jax.core import model as model_lib
from cm3jax.core.vocab import EOS, PAD, Vocab
from cm3jax.data import shapes
from cm3jax.eval import eval_shapes, reports
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import defaults, engine, sample
from tests.helpers import nontrivial, tiny_config

CODES = 64


@pytest.fixture(scope="module")
def vocab():
  captions = [shapes.scene("train", i).caption() for i in range(1000)]
  return Vocab(train_tokenizer.train(captions, 300), num_sentinels=16, num_image_codes=CODES)


def model_config(vocab, **overrides):
  fields = dict(vocab_size=vocab.size, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                max_seq_len=96, dtype="float32", remat_policy="none")
  return model_lib.ModelConfig(**{**fields, **overrides})


def random_params(cfg, seed=0):
  params = model_lib.Decoder(cfg).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
  return nontrivial(flax.linen.unbox(params["params"]), seed + 1)


@pytest.fixture(scope="module")
def sampler(vocab):
  cfg = model_config(vocab)
  return engine.Sampler(cfg, random_params(cfg), vocab)


def greedy_reference(sampler, prompt, num_new, mode, uncond=None, guidance=1.0) -> np.ndarray:
  """The tokens greedy decoding of `prompt` must give, computed without the sampler's cache or
  batching: each step, the model's full forward over each stream's prompt and the tokens so far,
  guided (uncond + guidance (cond - uncond)) and restricted to the mode's tokens; text ends at
  </s> or <eoss>, then <pad>."""
  length = sampler.cfg.max_seq_len
  forward = jax.jit(lambda row: sampler.model.apply({"params": sampler.params}, row)[0])
  allowed = engine.allowed_tokens(sampler.vocab, mode, sampler.cfg.vocab_size)
  tokens = []

  def next_logits(stream_prompt):
    row = np.concatenate([stream_prompt, tokens]).astype(np.int32)
    padded = np.full((1, length), PAD, np.int32)  # causal: what follows the row changes nothing
    padded[0, :len(row)] = row
    return np.asarray(forward(padded)[len(row) - 1], np.float32)

  while len(tokens) < num_new:
    logits = next_logits(prompt)
    if uncond is not None:
      unconditional = next_logits(uncond)
      logits = unconditional + guidance * (logits - unconditional)
    tokens.append(int(np.argmax(np.where(allowed, logits, -np.inf))))
    if mode == "text" and tokens[-1] in (EOS, sampler.vocab.eoss_id):
      break
  return np.array(tokens + [PAD] * (num_new - len(tokens)), np.int32)


@pytest.mark.parametrize("phase", [0, 3])
@pytest.mark.parametrize("scan_layers, remat", [(True, "nothing_saveable"), (False, "none")])
def test_cached_decoding_equals_the_full_forward(vocab, scan_layers, remat, phase):
  """With `phase` > 0, each decode reads the cache prefix the sampler's phases of that many
  steps read: the prefill the P slots it writes, a step the first P + (its phase's end) slots;
  at a phase's last step that is exactly the slots written, at its first some unwritten ones
  (masked) too. The last phase ends a step short of the cache's end."""
  cfg = model_config(vocab, scan_layers=scan_layers, remat_policy=remat)
  model = model_lib.Decoder(cfg)
  params = random_params(cfg)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, vocab.size, n) for n in (20, 22, 24)]
  prompt, steps = 6, 8  # prefill 6 real tokens per row (left-padded), then 8 decode steps
  P = 9
  tokens = np.full((3, P), PAD, np.int32)
  valid = np.zeros((3, P + steps), bool)
  for b, s in enumerate(seqs):
    n = min(prompt + b, P)  # prompts of different lengths
    tokens[b, P - n:] = s[:n]
    valid[b, P - n:] = True
  valid[:, P:] = True
  lengths = valid[:, :P].sum(1)
  positions = np.maximum(np.cumsum(valid[:, :P], 1) - 1, 0)
  cache = model_lib.init_cache(cfg, jnp.asarray(valid))
  assert isinstance(cache, model_lib.KVCache)
  decode = jax.jit(lambda *a: model.apply({"params": params}, *a, method="decode"),
                   static_argnums=3)

  def read_slots(written):  # the steps written so far, the current one included
    return P + min(-(-written // phase) * phase, steps - 1) if phase else None

  logits, cache = decode(jnp.asarray(tokens), jnp.asarray(positions), cache, read_slots(0))
  got = [logits]
  for i in range(steps - 1):
    step = np.array([s[lengths[b] + i] for b, s in enumerate(seqs)], np.int32)[:, None]
    logits, cache = decode(jnp.asarray(step), jnp.asarray(lengths[:, None] + i), cache,
                           read_slots(i + 1))
    assert isinstance(cache, model_lib.KVCache) and int(cache.index) == P + i + 1
    got.append(logits)
  forward = jax.jit(lambda x: model.apply({"params": params}, x))
  for b, s in enumerate(seqs):
    full = forward(jnp.asarray(s[None, :lengths[b] + steps - 1]))[0]
    want = full[lengths[b] - 1:lengths[b] - 1 + steps]
    np.testing.assert_allclose(np.stack([g[b] for g in got]), want, atol=1e-5, rtol=0)


def test_guidance_and_contrastive_top_k_match_numpy():
  rng = np.random.default_rng(1)
  cond, uncond = rng.normal(size=(2, 3, 50)).astype(np.float32) * 3
  alpha = np.array([1.0, 3.0, 0.5], np.float32)
  np.testing.assert_allclose(engine.guide(cond, uncond, alpha),
                             uncond + alpha[:, None] * (cond - uncond), rtol=1e-6)
  got = np.asarray(engine.contrastive_top_k(jnp.asarray(cond), jnp.asarray(uncond), 5, 0.1))
  for b in range(3):
    p_cond = np.exp(cond[b] - cond[b].max())
    p_cond /= p_cond.sum()
    p_uncond = np.exp(uncond[b] - uncond[b].max())
    p_uncond /= p_uncond.sum()
    keep = p_cond >= 0.1 * np.sort(p_cond)[-5]
    assert 5 <= keep.sum() < 50
    np.testing.assert_array_equal(np.isfinite(got[b]), keep)
    np.testing.assert_allclose(got[b][keep], np.log(p_cond[keep]) - np.log(p_uncond[keep]),
                               rtol=1e-5, atol=1e-5)


def last_token_sampler(vocab, logits_after: dict[int, np.ndarray]) -> engine.Sampler:
  """A sampler whose model's next-token logits depend on the last token alone: `logits_after[t]`
  after token t. The attention and MLP outputs are zero (zero_init_residual) and positions are
  0, so the final hidden state is LayerNorm(embed[t]); each given t gets its own orthogonal,
  zero-mean, unit-variance embedding and the head maps it to its logits."""
  cfg = model_config(vocab)
  params = flax.linen.unbox(model_lib.Decoder(cfg).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 4), jnp.int32))["params"])
  D = cfg.d_model
  embed, head = np.zeros((cfg.vocab_size, D), np.float32), np.zeros((D, cfg.vocab_size), np.float32)
  for i, (token, logits) in enumerate(logits_after.items()):
    u = np.zeros(D, np.float32)
    u[2 * i], u[2 * i + 1] = np.sqrt(D / 2), -np.sqrt(D / 2)
    embed[token] = u
    head += np.outer(u, logits) / D
  params = dict(params, embed=jnp.asarray(embed), lm_head=jnp.asarray(head),
                pos_embed=jnp.zeros_like(params["pos_embed"]))
  return engine.Sampler(cfg, params, vocab)


def image_logits(vocab, size, **codes) -> np.ndarray:
  """Logits over `size` ids: -30 everywhere but at the named image codes (c5=2.0: code 5)."""
  logits = np.full(size, -30.0, np.float32)
  for name, value in codes.items():
    logits[vocab.image_offset + int(name[1:])] = value
  return logits


COND_TOKEN, UNCOND_TOKEN = 10, 11  # the last tokens of the two streams' prompts


def test_guidance_moves_probability_toward_the_conditional_stream(vocab):
  """The first image code under guidance alpha, drawn 2,000 times per alpha: alpha = 1 samples
  the conditional stream and alpha = 0 the unconditional one (each checked against its own
  softmax, not against the guidance formula); alpha > 1 goes beyond the conditional stream in
  the direction it differs from the unconditional one, and alpha < 1 falls back toward it."""
  size = model_config(vocab).vocab_size
  cond = image_logits(vocab, size, c1=1.0, c2=0.0, c3=0.0)
  uncond = image_logits(vocab, size, c1=0.0, c2=1.0, c3=0.0)
  s = last_token_sampler(vocab, {COND_TOKEN: cond, UNCOND_TOKEN: uncond})
  alphas, n = (0.0, 0.5, 1.0, 3.0), 2000
  keys = jax.random.split(jax.random.PRNGKey(0), len(alphas) * n)
  requests = [engine.Request(np.array([EOS, COND_TOKEN]), keys[i * n + j],
                               np.array([EOS, UNCOND_TOKEN]), alpha)
              for i, alpha in enumerate(alphas) for j in range(n)]
  first = s.generate(requests, 1, "image")[:, 0].reshape(len(alphas), n)
  assert np.all(vocab.is_image(first))
  share = {a: float(np.mean(row == vocab.image_offset + 1)) for a, row in zip(alphas, first)}
  softmax = lambda l: np.exp(l - l.max()) / np.exp(l - l.max()).sum()
  tolerance = 0.045  # > 4 standard errors of a share of 2,000 draws
  assert abs(share[1.0] - softmax(cond)[vocab.image_offset + 1]) < tolerance, share
  assert abs(share[0.0] - softmax(uncond)[vocab.image_offset + 1]) < tolerance, share
  assert share[0.0] + 0.1 < share[0.5] < share[1.0] - 0.1 < share[3.0] - 0.3, share


IMAGE_TOKEN = 12  # the last token of instruct guidance's image-only prompt


def test_instruct_guidance_mixes_three_streams_as_the_formula_says(vocab):
  """Full, image-only and unconditional streams with their own logits over codes 1..3: for each
  (s_img, s_txt) the first code, drawn 2,000 times, follows the softmax of uncond + s_img (img -
  uncond) + s_txt (full - img) computed in numpy; (1, 1) is the full stream alone, (1, 0) the
  image-only one and (0, 0) the unconditional one."""
  size = model_config(vocab).vocab_size
  full = image_logits(vocab, size, c1=2.0, c2=0.0, c3=0.0)
  image = image_logits(vocab, size, c1=0.0, c2=2.0, c3=0.0)
  uncond = image_logits(vocab, size, c1=0.0, c2=0.0, c3=2.0)
  s = last_token_sampler(vocab, {COND_TOKEN: full, IMAGE_TOKEN: image, UNCOND_TOKEN: uncond})
  scales, n = [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1.5, 0.6), (0.5, 1.2)], 2000
  keys = jax.random.split(jax.random.PRNGKey(2), len(scales) * n)
  requests = [engine.Request(np.array([EOS, COND_TOKEN]), keys[i * n + j],
                               np.array([EOS, UNCOND_TOKEN]), s_txt,
                               np.array([EOS, IMAGE_TOKEN]), s_img)
              for i, (s_img, s_txt) in enumerate(scales) for j in range(n)]
  first = s.generate(requests, 1, "image")[:, 0].reshape(len(scales), n) - vocab.image_offset
  tolerance = 0.045  # > 4 standard errors of a share of 2,000 draws
  for (s_img, s_txt), row in zip(scales, first):
    mixed = uncond + s_img * (image - uncond) + s_txt * (full - image)
    p = np.exp(mixed - mixed.max())
    p /= p.sum()
    for code in (1, 2, 3):
      assert abs(np.mean(row == code) - p[vocab.image_offset + code]) < tolerance, (
          s_img, s_txt, code, np.mean(row == code), p[vocab.image_offset + code])
  rng = np.random.default_rng(3)
  f, i, u = rng.normal(size=(3, 4, 20)).astype(np.float32)
  s_img, s_txt = np.array([0.0, 1.0, 1.5, 2.0], np.float32), np.array([7.5, 1.0, 0.0, 3.0],
                                                                        np.float32)
  np.testing.assert_allclose(engine.instruct_guide(f, i, u, s_img, s_txt),
                             u + s_img[:, None] * (i - u) + s_txt[:, None] * (f - i), rtol=1e-5)


def test_contrastive_top_k_takes_its_candidates_from_the_conditional_stream(vocab):
  """Conditional: codes 1 and 2 plausible, 3 not; unconditional: only code 1. CD-K (k=1, alpha
  0.1) keeps {1, 2} and prefers 2, which the conditional stream favours most over the
  unconditional one. Code 3 has the largest ratio of all, but is not plausible."""
  size = model_config(vocab).vocab_size
  cond = image_logits(vocab, size, c1=5.0, c2=4.0, c3=-5.0)
  uncond = image_logits(vocab, size, c1=5.0, c2=0.0, c3=-20.0)
  s = last_token_sampler(vocab, {COND_TOKEN: cond, UNCOND_TOKEN: uncond})
  keys = jax.random.split(jax.random.PRNGKey(1), 500)
  requests = [engine.Request(np.array([EOS, COND_TOKEN]), k, np.array([EOS, UNCOND_TOKEN]))
              for k in keys]
  cd_k = dict(cd_k=1, cd_alpha=0.1)
  greedy = s.generate(requests[:1], 1, "image", engine.SamplingConfig(greedy=True, **cd_k))
  assert greedy[0, 0] == vocab.image_offset + 2
  drawn = s.generate(requests, 1, "image", engine.SamplingConfig(**cd_k))[:, 0]
  codes, counts = np.unique(drawn - vocab.image_offset, return_counts=True)
  assert set(codes) <= {1, 2} and counts[list(codes).index(2)] > 400, (codes, counts)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 0.9), (0.7, 10, 1.0), (1.3, 20, 0.5), (1.0, 3, 0.95), (0.5, 0, 0.3)])
def test_warpers_match_transformers(temperature, top_k, top_p):
  from transformers.generation import logits_process as lp
  scores = np.random.default_rng(2).permutation(np.linspace(-6, 6, 4 * 64)).reshape(4, 64)
  scores = scores.astype(np.float32)  # distinct values: no ties
  got = np.asarray(engine.warp(jnp.asarray(scores),
                                 engine.SamplingConfig(temperature, top_k, top_p)))
  warpers = [lp.TemperatureLogitsWarper(temperature)]
  if top_k:
    warpers.append(lp.TopKLogitsWarper(top_k))
  if top_p < 1:
    warpers.append(lp.TopPLogitsWarper(top_p))
  want = torch.from_numpy(scores)
  for w in warpers:
    want = w(None, want)
  want = want.numpy()
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-6)


def test_image_mode_yields_exactly_n_image_codes(sampler, vocab):
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  requests = [engine.Request(engine.image_prompt(vocab, "a red circle in the center"), k,
                               engine.unconditional_image_prompt(vocab), 3.0) for k in keys]
  for cfg in (engine.SamplingConfig(), engine.SamplingConfig(cd_k=4),
              engine.SamplingConfig(top_k=5, top_p=0.8, temperature=0.7)):
    tokens = sampler.generate(requests, 16, "image", cfg)
    assert tokens.shape == (5, 16) and np.all(vocab.is_image(tokens))


def test_text_mode_never_yields_image_codes_and_stops(sampler, vocab):
  keys = jax.random.split(jax.random.PRNGKey(1), 8)
  requests = [engine.Request(engine.caption_prompt(vocab, np.arange(16) % CODES), k)
              for k in keys]
  tokens = sampler.generate(requests, 40, "text", engine.SamplingConfig(temperature=2.0))
  stopped = 0
  for row in tokens:
    stops = np.flatnonzero(np.isin(row, [EOS, vocab.eoss_id]))
    end = stops[0] + 1 if len(stops) else len(row)
    stopped += len(stops) > 0
    assert np.all(vocab.is_text(row[:end]) | np.isin(row[:end], [EOS, vocab.eoss_id]))
    assert np.all(row[end:] == PAD)
  assert stopped  # at temperature 2 some rows hit a stop token within 40 steps


def test_same_key_same_sample_whatever_the_batch(sampler, vocab):
  prompt = engine.image_prompt(vocab, "a small blue square on the left")
  key = jax.random.PRNGKey(7)
  alone = sampler.generate([engine.Request(prompt, key)], 12, "image")
  others = [engine.Request(engine.image_prompt(vocab, "a large green diamond at the top"),
                             jax.random.PRNGKey(i)) for i in range(3)]
  batched = sampler.generate(others[:2] + [engine.Request(prompt, key)] + others[2:], 12, "image")
  np.testing.assert_array_equal(batched[2], alone[0])
  other_key = sampler.generate([engine.Request(prompt, jax.random.PRNGKey(8))], 12, "image")
  assert not np.array_equal(other_key, alone)


def test_prompts_of_different_lengths_batch_correctly(sampler, vocab):
  """Prompts of 5 to 40 tokens, batched (left-padded to 48) and one at a time (padded to 16,
  32 or 48): the same greedy tokens, in both modes."""
  greedy = engine.SamplingConfig(greedy=True)
  rng = np.random.default_rng(4)
  prompts = [np.concatenate([[EOS], rng.integers(4, vocab.text_size, n - 1)]).astype(np.int32)
             for n in (5, 40, 17, 29)]
  key = jax.random.PRNGKey(0)
  for mode in ("image", "text"):
    batched = sampler.generate([engine.Request(p, key) for p in prompts], 10, mode, greedy)
    alone = [sampler.generate([engine.Request(p, key)], 10, mode, greedy)[0] for p in prompts]
    np.testing.assert_array_equal(np.stack(alone), batched)
    assert len({tuple(row) for row in batched}) == len(prompts)  # the prompts matter


@pytest.mark.slow  # the fast tier's equivalence test reads each phase's prefix already
def test_decoding_phases_change_no_token(vocab):
  """Samplers decoding 13 steps in phases of 3 steps (the last one short), or in one phase
  reading the whole cache (0), draw the same tokens for the same requests and keys: images greedy and top-p,
  with guidance and prompts of different lengths, and text at temperature 2 and top-p, where rows
  stop early (one at step 2, the last of a 3-step phase, one at step 8)."""
  cfg = model_config(vocab)
  params = random_params(cfg)
  samplers = {k: engine.Sampler(cfg, params, vocab, phase_steps=k) for k in (0, 3)}
  keys = jax.random.split(jax.random.PRNGKey(2), 8)
  images = [engine.Request(engine.image_prompt(vocab, shapes.scene("train", i).caption()), k,
                           engine.unconditional_image_prompt(vocab), 3.0)
            for i, k in enumerate(keys)]
  texts = [engine.Request(engine.caption_prompt(vocab, np.arange(16) * (i + 1) % CODES), k)
           for i, k in enumerate(keys)]
  greedy, top_p = engine.SamplingConfig(greedy=True), engine.SamplingConfig(top_p=0.95)
  hot = engine.SamplingConfig(temperature=2.0, top_p=0.95)
  for requests, mode, sampling in ((images, "image", greedy), (images, "image", top_p),
                                   (texts, "text", hot)):
    want = samplers[0].generate(requests, 13, mode, sampling)
    np.testing.assert_array_equal(samplers[3].generate(requests, 13, mode, sampling), want,
                                  err_msg=f"{mode}, {sampling}")
  assert sorted((want == PAD).sum(1))[-2:] == [4, 10]


def test_decoding_phases_read_the_cache_up_to_their_end(vocab):
  """The traced generation of 10 steps after a prefill of P = 16 slots: in phases of 4 steps,
  attention reads the keys and values of P + 4, P + 8 and P + 10 slots; in one phase (0), all
  P + 10 at every step (lengths 1 and P, of the queries and the prefill, aside)."""
  cfg = model_config(vocab)
  params = random_params(cfg)
  P, N = 16, 10

  def key_lengths(phase_steps):
    """The lengths of the [R, length, H, K] operands of the traced program's dot products."""
    s = engine.Sampler(cfg, params, vocab, phase_steps=phase_steps)
    cache = model_lib.init_cache(s.cfg, jnp.ones((2, P + N), bool))
    generate = functools.partial(s._generate_impl, num_new=N, mode="image",
                                 sampling=engine.SamplingConfig(), streams=1)
    jaxpr = jax.make_jaxpr(generate)(s.params, jnp.zeros((2, P), jnp.int32), cache,
                                     jnp.zeros((2, 2), jnp.uint32), jnp.ones((2, 2)))
    return {x.aval.shape[1] for eqn in equations(jaxpr.jaxpr)
            if eqn.primitive.name == "dot_general" for x in eqn.invars
            if x.aval.shape[2:] == (cfg.num_heads, cfg.head_dim) and x.aval.ndim == 4}

  assert key_lengths(4) - {1, P} == {P + 4, P + 8, P + N}
  assert key_lengths(0) - {1, P} == {P + N}


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (scans, calls, branches)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          yield from equations(sub)


def test_tasks(sampler, vocab, monkeypatch):
  """Each task's greedy output is the reference's (greedy_reference) on the prompt the task's
  docstring names, written out here token by token."""
  key, greedy = jax.random.PRNGKey(3), engine.SamplingConfig(greedy=True)
  s0, brk = vocab.sentinel(0), vocab.break_id
  texts = ["a red circle in the center", "a blue square"]
  codes = engine.text_to_image(sampler, texts, 2, 16, key, guidance=2.0, sampling=greedy)
  assert codes.shape == (2, 2, 16)
  for text, drawn in zip(texts, codes):
    want = greedy_reference(sampler, [EOS, *vocab.encode_text(text), brk], 16, "image",
                            [EOS, s0, brk], 2.0)
    np.testing.assert_array_equal(drawn, [want - vocab.image_offset] * 2)
  unguided = engine.text_to_image(sampler, texts, 1, 16, key, sampling=greedy)
  assert not np.array_equal(unguided[:, 0], codes[:, 0])  # the unconditional stream counts
  captions = engine.caption_images(sampler, codes[:, 0], key)  # greedy by default
  for image, caption in zip(codes[:, 0], captions):
    want = greedy_reference(sampler, [EOS, s0, brk, *vocab.image_tokens(image), s0], 32, "text")
    assert caption == engine.decode_text(vocab, want) and want[0] != EOS
  continued = engine.continue_text(sampler, ["a red"], key, sampling=greedy)
  want = greedy_reference(sampler, [EOS, *vocab.encode_text("a red")], 32, "text")
  assert continued == [engine.decode_text(vocab, want)] and want[0] != EOS

  asked = []
  generate = sampler.generate
  monkeypatch.setattr(sampler, "generate", lambda requests, *a: asked.append(
      (requests, a)) or generate(requests, *a))
  original = np.arange(16) % CODES
  filled = engine.infill_image(sampler, "a red circle", original, 4, 9, key)
  (request,), (num_new, mode, _) = asked[0]
  s0, image = vocab.sentinel(0), original + vocab.image_offset
  # The prompt is the document with the region cut out, then the sentinel that asks for it.
  want = [EOS, *vocab.encode_text("a red circle"), vocab.break_id, *image[:4], s0, *image[9:], s0]
  np.testing.assert_array_equal(request.prompt, want)
  assert (num_new, mode) == (5, "image")
  assert filled.shape == (16,)
  np.testing.assert_array_equal(filled[:4], original[:4])
  np.testing.assert_array_equal(filled[9:], original[9:])


def test_guidance_keeps_the_retrieved_documents_in_the_unconditional_stream_by_default(
    sampler, vocab, monkeypatch, tmp_path):
  """uncond_retrieved: True unless asked otherwise, in cm3jax.sample (neither a recorded
  setting nor the flag) and in eval_shapes' guided rows but those named for the other
  definition. With it the unconditional stream repeats the documents before
  `</s> <sentinel:0> <break>`; without it, it is that prompt alone."""
  asked = []
  monkeypatch.setattr(sampler, "generate", lambda requests, num_new, *a: asked.extend(
      requests) or np.full((len(requests), num_new), vocab.image_offset, np.int32))
  use = defaults.text_to_image_use(1)
  settings = {"sample": chosen(tmp_path, use, cfg=1.5)[0],
              "sample --nouncond_retrieved": chosen(tmp_path, use, cfg=1.5,
                                                    uncond_retrieved=False)[0]}
  settings.update({name: s for name, s in {**eval_shapes.SETTINGS,
                                           **eval_shapes.RETRIEVAL_SETTINGS}.items()
                   if s.guidance != 1})
  assert len(settings) == 6
  context, caption_free = [np.array([EOS, 7, 8], np.int32)], [EOS, vocab.sentinel(0),
                                                              vocab.break_id]
  for name, setting in settings.items():
    asked.clear()
    engine.text_to_image_reranked(sampler, ["a red circle"], setting.candidates, 4,
                                    jax.random.PRNGKey(0)[None], setting.guidance, setting.config,
                                    context, setting.uncond_retrieved)
    dropped = "no documents" in name or "--nouncond_retrieved" in name
    want = caption_free if dropped else [EOS, 7, 8] + caption_free
    assert asked[0].uncond_prompt.tolist() == want, name


def test_log_likelihood_sums_the_continuation_tokens_of_the_full_forward(sampler, vocab):
  rng = np.random.default_rng(7)
  prompts = [rng.integers(4, vocab.text_size, n).astype(np.int32) for n in (3, 30, 11)]
  continuations = [rng.integers(4, vocab.size, n).astype(np.int32) for n in (1, 9, 20)]
  got = sampler.log_likelihood(prompts, continuations)
  for p, c, value in zip(prompts, continuations, got):
    row = np.concatenate([p, c])[None]
    logits = sampler.model.apply({"params": sampler.params}, jnp.asarray(row))[0]
    logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
    want = sum(logp[len(p) - 1 + j, token] for j, token in enumerate(c))
    np.testing.assert_allclose(value, want, rtol=1e-5)
  with pytest.raises(ConfigError, match="2 prompts but 1 continuations"):
    sampler.log_likelihood(prompts[:2], continuations[:1])
  with pytest.raises(ConfigError, match="a continuation to score is empty"):
    sampler.log_likelihood(prompts[:1], [np.zeros(0, np.int32)])
  with pytest.raises(ConfigError, match="a row of 100 tokens exceeds the model's context of 96"):
    sampler.log_likelihood([np.full(90, 5, np.int32)], [np.full(10, 5, np.int32)])


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(cd_k=-2), "cd_k must be >= 0"),
    (dict(cd_alpha=1.5), r"cd_alpha must be in \(0, 1\]"),
])
def test_bad_sampling_settings(fields, message):
  with pytest.raises(ConfigError, match=message):
    engine.SamplingConfig(**fields)


def test_bad_requests(sampler, vocab):
  key = jax.random.PRNGKey(0)
  long_prompt = np.full(90, 10, np.int32)
  with pytest.raises(ConfigError, match="a prompt of 90 tokens and 16 new tokens exceed the "
                     "model's context of 96"):
    sampler.generate([engine.Request(long_prompt, key)], 16, "image")
  # 81 tokens pad to 96 cache slots, but only 81 + 15 positions are used: that fits.
  assert sampler.generate([engine.Request(long_prompt[:81], key)], 15, "image").shape == (1, 15)
  for bad in (np.array([2, vocab.size]), np.array([2, -1])):
    with pytest.raises(ConfigError, match=r"prompt tokens must be integers in \[0, "):
      sampler.generate([engine.Request(bad, key)], 4, "image")
  with pytest.raises(ConfigError, match="mode 'audio' is not one of"):
    sampler.generate([engine.Request(np.array([2]), key)], 4, "audio")
  with pytest.raises(ConfigError, match="contrastive top-k .* give unconditional prompts"):
    sampler.generate([engine.Request(np.array([2]), key)], 4, "image",
                     engine.SamplingConfig(cd_k=4))
  with pytest.raises(ConfigError, match="guidance must be >= 0"):
    sampler.generate([engine.Request(np.array([2]), key, np.array([2]), -1.0)], 4, "image")
  with pytest.raises(ConfigError, match="guidance must be >= 0"):
    sampler.generate([engine.Request(np.array([2]), key, np.array([2]), 1.0, np.array([2]),
                                       -0.5)], 4, "image")
  with pytest.raises(ConfigError, match="an image-only prompt .* needs an unconditional prompt"):
    sampler.generate([engine.Request(np.array([2]), key, image_prompt=np.array([2]))], 4,
                     "image")
  three = engine.Request(np.array([2]), key, np.array([2]), 7.5, np.array([2]), 1.5)
  with pytest.raises(ConfigError, match="every request has an image-only prompt or none has"):
    sampler.generate([three, engine.Request(np.array([2]), key, np.array([2]))], 4, "image")
  with pytest.raises(ConfigError, match="contrastive top-k .* no image-only prompts"):
    sampler.generate([three], 4, "image", engine.SamplingConfig(cd_k=4))
  with pytest.raises(ConfigError, match=r"the region \[5, 20\) is not inside the 16 codes"):
    engine.infill_image(sampler, "a", np.zeros(16, int), 5, 20, key)
  with pytest.raises(ConfigError, match=r"phase_steps must be an integer >= 0 \(0: one phase\)"):
    engine.Sampler(sampler.cfg, sampler.params, vocab, phase_steps=-1)


def test_no_checkpoint(tmp_path):
  with pytest.raises(ConfigError, match="no checkpoints in"):
    engine.load(str(tmp_path))


# The run's best measured setting: recorded by the report, drawn with by cm3jax.sample.

def shapes_column(split, retrieved, **scores):
  """A column of an eval_shapes report: {"text_to_image, ROW": score} from ROW=score."""
  return {"split": split, "step": 2400, "examples": 500, "retrieved": retrieved,
          "VQGAN reconstructions": 0.99, "image_to_text, greedy": 0.7,
          **{f"text_to_image, {row}": score for row, score in scores.items()}}


GREEDY, TOP_P = "greedy, no guidance", "top-p 0.9, no guidance"
CFG_15, CFG_3 = "top-p 0.9, CFG 1.5", "top-p 0.9, CFG 3"
BEST_OF_8 = "top-p 0.9, best of 8 by the caption's likelihood"
BY_RETRIEVER = "top-p 0.9, best of 8 by the retriever's score"
DROPPED = "top-p 0.9, CFG 1.5, no documents in the unconditional stream"


def test_the_report_records_the_best_row_of_each_use(tmp_path):
  """The best mean over a use's columns; without retrieval no row that needs a retriever; an
  eval_shapes report replaces what eval_shapes recorded before and keeps the task report's."""
  results = {
      "validation": shapes_column("validation", 0, **{GREEDY: 0.58, TOP_P: 0.48, CFG_15: 0.53,
                                                      CFG_3: 0.09, BEST_OF_8: 0.74,
                                                      BY_RETRIEVER: 0.95}),
      "test": shapes_column("test", 0, **{GREEDY: 0.30, TOP_P: 0.01, CFG_15: 0.01, CFG_3: 0.0,
                                          BEST_OF_8: 0.02, BY_RETRIEVER: 0.05}),
      "validation, 3 retrieved": shapes_column("validation", 3, **{GREEDY: 0.80, BEST_OF_8: 0.79,
                                                                   BY_RETRIEVER: 0.92,
                                                                   DROPPED: 0.93})}
  task = defaults.Measured("edit, greedy", "eval_tasks.json", 1000, {"W, validation": 0.085},
                          engine.Setting(sampling=dict(greedy=True)))
  defaults.record_sampling_defaults(str(tmp_path), "eval_tasks.json", {"edit": task})
  older = defaults.Measured(f"text_to_image, {GREEDY}", "eval_shapes.json", 1200,
                           {"validation": 0.5}, eval_shapes.SETTINGS[GREEDY])
  defaults.record_sampling_defaults(str(tmp_path), "eval_shapes.json",
                                   {"text_to_image, 2 retrieved": older})  # replaced below
  defaults.record_sampling_defaults(str(tmp_path), "eval_shapes.json",
                                   eval_shapes.sampling_defaults(results))
  recorded = defaults.sampling_defaults(str(tmp_path))
  assert list(recorded) == ["edit", "text_to_image", "text_to_image, 3 retrieved"]
  assert recorded["edit"] == task
  plain = recorded["text_to_image"]
  assert plain == defaults.Measured(f"text_to_image, {GREEDY}", "eval_shapes.json", 2400,
                                   {"validation": 0.58, "test": 0.30}, eval_shapes.SETTINGS[GREEDY])
  retrieved = recorded["text_to_image, 3 retrieved"]
  assert retrieved.row == f"text_to_image, {DROPPED}"
  assert retrieved.scores == {"validation, 3 retrieved": 0.93}
  assert retrieved.setting == engine.Setting(1.5, dict(top_p=0.9), uncond_retrieved=False)
  # Without the test column the best of 8 has the best mean.
  del results["test"]
  assert eval_shapes.sampling_defaults(results)["text_to_image"].setting == engine.Setting(
      sampling=dict(top_p=0.9), candidates=8)


def chosen(workdir, use, memory=None, **given):
  """cm3jax.sample's setting of `use` when only `given` (and --memory) is on the command line."""
  return sample.chosen_setting(str(workdir), use, given, "retriever" if memory else "model")


def record_best_of_8(workdir):
  best = defaults.Measured(f"text_to_image, {BEST_OF_8}", "eval_shapes.json", 2400,
                          {"validation": 0.744, "test": 0.016},
                          engine.Setting(sampling=dict(top_p=0.9), candidates=8))
  edit = defaults.Measured("edit, greedy", "eval_tasks.json", 1000, {"W, validation": 0.085},
                          engine.Setting(sampling=dict(greedy=True)))
  defaults.record_sampling_defaults(str(workdir), "eval_shapes.json", {"text_to_image": best})
  defaults.record_sampling_defaults(str(workdir), "eval_tasks.json", {"edit": edit})


def test_sample_draws_with_the_recorded_setting_unless_a_flag_says_otherwise(tmp_path):
  record_best_of_8(tmp_path)
  setting, line = chosen(tmp_path, "text_to_image")
  assert setting.config == engine.SamplingConfig(top_p=0.9)
  assert (setting.guidance, setting.candidates, setting.rerank_by) == (1.0, 8, "model")
  row = f"text_to_image, {BEST_OF_8}"
  assert line == (f"sampling text_to_image with --top_p=0.9 --cfg=1 --rerank=8 --rerank_by=model "
                  f"(the best measured, row {row!r} of eval_shapes.json at step 2400: "
                  f"validation 74.4%, test 1.6%, recorded in {tmp_path}/sampling_defaults.json)")
  setting, line = chosen(tmp_path, "text_to_image", cfg=2.0, top_k=5, greedy=False, rerank=2)
  assert (setting.guidance, setting.candidates, setting.rerank_by) == (2.0, 2, "model")
  assert setting.config == engine.SamplingConfig(top_k=5, top_p=0.9)
  assert line.endswith("; --cfg --top_k --greedy --rerank as given)"), line
  setting, line = chosen(tmp_path, "edit", s_txt=7.5)
  assert (setting.image_guidance, setting.guidance, setting.config.greedy) == (1.0, 7.5, True)
  assert line.startswith("sampling edit with --greedy --s_img=1 --s_txt=7.5 (the best measured, "
                         "row 'edit, greedy' of eval_tasks.json"), line


def test_sample_without_a_recorded_setting_draws_greedily_without_guidance(tmp_path):
  """Not the worst measured setting: every report measures the paper's guidance scales worst."""
  for use in ("text_to_image", "text_to_image, 3 retrieved", "edit", "seg2image"):
    setting, line = chosen(tmp_path, use)
    assert setting.config.greedy and setting.guidance == setting.image_guidance == 1.0
    assert setting.candidates == 1
    assert line.endswith(f"({tmp_path}/sampling_defaults.json records no measured setting of "
                         f"{use}: greedy without guidance)"), line
  setting, _ = chosen(tmp_path, "text_to_image, 3 retrieved", rerank=4, memory="bank")
  assert (setting.candidates, setting.rerank_by) == (4, "retriever")
  assert not setting.config.greedy and setting.config.top_p == 0.9  # 4 draws, not 4 copies
  setting, _ = chosen(tmp_path, "text_to_image", top_k=5)
  assert not setting.config.greedy and setting.config.top_k == 5
  setting, _ = chosen(tmp_path, "text_to_image", rerank=4, greedy=True)
  assert setting.config.greedy  # as asked
  assert engine.Setting().guidance == 1.0  # and the library draws without guidance too


@pytest.mark.parametrize("text, why", [
    ("{not json", "Expecting property name"),
    ('{"version": 2, "defaults": {}}', "not version 1 of the format"),
    ('[1, 2]', "not version 1 of the format"),
    ('{"version": 1, "defaults": {"text_to_image": {"row": "r"}}}', "no field 'setting'"),
    ('{"version": 1, "defaults": {"edit": {"row": "r", "report": "a.json", "step": 1, '
     '"scores": {}, "setting": {"guidance": 1.0, "strength": 2}}}}', "strength"),
    ('{"version": 1, "defaults": {"edit": {"row": "r", "report": "a.json", "step": 1, '
     '"scores": {}, "setting": {"sampling": {"top_p": 2.0}}}}}', "top_p must be in (0, 1]"),
    ('{"version": 1, "defaults": {"edit": {"row": "r", "report": "a.json", "step": "late", '
     '"scores": {}, "setting": {}}}}', "step an integer"),
])
def test_a_damaged_sampling_defaults_file_refuses_in_one_line(tmp_path, text, why):
  (tmp_path / "sampling_defaults.json").write_text(text)
  with pytest.raises(ConfigError) as refused:
    chosen(tmp_path, "text_to_image")
  message = str(refused.value)
  assert message.startswith(f"{tmp_path}/sampling_defaults.json is not a sampling-defaults file")
  assert why in message and "\n" not in message, message
  # The report remakes it.
  record_best_of_8(tmp_path)
  assert list(defaults.sampling_defaults(str(tmp_path))) == ["text_to_image", "edit"]


def test_the_pipeline_report_is_complete_only_with_the_recorded_setting(tmp_path, monkeypatch):
  """The report stage leaves WORKDIR/sampling_defaults.json: without it of the newest step (or
  with a damaged one) the stage is made again."""
  from cm3jax.jobs import pipeline
  monkeypatch.setattr(pipeline.checkpoint, "newest_step", lambda workdir: 40)
  job = pipeline.Job(tiny_config(data="cm3"), str(tmp_path))
  for name in sample.SAMPLE_FILES:
    (tmp_path / name).write_text("made")
  results = {split: {**shapes_column(split, 0, **{GREEDY: 0.5, CFG_3: 0.1}), "step": 40}
             for split in ("validation", "test")}
  reports.write(str(tmp_path), eval_shapes.REPORT_FILES, results, ["table"])
  assert pipeline.report_status(job)[0] == pipeline.MISSING
  older = {"text_to_image": dataclasses.replace(
      eval_shapes.sampling_defaults(results)["text_to_image"], step=20)}
  defaults.record_sampling_defaults(str(tmp_path), "eval_shapes.json", older)
  assert pipeline.report_status(job)[0] == pipeline.MISSING
  defaults.record_sampling_defaults(str(tmp_path), "eval_shapes.json",
                                   eval_shapes.sampling_defaults(results))
  assert pipeline.report_status(job)[0] == pipeline.COMPLETE
  (tmp_path / defaults.SAMPLING_DEFAULTS_FILE).write_text("{")
  assert pipeline.report_status(job)[0] == pipeline.MISSING
