r"""Tiny CM3 model on the built-in shapes data: the whole job on a 2-core CPU.

  python -m cm3jax.pipeline --config=configs/tiny.py --workdir=workdirs/tiny

Hardware: any; written for the 2-core CPU that CI runs on.
Stages (cm3jax/pipeline.py; each reuses or resumes what an earlier run left in the workdir):
build the shapes dataset and train the VQGAN of configs/vqgan_shapes.py on its tokenizer split
(4x4 = 16 codes of 1024 per image), encode the train, validation and test images, train a
320-piece sentencepiece tokenizer on the captions, train this model with the CM3 objective
(half the documents get one span that is their whole caption or image, cm3.whole_segment_rate,
which teaches captioning and the unconditional stream of guidance), then write samples and the
eval_shapes report of both splits (eval_shapes.md, printed at the end). TensorBoard shows
greedy samples and captions of 8 validation examples at each evaluation. Once the inputs exist,
the model alone trains with

  python -m cm3jax.train --config=configs/tiny.py --workdir=workdirs/tiny

Expected: 1.16M parameters; about 34 minutes in all on a 2-core AMD EPYC at 7.9k tokens/s;
validation loss 0.809 at step 2400; eval_shapes on validation: VQGAN ceiling 99.0%,
text->image 57.6% greedy and 74.4% best of 8, captions 72.6%; on the held-out test
compositions the ceiling is 99.2% and every task under 2% (benchmarks/RESULTS.md, "The main
job").
"""

from cm3jax.config import base_config


def get_config():
  c = base_config()
  c.data = "cm3"
  c.cm3.update(dataset="shapes", splits="train,validation,test", text_vocab_size=320,
               document_attention=True, whole_segment_rate=0.5)
  c.seq_len = 128
  c.global_batch_size = 32
  c.num_train_steps = 2400
  c.log_every = 100
  c.eval_every = 400
  c.eval_steps = 8
  c.eval_samples = 8
  c.checkpoint_every = 400
  c.report_examples = 500
  c.model.update(vocab_size=1408, num_layers=4, d_model=128, num_heads=4, mlp_dim=512,
                 max_seq_len=128, dtype="float32", remat_policy="none")
  c.optimizer.update(peak_lr=3e-3, warmup_steps=100, weight_decay=0.0)
  return c
