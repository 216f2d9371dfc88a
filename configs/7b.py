r"""CM3Leon 7B: L32, d4096, 32 heads of 128; peak LR 1.2e-4; 2.4T tokens (286k steps of 8.4M).

  python -m cm3jax.train --config=configs/7b.py --workdir=/mnt/shared/cm3leon_7b --multihost

Hardware: a TPU v5p-128 slice (64 chips of 95 GiB) or larger; launch/tpu_pod.sh starts the
command on every host. FSDP over all devices, 4 microbatches of 512 rows per step: 8 rows per
chip at a time, every layer rematerialised (nothing_saveable).

Expected: 7.00B parameters. Measured: 53.0 GiB per chip on v5p:4x4x4 (28.3 GiB with
--config.grad_accum_steps=8), from a CPU machine with libtpu installed:

  python -m cm3jax.train --config=configs/7b.py --compile_only --topology=v5p:4x4x4

Over several slices the data axis spans them (mesh.slices): 7.3 GiB per chip on 2 x v5e:16x16
(512 chips, fsdp=256 within each slice), compiled on the same CPU in 61 s:

  python -m cm3jax.train --config=configs/7b.py --compile_only --topology=v5e:16x16 --num_slices=2
"""

from cm3jax.config import paper_config


def get_config():
  c = paper_config(num_layers=32, d_model=4096, num_heads=32, peak_lr=1.2e-4, train_tokens=2.4e12)
  c.grad_accum_steps = 4
  return c
