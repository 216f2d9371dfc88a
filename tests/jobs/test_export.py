"""The export command, in a subprocess: export a run and import it back, and its refusals."""

import os

import pytest

from cm3jax.core import checkpoint
from tests.helpers import assert_one_line_error, run_module
from tests.test_export import make_workdir, vocab  # noqa: F401

pytestmark = pytest.mark.slow


def test_cli(vocab, vqgan_workdir, tmp_path):
  make_workdir(tmp_path / "run", vocab, vqgan_workdir, max_seq_len=256)
  cli = lambda *a: run_module("cm3jax.export", *a, timeout=300)
  result = cli(f"--workdir={tmp_path}/run", f"--out={tmp_path}/out")
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json",
                                                  "generation_config.json", "model.safetensors",
                                                  "tokenizer", "vqgan"]
  result = cli(f"--import_from={tmp_path}/out", f"--workdir={tmp_path}/back",
               "--config=configs/tiny.py", "--config.seq_len=64")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "imported" in result.stdout
  assert "python -m cm3jax.train --config=configs/tiny.py" in result.stdout
  assert "--config.seq_len=64" in result.stdout
  assert checkpoint.saved_config(str(tmp_path / "back"), 0)["seq_len"] == 64
  assert_one_line_error(cli(f"--workdir={tmp_path}/run"), "cm3jax.export", "--out is required")
  assert_one_line_error(cli(f"--workdir={tmp_path}/run", f"--out={tmp_path}/out2",
                            "--config=configs/tiny.py"), "cm3jax.export",
                        "--config is for --import_from")
