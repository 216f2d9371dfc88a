r"""CM3Leon 7B: L32, d4096, 32 heads of 128; peak LR 1.2e-4; 2.4T tokens (286k steps of 8.4M).

  python -m cm3jax.train --config=configs/7b.py --workdir=gs://BUCKET/cm3leon_7b --multihost

Hardware: a TPU v5p-128 slice (64 chips) or larger; run the command on every host
(launch/tpu_pod.sh does). FSDP over all devices, 4 microbatches of 512 rows per step.
Check that it fits before renting the pod, on any CPU machine with libtpu installed:

  python -m cm3jax.train --config=configs/7b.py --compile_only --topology=v5p:4x4x4

Expected: 6.98B parameters.
"""

from cm3jax.config import paper_config


def get_config():
  c = paper_config(num_layers=32, d_model=4096, num_heads=32, peak_lr=1.2e-4, train_tokens=2.4e12)
  c.grad_accum_steps = 4
  return c
