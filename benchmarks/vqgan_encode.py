r"""VQGAN encode and decode throughput (images/s) with random weights; prints a markdown table.

  python -m benchmarks.vqgan_encode --batch=64 --configs=shapes,chameleon

`shapes` is configs/vqgan_shapes.py's tokenizer (32x32 -> 16 codes of 1024); `chameleon` the
Chameleon-shaped one (512x512 -> 1024 codes of 8192).
"""

import importlib
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from cm3jax.vqgan.model import VQGAN, VQGANConfig

_BATCH = flags.DEFINE_integer("batch", 64, "Images per call.")
_CONFIGS = flags.DEFINE_list("configs", ["shapes", "chameleon"], "Tokenizers to time.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per measurement, after one warm-up call.")

def tokenizer_config(name: str) -> VQGANConfig:
  if name == "shapes":
    return VQGANConfig.from_dict(
        importlib.import_module("configs.vqgan_shapes").get_config().vqgan.to_dict())
  if name == "chameleon":
    return VQGANConfig(resolution=512, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                       z_channels=256, embed_dim=256, n_embed=8192)
  raise ValueError(f"unknown tokenizer {name!r}: shapes or chameleon")


def images_per_s(fn, *args):
  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(_REPS.value):
    out = fn(*args)
  jax.block_until_ready(out)
  return _REPS.value * len(args[1]) / (time.perf_counter() - t)


def main(_):
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; batch {_BATCH.value}")
  print("| tokenizer | image | codes | encode images/s | decode images/s |")
  print("|---|---|---|---|---|")
  for name in _CONFIGS.value:
    cfg = tokenizer_config(name)
    model = VQGAN(cfg)
    images = jnp.zeros((_BATCH.value, cfg.resolution, cfg.resolution, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])["params"]
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQGAN.decode))
    codes = encode(params, images)
    print(f"| {name} | {cfg.resolution}² | {cfg.tokens_per_image} of {cfg.n_embed} | "
          f"{images_per_s(encode, params, images):,.1f} | {images_per_s(decode, params, codes):,.1f} |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
