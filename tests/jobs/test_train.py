"""The train command, in a subprocess: a run with overrides, init_from's refusals, and bad flags,
meshes, workdirs and checkpoints refused in one line."""

import json
import os

import pytest

from cm3jax.config import ConfigError
from cm3jax.training import train, trainer
from tests.helpers import assert_one_line_error, run_module, tiny_config

pytestmark = pytest.mark.slow


def test_init_from_refuses_another_model_or_vocabulary(tmp_path):
  train.train(tiny_config(num_train_steps=3), str(tmp_path / "base"))
  other = tiny_config(init_from=str(tmp_path / "base"), **{"model.num_layers": 3})
  with pytest.raises(ConfigError, match=r"init_from=.*base \(step 3\) is another model: "
                     r"model.num_layers=4 \(this config: 3\)"):
    train.train(other, str(tmp_path / "tuned"))
  assert not os.path.exists(tmp_path / "tuned" / "checkpoints" / "3")
  s = trainer.setup(tiny_config())
  with pytest.raises(ConfigError, match="has no vocabulary: it was trained on synthetic data"):
    train.pretrained_params(s, tiny_config(init_from=str(tmp_path / "base")), object())
  result = run_module("cm3jax.train", "--config=configs/tiny.py", "--config.data=synthetic",
                      f"--workdir={tmp_path / 'cli'}", f"--config.init_from={tmp_path / 'none'}")
  assert_one_line_error(result, "cm3jax.train",
                        f"init_from={tmp_path / 'none'} holds no checkpoint")


def _cli(*args):
  return run_module("cm3jax.train", "--config=configs/tiny.py", "--config.data=synthetic",
                    "--config.num_train_steps=2", "--config.log_every=1", "--config.seq_len=32",
                    "--config.global_batch_size=8", *args, timeout=300)


def test_cli_trains_with_overrides(tmp_path):
  result = _cli(f"--workdir={tmp_path}", "--config.model.num_layers=1",
                "--config.model.d_model=64")
  assert result.returncode == 0, result.stderr
  # 1 layer of d64 (MLP 512) over 1,408 tokens and 128 positions: 270,336 parameters.
  assert "0.27M parameters" in result.stdout
  assert "train step 2: loss" in result.stdout
  saved = json.load(open(tmp_path / "checkpoints" / "2" / "config" / "metadata"))
  assert saved["model"]["num_layers"] == 1 and saved["model"]["d_model"] == 64


def _assert_one_line_error(result, message):
  assert_one_line_error(result, "cm3jax.train", message)


def test_cli_bad_heads(tmp_path):
  _assert_one_line_error(_cli(f"--workdir={tmp_path}", "--config.model.num_heads=3"),
                         "model.num_heads=3 does not divide model.d_model=128")


def test_cli_bad_mesh(tmp_path):
  _assert_one_line_error(_cli(f"--workdir={tmp_path}", "--config.mesh.data=3"),
                         "mesh data=3, fsdp=-1, tensor=1: 8 devices do not divide by 3")


def test_cli_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  _assert_one_line_error(_cli(f"--workdir={blocker}/run"),
                         f"workdir {blocker}/run is not writable")


def test_cli_incompatible_checkpoint(tmp_path):
  assert _cli(f"--workdir={tmp_path}").returncode == 0
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  _assert_one_line_error(
      _cli(f"--workdir={tmp_path}", "--config.model.num_layers=3",
           "--config.num_train_steps=4"),
      "was written by another model: model.num_layers=4 (this config: 3)")
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


@pytest.mark.parametrize("args, message", [
    (["--config.model.depth=3"], "the config has no field 'depth'"),
    (["--config.model.num_layers=two"], "flag --config.model.num_layers=two: invalid literal"),
    (["--config=configs/missing.py"], "bad --config: [Errno 2] No such file or directory"),
])
def test_cli_bad_flags(tmp_path, args, message):
  _assert_one_line_error(_cli(f"--workdir={tmp_path}", *args), message)
