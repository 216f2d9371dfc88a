r"""A small CLIP retriever on the built-in shapes data (CM3Leon's retriever, at the tiny scale).

  python -m cm3jax.train_retriever --config=configs/clip_shapes.py --workdir=workdirs/clip

Hardware: any; written for a 2-core CPU. Builds the shapes dataset under data_dir first (about
30 s), trains a 320-piece sentencepiece tokenizer on the train captions unless `tokenizer`
names one, then trains both towers with symmetric InfoNCE on the 20,000 train pairs: an image
tower of 8x8 patches (a 4x4 grid, like the VQGAN's codes) and a causal text tower.
Expected: 0.24M parameters; on a 2-core AMD EPYC about 3 minutes (1,150 pairs/s) and
validation recall@1 of 95.7% text->image and 96.4% image->text, recall@5 100%
(benchmarks/RESULTS.md, "Retrieval").
"""

import os

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = "shapes"  # or "shapes/small"
  c.data_dir = os.path.expanduser("~/tensorflow_datasets")
  c.tokenizer = ""  # a sentencepiece model; "" = WORKDIR/tokenizer.model, trained if missing
  c.text_vocab_size = 320
  c.clip = ml_collections.ConfigDict(dict(
      embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
      vision_mlp_dim=256, context_length=24, text_width=64, text_layers=2, text_heads=4,
      text_mlp_dim=256, activation="gelu", image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
      dtype="float32"))
  c.batch_size = 128
  c.num_train_steps = 1500
  c.learning_rate = 2e-3
  c.warmup_steps = 100  # then cosine decay to 1% of learning_rate
  c.weight_decay = 0.1
  c.log_every = 100
  c.eval_every = 500
  c.eval_examples = 1000
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.async_checkpointing = True
  # True: start a new run in a workdir whose checkpoints were all set aside as damaged
  # (WORKDIR/damaged_checkpoints); without it such a start is refused.
  c.new_run_over_damaged = False
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  return c
