"""Faults without a training run: processes racing for one stale lock, settings no run should
accept, a failed import or a killed export, a diverging command's one line (the faults injected
into training runs: tests/jobs/test_faults.py)."""

import contextlib
import json
import os
import re
import subprocess
import threading

import jax
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.core import model as model_lib
from cm3jax.io import torch_layout
from cm3jax.training import faults, train_vqgan, trainer
from tests.helpers import tiny_config, vqgan_config


def test_of_many_processes_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
  lock = str(tmp_path / faults.LOCK_NAME)
  dead = subprocess.Popen(["true"])
  dead.wait()
  stale = json.dumps(faults.this_process("cm3jax.train") | {"pid": dead.pid})
  contenders = [subprocess.Popen(["sleep", "60"]) for _ in range(8)]  # live pids to claim
  try:
    for _ in range(40):
      with open(lock, "w") as f:
        f.write(stale)
      start = threading.Barrier(len(contenders))
      won = []

      def take(pid):
        start.wait()
        with contextlib.suppress(ConfigError):  # "in use by" the winner
          won.append(faults.take_lock(lock, faults.this_process("cm3jax.train") | {"pid": pid}))
      threads = [threading.Thread(target=take, args=(c.pid,)) for c in contenders]
      for t in threads:
        t.start()
      for t in threads:
        t.join()
      assert won == [True]
      os.remove(lock)
  finally:
    for c in contenders:
      c.kill()
      c.wait()


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.peak_lr": -1.0}, "optimizer.peak_lr=-1.0 must be a number in (0, inf]"),
    ({"seq_len": 0}, "seq_len=0 must be an integer >= 1"),
    ({"optimizer.warmup_steps": -10}, "optimizer.warmup_steps=-10 must be an integer >= 0"),
    ({"eval_every": -1}, "eval_every=-1 must be an integer >= 0"),
    ({"global_batch_size": -16}, "global_batch_size=-16 must be an integer >= 1"),
    ({"keep_checkpoints": -1}, "keep_checkpoints=-1 must be an integer >= 1"),
    ({"num_train_steps": 10**12}, "num_train_steps=1000000000000 must be an integer in [1, "),
    ({"cm3.whole_segment_rate": 1.5}, "cm3.whole_segment_rate=1.5 must be a number in [0, 1]"),
    ({"optimizer.b2": 1.0}, "optimizer.b2=1.0 must be a number in [0, 1)"),
])
def test_nonsense_settings_are_refused_in_one_line(overrides, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    trainer.setup(tiny_config(**overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"num_train_steps": -1}, "num_train_steps=-1 must be an integer in [1, "),
    ({"batch_size": 0}, "batch_size=0 must be an integer >= 1"),
])
def test_nonsense_vqgan_settings_are_refused(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    train_vqgan.setup(vqgan_config(str(tmp_path), **overrides))
  with pytest.raises(ConfigError, match="no vqgan section: train_vqgan takes configs/vqgan_"):
    train_vqgan.setup(tiny_config())


def test_a_bad_import_says_why_and_leaves_nothing(tmp_path, monkeypatch):
  from cm3jax.io import export
  source = tmp_path / "opt"
  source.mkdir()
  (source / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="config.json is not JSON"):
    export.import_opt(str(source), str(tmp_path / "w1"), tiny_config())
  (source / "config.json").write_text(json.dumps(export.opt_config(
      model_lib.ModelConfig.from_dict(tiny_config().model.to_dict()), "float32")))
  (source / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
  with pytest.raises(ConfigError, match="cannot read .*model.safetensors"):
    export.import_opt(str(source), str(tmp_path / "w2"), tiny_config())
  assert not os.path.exists(tmp_path / "w1") and not os.path.exists(tmp_path / "w2")

  # A readable checkpoint, then a save that fails: the new workdir goes again.
  @contextlib.contextmanager
  def readable(directory):
    yield set(), None
  monkeypatch.setattr(export, "opt_tensors", readable)
  monkeypatch.setattr(torch_layout, "params_from_tensors", lambda *args: trainer.setup(
      tiny_config()).init_state(jax.random.PRNGKey(0)).params)

  def full_disk(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(checkpoint.Checkpoints, "save", full_disk)
  with pytest.raises(OSError, match="disk full"):
    export.import_opt(str(source), str(tmp_path / "w3"), tiny_config())
  assert not os.path.exists(tmp_path / "w3")


def test_an_export_removes_what_a_killed_export_left(tmp_path, capsys):
  from cm3jax.io import export
  dead = subprocess.Popen(["true"])
  dead.wait()
  left = tmp_path / ".export-left"
  left.mkdir()
  (left / "model.safetensors").write_bytes(b"weights")
  (left / export.STAGING_OWNER).write_text(json.dumps(faults.this_process("cm3jax.export") | {
      "pid": dead.pid}))
  running = tmp_path / ".export-running"
  running.mkdir()
  (running / export.STAGING_OWNER).write_text(json.dumps(faults.this_process("cm3jax.export")))
  export._remove_stale_staging(str(tmp_path))
  assert not left.exists() and running.exists()
  assert f"removed {left}, left by an export that did not finish" in capsys.readouterr().out


def test_a_diverging_run_ends_its_command_in_one_line():
  from cm3jax import cli

  def diverges(FLAGS):
    raise faults.NonFinite("step 3: loss nan")
  with pytest.raises(SystemExit) as ended:
    cli._main("train", diverges, ["train"])
  assert ended.value.code == "cm3jax.train: error: step 3: loss nan"
