"""Training runs: logs, checkpoints and a falling loss, init_from, an exact resume and its
refusals; the train command in a subprocess: a run with overrides, and bad flags, meshes, workdirs
and checkpoints refused in one line."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.training import train, trainer
from tests.helpers import assert_one_line_error, run_module, tiny_config

pytestmark = pytest.mark.slow


def test_train_logs_checkpoints_and_falls(tmp_path):
  config = tiny_config(num_train_steps=40, eval_every=20, checkpoint_every=20,
                       keep_checkpoints=1, **{"optimizer.peak_lr": 1e-2,
                                              "optimizer.warmup_steps": 5, "log_every": 10})
  history = train.train(config, str(tmp_path))
  losses = [h["loss"] for h in history if "loss" in h]
  evals = [h["eval_loss"] for h in history if "eval_loss" in h]
  assert len(losses) == 4 and len(evals) == 2
  assert losses[-1] < losses[0] - 1.0
  assert evals[-1] < evals[0]
  for h in history:
    if "loss" in h:
      assert {"perplexity", "accuracy", "grad_norm", "learning_rate", "tokens_per_s",
              "tflops_per_device"} <= set(h)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["40"]
  saved = json.load(open(tmp_path / "checkpoints" / "40" / "config" / "metadata"))
  assert saved["model"]["num_layers"] == config.model.num_layers
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def saved_params(config, workdir, step):
  abstract = trainer.setup(config).abstract_state.params
  return jax.device_get(checkpoint.restore_params(str(workdir), step, abstract))


def test_init_from_starts_a_run_from_the_parameters_only(tmp_path):
  base = tiny_config(**{"optimizer.peak_lr": 1e-2})
  train.train(base, str(tmp_path / "base"))
  pretrained = saved_params(base, tmp_path / "base", 6)
  # A learning rate too small to move the parameters: the run starts where the base ended,
  # from step 0 with a fresh optimiser (base's schedule would be at its end).
  tuned = tiny_config(num_train_steps=2, init_from=str(tmp_path / "base"),
                      **{"optimizer.peak_lr": 1e-12, "optimizer.warmup_steps": 0})
  history = train.train(tuned, str(tmp_path / "tuned"))
  assert [h["step"] for h in history if "loss" in h] == [1, 2]
  assert history[0]["learning_rate"] == pytest.approx(1e-12)
  assert checkpoint.latest_step(str(tmp_path / "tuned")) == 2
  after = saved_params(tuned, tmp_path / "tuned", 2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), after, pretrained)
  tuned.init_from = ""
  train.train(tuned, str(tmp_path / "fresh"))
  fresh = saved_params(tuned, tmp_path / "fresh", 2)
  assert not np.allclose(fresh["embed"], pretrained["embed"], atol=1e-3)


def test_resume_continues_exactly(tmp_path):
  config = tiny_config(keep_checkpoints=5)
  uninterrupted = train.train(config, str(tmp_path / "a"))
  train.train(config, str(tmp_path / "b"))
  # A run that stopped after its step-3 checkpoint, resumed with another seed: the restored
  # RNG, not the new seed, decides the data.
  shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
  config.seed = 123
  resumed = train.train(config, str(tmp_path / "b"))
  train_losses = lambda h: [(x["step"], x["loss"]) for x in h if "loss" in x]
  assert train_losses(resumed) == train_losses(uninterrupted)[3:]
  assert [step for step, _ in train_losses(resumed)] == [4, 5, 6]


def test_resume_is_refused_on_another_number_of_hosts(tmp_path):
  config = tiny_config(num_train_steps=3)
  train.train(config, str(tmp_path))
  metadata = tmp_path / "checkpoints" / "3" / "data" / "metadata"
  saved = json.loads(metadata.read_text())
  assert saved == {"positions": [[3]]}
  metadata.write_text(json.dumps({"positions": [[3], [3]]}))  # as a 2-host run writes it
  config.num_train_steps = 6
  with pytest.raises(ConfigError, match="holds the data positions of 2 hosts; resume it on 2 "
                     "hosts, not 1"):
    train.train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]


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
