r"""Training-step throughput on synthetic batches, over a grid of settings; prints a markdown table.

  python -m benchmarks.train_step --sizes=350m --batch=4 --remat=none,nothing_saveable \
      --attention=cudnn --scan=true,false --ce_chunk=0,1024 --results=RESULTS.md
  python -m benchmarks.train_step --sizes=tiny --batch=32 --switches=none,opt,fairseq

Sizes name configs/*.py (350m, 760m, 7b; tiny for a quick check on a CPU); 1.3b is the 350m
config at L24 d2048 (32 heads), the PyTorch peer's 1.3b shape. MFU is measured against this device's own
bf16 matmul ceiling (an 8192^3 product timed first), not the datasheet peak. Memory is what XLA
compiled the step to hold (arguments + temporaries). --results appends the table, with the
device, the date and this command, to a markdown file.
"""

import datetime
import itertools
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from cm3jax.config import load_config_file
from cm3jax.core import model as model_lib
from cm3jax.core import sharding
from cm3jax.data import synthetic
from cm3jax.training import trainer

_SIZES = flags.DEFINE_list("sizes", ["350m"], "Names of configs/*.py (350m, 760m, 7b, tiny) or 1.3b.")
_BATCH = flags.DEFINE_list("batch", ["4"], "Rows per step (each of seq_len tokens).")
_REMAT = flags.DEFINE_list("remat", ["none"], "model.remat_policy values.")
_ATTENTION = flags.DEFINE_list("attention", ["auto"], "model.attention values.")
_SCAN = flags.DEFINE_list("scan", ["true"], "model.scan_layers values.")
_CE_CHUNK = flags.DEFINE_list("ce_chunk", ["0"], "cross_entropy_chunk values (0: plain logits).")
# Named sets of model switches (docs/design.md, "Token model switches"); "none" is CM3Leon's.
SWITCH_SETS = {
    "none": {},
    "opt": dict(bias=True, layer_norm_affine=True, tie_embeddings=True),
    "fairseq": dict(bias=True, layer_norm_affine=True, positions="sinusoidal",
                    scale_embeddings=True, tie_embeddings=True),
}
_SWITCHES = flags.DEFINE_list("switches", ["none"], f"Model switch sets: {list(SWITCH_SETS)}.")
_ACTIVATION = flags.DEFINE_string("activation", "gelu", "model.activation (the peer uses gelu).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per setting, after 2 warm-up steps.")
_RESULTS = flags.DEFINE_string("results", None, "Append the table to this markdown file.")
_CEILING_SIZE = flags.DEFINE_integer("ceiling_size", 8192, "Side of the square bf16 product that "
                                     "measures the matmul ceiling (smaller on a CPU).")


def size_config(size: str):
  if size == "1.3b":
    c = load_config_file("configs/350m.py")
    c.model.update(d_model=2048, num_heads=32, mlp_dim=8192)
    return c
  c = load_config_file(f"configs/{size}.py")
  c.data = "synthetic"
  return c


def matmul_tflops(n=8192, reps=10):
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def run(config, steps):
  s = trainer.setup(config)
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    host = next(synthetic.batches(config, "train", 0, (0, 0), slice(None)))
    batch = trainer.device_batch(host, s.batch_sharding)
    step = s.train_step.lower(state, batch).compile()
    mem = step.memory_analysis()
    for _ in range(2):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t) / steps
  return seconds, (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30


def settings():
  """(the table row's first cells, config) for each combination of the grid flags."""
  for size, batch, remat, attention, scan, chunk, switches in itertools.product(
      _SIZES.value, _BATCH.value, _REMAT.value, _ATTENTION.value, _SCAN.value, _CE_CHUNK.value,
      _SWITCHES.value):
    config = size_config(size)
    config.global_batch_size = int(batch)
    config.grad_accum_steps = 1
    config.cross_entropy_chunk = int(chunk)
    config.model.update(remat_policy=remat, attention=attention, scan_layers=scan == "true",
                        activation=_ACTIVATION.value, **SWITCH_SETS[switches])
    yield f"| {size} | {batch} | {remat} | {attention} | {scan} | {chunk} | {switches} |", config


def main(_):
  ceiling = matmul_tflops(_CEILING_SIZE.value)
  device = jax.devices()[0]
  lines = [f"device: {len(jax.devices())} x {device.device_kind}; jax {jax.__version__}; "
           f"{datetime.date.today()}; measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s per "
           "device", "",
           "| size | batch | remat | attention | scan | ce_chunk | switches | step s | tokens/s | "
           "TFLOP/s/device | MFU | memory GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  for row, config in settings():
    try:
      seconds, gib = run(config, _STEPS.value)
    except Exception as e:  # One failing setting (OOM, unsupported kernel) must not hide the rest.
      row += f" failed: {str(e).splitlines()[0][:100]} ||||||"
    else:
      tokens = config.global_batch_size * config.seq_len
      cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
      tflops = model_lib.train_flops_per_token(cfg, config.seq_len) * tokens / seconds / 1e12
      tflops /= len(jax.devices())
      row += (f" {seconds:.3f} | {tokens / seconds:,.0f} | {tflops:.0f} | {tflops / ceiling:.1%} |"
              f" {gib:.1f} |")
    print(row, flush=True)
    lines.append(row)
  if _RESULTS.value:
    with open(_RESULTS.value, "a") as f:
      f.write(f"\n```\npython3 {' '.join(sys.argv)}\n```\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
