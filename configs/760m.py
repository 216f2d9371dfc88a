r"""CM3Leon 760M: L24, d1536, 24 heads of 64; peak LR 5e-4; 1.9T tokens (226k steps of 8.4M).

  python -m cm3jax.train --config=configs/760m.py --workdir=/mnt/shared/cm3leon_760m --multihost

Hardware: a TPU v5e-64 slice (64 chips of 16 GiB; launch/tpu_pod.sh starts the command on every
host). FSDP over all devices, 16 microbatches of 128 rows per step: 2 rows per chip at a time.

Expected: 0.89B parameters. Measured: 7.9 GiB per chip on v5e:8x8 (15.2 GiB with
--config.grad_accum_steps=8; with 4 it needs 27.5 GiB and does not fit), from a CPU machine
with libtpu installed:

  python -m cm3jax.train --config=configs/760m.py --compile_only --topology=v5e:8x8
"""

from cm3jax.config import paper_config


def get_config():
  c = paper_config(num_layers=24, d_model=1536, num_heads=24, peak_lr=5e-4, train_tokens=1.9e12)
  c.grad_accum_steps = 16
  return c
