r"""CM3Leon 350M: L24, d1024, 16 heads of 64; peak LR 6e-4; 1.4T tokens (167k steps of 8.4M).

  python -m cm3jax.train --config=configs/350m.py --workdir=gs://BUCKET/cm3leon_350m --multihost

Hardware: a TPU v5p-64 slice (32 chips), or one 8-GPU node with
--config.grad_accum_steps=64. FSDP over all devices, 4 microbatches of 512 rows per step.
Check the fit ahead of time on any CPU machine with libtpu installed:

  python -m cm3jax.train --config=configs/350m.py --compile_only --topology=v5p:4x4x2

Expected: 0.44B parameters (the paper's 350M does not count the 65,536-entry embedding
and output tables).
"""

from cm3jax.config import paper_config


def get_config():
  c = paper_config(num_layers=24, d_model=1024, num_heads=16, peak_lr=6e-4, train_tokens=1.4e12)
  c.grad_accum_steps = 4
  return c
