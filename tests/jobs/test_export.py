"""The export command, in a subprocess: export a run and import it back, and its refusals; and
real OPTs, imported, train on."""

import os

import pytest

from cm3jax.core import checkpoint
from cm3jax.training import train
from tests.helpers import assert_one_line_error, run_module, tiny_config
from tests.test_export import OPT_VARIANTS, import_random_opt, make_workdir, vocab  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", OPT_VARIANTS)
def test_a_real_opt_import_trains_on(variant, vocab, vqgan_workdir, tmp_path):
  _, cfg, _ = import_random_opt(tmp_path, vocab, vqgan_workdir, variant)
  config = tiny_config(num_train_steps=2, **{f"model.{k}": v for k, v in cfg.to_dict().items()})
  history = train.train(config, str(tmp_path / "run"))
  assert [h["step"] for h in history if "loss" in h] == [1, 2]


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
