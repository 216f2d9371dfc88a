r"""Wall time of text->image sampling with classifier-free guidance; prints a table.

  python -m benchmarks.sample --config=configs/350m.py --images=16 --tokens=1024

Random weights of the config's model (bf16, or --dtype), a vocabulary with 8,192 image codes,
16 requests for one caption with CFG 3 (32 rows: conditional and unconditional), 1,024 image
codes each with top-p 0.9. The HBM floor is the peer's (../shared/bench/peer_torch.py): per
step, the weights plus the KV cache at its average length, over the device-to-device copy bandwidth
measured here. `--phase_steps=0,256` gives one row per `Sampler.phase_steps` (0: every step
reads the whole cache), run one after the other in this process, each with the share of its codes
equal to the first row's: attention sums over more or fewer masked slots, so its rounding, and
after a close draw the rest of an image, may differ (bf16 more often than float32).
"""

import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from cm3jax.core import model as model_lib
from cm3jax.core.vocab import Vocab
from cm3jax.data import shapes
from cm3jax.prepare import train_tokenizer
from cm3jax.sampling import engine

_CONFIG = config_flags.DEFINE_config_file("config", "configs/350m.py", "Model config.")
_IMAGES = flags.DEFINE_integer("images", 16, "Images (requests), each with guidance.")
_TOKENS = flags.DEFINE_integer("tokens", 1024, "Image codes per image.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs after the compiling one.")
_PHASE_STEPS = flags.DEFINE_list("phase_steps", ["256"], "Sampler.phase_steps, one row each.")
_QUANTIZE = flags.DEFINE_list("quantize", ["none"], "Sampler.quantize values (none, int8); one "
                              "row for each with each phase_steps.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", list(model_lib.DTYPES), "Compute dtype.")
PROMPT = 16  # cache slots of the prompt: the caption's prompt, padded to a multiple of 16


def copy_bandwidth(gib=1, reps=10):
  """Device-to-device copy, bytes read plus written per second."""
  x = jnp.ones((gib * 2**30 // 2,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + 1)
  copy(x).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    y = copy(x)
  y.block_until_ready()
  return 2 * x.nbytes * reps / (time.perf_counter() - t)


def main(_):
  config = _CONFIG.value
  spm = train_tokenizer.train([shapes.scene("train", i).caption() for i in range(2000)], 320)
  vocab = Vocab(spm, 16, 8192)
  cfg = model_lib.ModelConfig.from_dict({
      **config.model.to_dict(), "dtype": _DTYPE.value,
      "vocab_size": max(config.model.vocab_size, vocab.size),
      "max_seq_len": max(config.model.max_seq_len, 16 + _TOKENS.value)})
  params = jax.jit(model_lib.Decoder(cfg).init)(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 1), jnp.int32))["params"]
  params = model_lib.nn.unbox(params)
  # Random weights everywhere (the zero-initialised head would make every logit 0).
  params = jax.tree.map(lambda p: 0.02 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape),
                        params)
  top_p = engine.SamplingConfig(top_p=0.9)
  key = jax.random.PRNGKey(0)
  timed, want = [], None  # (phase_steps, quantize, weight bytes, first s, wall s, codes) per row
  for quantize, phase_steps in itertools.product(_QUANTIZE.value, map(int, _PHASE_STEPS.value)):
    sampler = engine.Sampler(cfg, params, vocab, phase_steps=phase_steps, quantize=quantize)

    def run():
      codes = engine.text_to_image(sampler, ["a red circle above a blue square"], _IMAGES.value,
                                     _TOKENS.value, key, 3.0, top_p)
      assert codes.shape == (1, _IMAGES.value, _TOKENS.value)
      return codes

    t = time.perf_counter()
    codes = run()
    first = time.perf_counter() - t
    want = codes if want is None else want
    times = []
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      run()
      times.append(time.perf_counter() - t)
    timed.append((phase_steps, quantize, sampler.weight_bytes, first, min(times), codes))
  bandwidth = copy_bandwidth()
  rows = 2 * _IMAGES.value
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  kv_average = cfg.num_layers * 2 * cfg.d_model * itemsize * rows * (PROMPT + _TOKENS.value / 2)
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
  print("| model | images x codes | rows | phase_steps | weights | weight MB | "
        "cache slots read per step | first call s (compiles) | wall s | ms/step | HBM floor s | "
        "wall / floor | codes as row 1 |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for phase_steps, quantize, weight_bytes, first, wall, codes in timed:
    # The floor reads the weights as stored and the cache at its average length every step.
    floor = _TOKENS.value * (weight_bytes + kv_average) / bandwidth
    print(f"| L{cfg.num_layers} d{cfg.d_model} {cfg.dtype}, "
          f"{model_lib.num_params(params) / 1e6:.0f}M | {_IMAGES.value} x {_TOKENS.value} | "
          f"{rows} | {phase_steps} | {quantize} | {weight_bytes / 1e6:.1f} | "
          f"{slots_read(phase_steps, _TOKENS.value):.0f} | {first:.1f} | {wall:.3f} | "
          f"{1e3 * wall / _TOKENS.value:.2f} | {floor:.3f} | {wall / floor:.2f} | "
          f"{100 * np.mean(codes == want):.1f}% |")


def slots_read(phase_steps: int, tokens: int) -> float:
  """The cache slots a decode step reads, on average over the steps of one image."""
  phase = phase_steps or tokens
  return np.mean([PROMPT + min((i // phase + 1) * phase, tokens) for i in range(tokens)])


if __name__ == "__main__":
  app.run(main)
