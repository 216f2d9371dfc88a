r"""Tiny CM3 model on the built-in shapes data: the whole job on a 2-core CPU.

  python -m cm3jax.train --config=configs/tiny.py --workdir=workdirs/tiny

Hardware: any; written for the 2-core CPU that CI runs on.
Stages (cm3jax/prepare.py; each reuses what an earlier run left in the workdir): build the shapes
dataset, train the VQGAN of configs/vqgan_shapes.py (8x8 = 64 codes of 1024 per image), encode
the train, validation and test images into codes, train a 320-piece sentencepiece tokenizer on
the captions, then train this model with the CM3 objective; half the documents get one span
that is their whole caption or image (cm3.whole_segment_rate), which teaches captioning and the
unconditional stream of guidance.
Expected: 1.18M parameters. Measured on a 2-core CPU from a fresh clone: 27 min 45 s in all
(VQGAN 7 min 31 s, 31.6 dB; codes 23 s; this model about 20 min at 10.6k tokens/s); validation
loss 1.323 at step 500, 1.012 at 1000, 0.758 at 2000 and 0.633 at 3000. eval_shapes on the
validation split: text->image 46.0% (greedy), 29.3% (top-p 0.9), captions 68.2%; on the held-out
test compositions: 0.4%, 0.4% and 0.0% (VQGAN reconstructions of the test images: 87.5%).
"""

from cm3jax.config import base_config


def get_config():
  c = base_config()
  c.data = "cm3"
  c.cm3.update(dataset="shapes", splits="train,validation,test", text_vocab_size=320,
               document_attention=True, whole_segment_rate=0.5)
  c.seq_len = 256
  c.global_batch_size = 16
  c.num_train_steps = 3000
  c.log_every = 100
  c.eval_every = 500
  c.eval_steps = 8
  c.checkpoint_every = 500
  c.model.update(vocab_size=1408, num_layers=4, d_model=128, num_heads=4, mlp_dim=512,
                 max_seq_len=256, dtype="float32", remat_policy="none")
  c.optimizer.update(peak_lr=3e-3, warmup_steps=100, weight_decay=0.0)
  return c
