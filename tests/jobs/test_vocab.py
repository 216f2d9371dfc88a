"""The train_tokenizer command, in a subprocess."""

import pytest

from cm3jax.core.vocab import Vocab
from tests.helpers import run_module
from tests.test_vocab import CORPUS

pytestmark = pytest.mark.slow


def _cli(*args):
  return run_module("cm3jax.train_tokenizer", *args, timeout=300)


def test_cli_trains_on_text_files_and_counts_bad_lines(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_bytes(("\n".join(CORPUS) + "\n\n").encode() + b"caf\xe9 latin-1\n")
  out = tmp_path / "spm.model"
  result = _cli(f"--input={tmp_path}/*.txt", "--vocab_size=300", f"--out={out}")
  assert result.returncode == 0, result.stderr
  assert "wrote" in result.stdout and "300 pieces; skipped lines: 1 empty, 1 not UTF-8" in result.stdout
  assert Vocab.from_spm_file(str(out), 16, 1024).text_size == 300


@pytest.mark.parametrize("args, message", [
    (["--input=/nonexistent/*.txt", "--vocab_size=300", "--out=x.model"],
     "--input=/nonexistent/*.txt matches no file"),
    (["--input=tfds:shapes", "--vocab_size=300", "--out=x.model"],
     "tfds:shapes: expected tfds:NAME:FIELD, e.g. tfds:shapes:caption"),
    (["--input=x.txt"], "--input, --vocab_size and --out are required"),
])
def test_cli_bad_input(args, message):
  result = _cli(*args)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert result.stderr.strip() == f"cm3jax.train_tokenizer: error: {message}"
