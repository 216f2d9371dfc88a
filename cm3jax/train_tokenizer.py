"""Train the sentencepiece text tokenizer of the multimodal vocabulary (docs/design.md,
"Vocabulary").

  python -m cm3jax.train_tokenizer --input=corpus/*.txt --vocab_size=56320 --out=tokenizer.model
  python -m cm3jax.train_tokenizer --input=tfds:shapes:caption --vocab_size=320 --out=spm.model
  python -m cm3jax.train_tokenizer --input=workdirs/codes --vocab_size=320 --out=spm.model

--input is a comma-separated list of text files (globs; one sentence per line), `tfds:NAME:FIELD`
(the train split's text field), or a directory of `cm3jax.tokenize_images` shards (their
captions). The model reserves <s>=0 <pad>=1 </s>=2 <unk>=3, keeps text exactly (no normalisation,
whitespace kept, unknown characters as UTF-8 bytes); --vocab_size counts them all, and is the
most pieces: a small corpus may support fewer.
Lines that are empty or not UTF-8 are skipped and counted.
"""

import collections
import os

from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.core.vocab import SPECIALS
from cm3jax.prepare import train_tokenizer


def _define_flags():
  flags.DEFINE_string("input", None, "Text files (globs, comma-separated), tfds:NAME:FIELD, or a "
                      "directory of tokenize_images shards.")
  flags.DEFINE_integer("vocab_size", None, "Most pieces, the 4 specials included (paper: 56,320).")
  flags.DEFINE_string("out", None, "Where to write the model, e.g. tokenizer.model.")
  flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "sentencepiece algorithm.")
  flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"),
                      "TFDS data_dir for tfds: inputs.")


def main(FLAGS):
  if not FLAGS.input or not FLAGS.out or FLAGS.vocab_size is None:
    raise ConfigError("--input, --vocab_size and --out are required")
  if FLAGS.vocab_size <= len(SPECIALS):
    raise ConfigError(f"--vocab_size={FLAGS.vocab_size} must be more than the {len(SPECIALS)} "
                      "special pieces")
  if files.isdir(FLAGS.out):
    raise ConfigError(f"--out={FLAGS.out} is a directory; name the model file to write")
  skipped = collections.Counter()
  model = train_tokenizer.train(train_tokenizer.read_sentences(FLAGS.input, skipped, FLAGS.data_dir), FLAGS.vocab_size,
                FLAGS.model_type)
  files.write_atomic(FLAGS.out, model)
  lines = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"
  print(f"wrote {FLAGS.out}: {train_tokenizer.num_pieces(model)} pieces; skipped lines: {lines}")


if __name__ == "__main__":
  cli.run("train_tokenizer", _define_flags, main)
