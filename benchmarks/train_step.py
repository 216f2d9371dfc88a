r"""Training-step throughput on synthetic batches, over a grid of settings; prints a markdown table.

  python benchmarks/train_step.py --config=configs/350m.py --batch=4 \
      --remat=none,nothing_saveable --attention=cudnn,xla

MFU is measured against this device's own bf16 matmul ceiling (an 8192^3 product timed first),
not the datasheet peak. Memory is what XLA compiled the step to hold (arguments + temporaries).
"""

import itertools
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, ".")
from cm3jax import data, model as model_lib, sharding, train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/350m.py", "Base config.")

_BATCH = flags.DEFINE_list("batch", ["4"], "Rows per step (each of seq_len tokens).")
_REMAT = flags.DEFINE_list("remat", ["none"], "model.remat_policy values.")
_ATTENTION = flags.DEFINE_list("attention", ["auto"], "model.attention values.")
_SCAN = flags.DEFINE_list("scan", ["true"], "model.scan_layers values.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per setting, after 2 warm-up steps.")


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
  s = train.setup(config)
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    host = next(data.batches(config, "train", 0, (0, 0), slice(None)))
    batch = {k: jax.device_put(v, s.batch_sharding) for k, v in host.items()}
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
  gib = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30
  return seconds, gib


def main(_):
  base = _CONFIG.value
  ceiling = matmul_tflops()
  device = jax.devices()[0]
  print(f"device: {len(jax.devices())} x {device.device_kind}; jax {jax.__version__}; "
        f"measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s per device")
  print("| batch | remat | attention | scan | step s | tokens/s | TFLOP/s/device | MFU | memory GiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for batch, remat, attention, scan in itertools.product(_BATCH.value, _REMAT.value,
                                                          _ATTENTION.value, _SCAN.value):
    config = base.copy_and_resolve_references()
    config.unlock()
    config.global_batch_size = int(batch)
    config.grad_accum_steps = 1
    config.model.update(remat_policy=remat, attention=attention, scan_layers=scan == "true")
    row = f"| {batch} | {remat} | {attention} | {scan} |"
    try:
      seconds, gib = run(config, _STEPS.value)
    except Exception as e:  # One failing setting (OOM, unsupported kernel) must not hide the rest.
      print(f"{row} failed: {str(e).splitlines()[0][:120]} |||||", flush=True)
      continue
    tokens = config.global_batch_size * config.seq_len
    cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
    tflops = model_lib.train_flops_per_token(cfg, config.seq_len) * tokens / seconds / 1e12
    tflops /= len(jax.devices())
    print(f"{row} {seconds:.3f} | {tokens / seconds:,.0f} | {tflops:.0f} | "
          f"{tflops / ceiling:.1%} | {gib:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
