r"""CM3Leon 350M: L24, d1024, 16 heads of 64; peak LR 6e-4; 1.4T tokens (167k steps of 8.4M).

  python -m cm3jax.train --config=configs/350m.py --workdir=/mnt/shared/cm3leon_350m --multihost

Hardware: a TPU v5p-64 slice (32 chips; launch/tpu_pod.sh starts the command on every host), or
one 8-GPU node without --multihost and with --config.grad_accum_steps=64 (4 rows per GPU per
microbatch). FSDP over all devices, 4 microbatches of 512 rows per step.

Expected: 0.44B parameters (the paper's 350M leaves out the 65,536-row embedding and LM head).
Measured: 39.4 GiB per chip on v5p:4x4x2, from a CPU machine with libtpu installed:

  python -m cm3jax.train --config=configs/350m.py --compile_only --topology=v5p:4x4x2

On one H100, in this config's fastest setting (layers unrolled, no remat:
--config.model.scan_layers=False --config.model.remat_policy=none): 1.40x the tokens/s of the
PyTorch peer measured beside it, 54% of the measured bf16 ceiling (benchmarks/RESULTS.md, which
also holds the estimate for the changes made since).
"""

from cm3jax.config import paper_config


def get_config():
  c = paper_config(num_layers=24, d_model=1024, num_heads=16, peak_lr=6e-4, train_tokens=1.4e12)
  c.grad_accum_steps = 4
  return c
