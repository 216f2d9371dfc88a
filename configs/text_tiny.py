r"""Tiny text-only CM3 on the built-in shapes_text corpus: the whole job on a 2-core CPU.

  python -m cm3jax.pipeline --config=configs/text_tiny.py --workdir=workdirs/text_tiny

Hardware: any; written for the 2-core CPU that CI runs on.
Stages (cm3jax/pipeline.py, TEXT_STAGES): write the train, validation and test documents of
shapes_text (cm3jax/data/text_corpus.py: sentences about the shapes scenes, each relation
followed by its converse) into text records, train a 320-piece sentencepiece tokenizer on them,
then train this model with the CM3 objective on `</s> text` documents (up to 8 masked spans
each, packed into 256-token rows, attention within documents). Once the records and tokenizer
exist, the model alone trains with

  python -m cm3jax.train --config=configs/text_tiny.py --workdir=workdirs/text_tiny

and samples with python -m cm3jax.sample --workdir=workdirs/text_tiny --task=continue
--prompt="a small red circle above a large blue square, so" (or --task=infill --page='... <mask>
...').
Expected: 0.92M parameters; about 14 minutes in all on a 2-core AMD EPYC (3-4.5k tokens/s while
other work shared the CPU); validation loss 0.925 at step 200 and 0.755 at step 600. The model
writes the sentences' form but rarely the exact converse yet: 4.3% of 256 validation and 0.8% of
256 test converse clauses greedy (benchmarks/RESULTS.md, "Text-only CM3").
"""

from cm3jax.config import base_config


def get_config():
  c = base_config()
  c.data = "text"
  c.cm3.update(dataset="shapes_text", splits="train,validation,test", text_vocab_size=320,
               max_spans=8, document_attention=True)
  c.seq_len = 256
  c.global_batch_size = 16
  c.num_train_steps = 600
  c.log_every = 50
  c.eval_every = 200
  c.eval_steps = 8
  c.checkpoint_every = 200
  c.model.update(vocab_size=384, num_layers=4, d_model=128, num_heads=4, mlp_dim=512,
                 max_seq_len=256, dtype="float32", remat_policy="none")
  c.optimizer.update(peak_lr=3e-3, warmup_steps=50, weight_decay=0.0)
  return c
