r"""VQGAN image tokenizer for the built-in shapes dataset: 32x32 images -> 4x4 = 16 codes of 1024.

  python -m cm3jax.train_vqgan --config=configs/vqgan_shapes.py --workdir=workdirs/vqgan

Hardware: any; written for a 2-core CPU. Builds the shapes dataset under data_dir first (about
30 s) and trains on its tokenizer split (every colour-shape pair, held-out ones included; no
captions). f8: things sit at slots 8 pixels apart, so a code holds at most a quarter of one.
Expected on a 2-core CPU: about 9 minutes, validation PSNR about 36.6 dB with about 86% of the
1024 codes in use; eval_shapes reads 98.9% of the validation and 99.3% of the test images'
reconstructions right (benchmarks/RESULTS.md, "The image tokenizer", has the ablation).
"""

import os

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = "shapes"  # or "shapes/small"
  c.train_split = "tokenizer"  # images of every colour-shape pair, captions unused
  c.data_dir = os.path.expanduser("~/tensorflow_datasets")
  c.vqgan = ml_collections.ConfigDict(dict(
      resolution=32, in_channels=3, ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1,
      attn_resolutions=(), z_channels=32, embed_dim=16, n_embed=1024, norm_groups=8, beta=0.25,
      l2_normalized_codes=True))
  c.batch_size = 16
  c.num_train_steps = 4000
  c.learning_rate = 2e-3
  c.warmup_steps = 100  # then cosine decay to end_lr_ratio * learning_rate
  c.end_lr_ratio = 0.1
  c.b1, c.b2 = 0.9, 0.99
  c.recon_loss = "l2"  # l1 blurs the palette: red, yellow and orange shapes come out orange
  c.perceptual = "none"  # or "random_conv"
  c.perceptual_weight = 0.1
  c.disc_start = -1  # Step at which the GAN loss starts; -1: never.
  c.disc_weight = 0.1
  c.disc_learning_rate = 1e-4
  c.disc_ch = 32
  c.disc_layers = 2
  c.usage_decay = 0.99
  c.restart_every = 100  # Restart dead codes every this many steps; 0: never.
  c.restart_until = 3500  # No restarts from this step on.
  c.dead_code_threshold = 0.03  # Dead: chosen less than this fraction of a uniform share.
  c.log_every = 100
  c.eval_every = 500
  c.eval_images = 256
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.async_checkpointing = True
  # True: start a new run in a workdir whose checkpoints were all set aside as damaged
  # (WORKDIR/damaged_checkpoints); without it such a start is refused.
  c.new_run_over_damaged = False
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c
