r"""The tiny CM3 model with retrieval augmentation (CM3Leon §2.1) on the built-in shapes data.

  python -m cm3jax.pipeline --config=configs/tiny_ra.py --workdir=workdirs/tiny_ra

or, once the inputs exist, the model alone with
  python -m cm3jax.train --config=configs/tiny_ra.py --workdir=workdirs/tiny_ra

Hardware: any; written for the 2-core CPU. The stages of configs/tiny.py, and before the token
model three more: a CLIP retriever (configs/clip_shapes.py, on the pipeline's own sentencepiece
tokenizer), a memory bank of the train split's documents, and each train and validation
record's 4 neighbours (by its text with 20% query dropout and by its image, skipping itself and
near-duplicates above 0.9 relevance). Each training document follows 3 of them, `</s> text
<break> image` each, so seq_len is 256 to hold four documents and their masked spans; the model
trains for the same 2,400 steps as configs/tiny.py (twice the tokens per step).
Expected: 1.18M parameters; the token model about 55 minutes alone on the 2-core CPU (6,200
tokens/s), the pipeline's report about 17 minutes more. Against configs/tiny.py (eval_shapes, 500
examples): validation text->image greedy 80.0% (tiny 57.6%), best of 8 by the retriever 92.0%
with 3 retrieved documents (77.2%); the held-out test split stays near zero (1.6% greedy, 4.8%
best of 8, tiny 0.0% / 2.8%): benchmarks/RESULTS.md, "The tiny model with retrieval".
"""

from cm3jax.config import load_config_file


def get_config():
  c = load_config_file("configs/tiny.py")
  c.cm3.retrieval.documents = 3
  c.seq_len = 256
  c.model.max_seq_len = 256
  return c
