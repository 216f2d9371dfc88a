r"""Tiny CM3 token model: a smoke run that finishes on a 2-core CPU in about a minute.

  python -m cm3jax.train --config=configs/tiny.py --workdir=workdirs/tiny

Hardware: any; written for the 2-core CPU that CI runs on.
Expected: 0.67M parameters; 300 steps on the synthetic stream (random walks, 4 successors per
token: cm3jax/data/synthetic.py). The loss falls from ln(1024) = 6.93 towards its floor
ln(4) = 1.39; measured on a 2-core CPU: eval loss 1.68 at step 100 and 1.46 at step 300,
about 14k tokens/s, 51 s in all.
"""

from cm3jax.config import base_config


def get_config():
  c = base_config()
  c.seq_len = 128
  c.global_batch_size = 16
  c.num_train_steps = 300
  c.log_every = 25
  c.eval_every = 100
  c.eval_steps = 2
  c.checkpoint_every = 100
  c.model.update(vocab_size=1024, num_layers=2, d_model=128, num_heads=4, mlp_dim=512,
                 max_seq_len=128, dtype="float32", remat_policy="none")
  c.optimizer.update(peak_lr=3e-3, warmup_steps=20, weight_decay=0.0)
  return c
