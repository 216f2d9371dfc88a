"""Faults injected into training runs: divergence, locks on one workdir, damaged checkpoints, and
settings no run should accept (SIGTERM, kill -9 and a second process: tests/jobs/test_faults.py)."""

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.core import model as model_lib
from cm3jax.data import synthetic
from cm3jax.io import torch_layout
from cm3jax.sampling import engine
from cm3jax.training import faults, train, train_vqgan, trainer
from tests.helpers import tiny_config, vqgan_config

DIVERGING = {"optimizer.peak_lr": 1e6, "optimizer.warmup_steps": 1}
CLEAN_BATCHES = synthetic.batches


def checkpoint_steps(workdir) -> list[int]:
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def saved_params(workdir, step):
  config = checkpoint.saved_config(str(workdir), step)
  cfg = model_lib.ModelConfig.from_dict(config["model"])
  return checkpoint.restore_params(str(workdir), step,
                                   engine.abstract_params(cfg, engine.default_mesh()))


def test_a_non_finite_step_stops_the_run_and_keeps_the_finite_checkpoints(tmp_path):
  config = tiny_config(num_train_steps=40, checkpoint_every=2, keep_checkpoints=3, log_every=10,
                       **DIVERGING)
  with pytest.raises(faults.NonFinite, match=r"step \d+: loss .*grad_norm") as raised:
    train.train(config, str(tmp_path))
  assert isinstance(raised.value, FloatingPointError)  # a diverging run, not a config error
  assert not isinstance(raised.value, ConfigError)
  bad = int(re.search(r"step (\d+)", str(raised.value)).group(1))
  steps = checkpoint_steps(tmp_path)
  assert steps and max(steps) < bad <= max(steps) + 2
  for step in steps:
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(saved_params(tmp_path, step)))


def poisoned(poison):
  """synthetic.batches whose train batch number i (1-based) has NaN weights where poison(i)."""
  def batches(config, split, step, seed, rows):
    for i, batch in enumerate(CLEAN_BATCHES(config, split, step, seed, rows), step + 1):
      if split == "train" and poison(i):
        batch = dict(batch, weights=np.full_like(batch["weights"], np.nan))
      yield batch
  return batches


def test_skip_nonfinite_steps_skips_a_bounded_number_of_updates(tmp_path, monkeypatch):
  monkeypatch.setattr(synthetic, "batches", poisoned(lambda i: i == 3))
  with pytest.raises(faults.NonFinite, match="step 3: loss nan"):
    train.train(tiny_config(log_every=2), str(tmp_path / "stop"))
  history = train.train(tiny_config(log_every=2, skip_nonfinite_steps=2), str(tmp_path / "skip"))
  logged = [h for h in history if "loss" in h]
  assert [h["skipped_steps"] for h in logged] == [0, 1, 1]
  assert all(np.isfinite(h["loss"]) for h in logged)  # the skipped step's loss is left out
  params = saved_params(tmp_path / "skip", 6)
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
  monkeypatch.setattr(synthetic, "batches", poisoned(lambda i: i >= 2))
  with pytest.raises(faults.NonFinite, match="step 3: more than skip_nonfinite_steps=1"):
    train.train(tiny_config(log_every=1, skip_nonfinite_steps=1), str(tmp_path / "many"))


def test_a_run_resumes_with_skip_nonfinite_steps_switched_on_and_off(tmp_path, monkeypatch,
                                                                    capsys):
  train.train(tiny_config(), str(tmp_path))  # checkpoints 3, 6 without the skip counters
  monkeypatch.setattr(synthetic, "batches", poisoned(lambda i: i == 8))
  history = train.train(tiny_config(num_train_steps=9, skip_nonfinite_steps=2), str(tmp_path))
  assert "resumed from step 6" in capsys.readouterr().out
  assert not os.path.exists(tmp_path / "damaged_checkpoints")
  assert [h["skipped_steps"] for h in history if "loss" in h] == [0, 1, 1]
  assert checkpoint_steps(tmp_path) == [3, 6, 9]
  # Step 9, saved with the counters, resumes without them.
  s = trainer.setup(tiny_config())
  with contextlib.closing(train.checkpoints(str(tmp_path), tiny_config())) as ckpts:
    state, _ = ckpts.restore(s.abstract_state, s.other_layouts)
  assert int(state.step) == 9
  assert jax.tree.structure(state) == jax.tree.structure(s.abstract_state)


def test_a_checkpoint_of_another_train_state_is_refused_not_set_aside(tmp_path):
  train.train(tiny_config(), str(tmp_path))
  wrapped, _ = trainer.setup(tiny_config()).other_layouts[0]  # with the skip counters
  with contextlib.closing(train.checkpoints(str(tmp_path), tiny_config())) as ckpts:
    with pytest.raises(ConfigError, match=r"\(step 6\) holds another train state than this "
                       r"run's \(optimizer settings\?\): only the checkpoint has "
                       r"opt_state\.1\.0\.count, .*; only this run has "
                       r"opt_state\.inner_state\.1\.0\.count"):
      ckpts.restore(wrapped)
  assert checkpoint_steps(tmp_path) == [3, 6]
  assert not os.path.exists(tmp_path / "damaged_checkpoints")


def test_a_lock_of_a_live_process_refuses_and_a_stale_one_is_taken_over(tmp_path, capsys):
  lock = tmp_path / faults.LOCK_NAME
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid,
                                "command": "cm3jax.pipeline"}))
    with pytest.raises(ConfigError, match=f"in use by cm3jax.pipeline \\(pid {sleeper.pid} on"):
      train.train(tiny_config(), str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")
  finally:
    sleeper.kill()
    sleeper.wait()
  train.train(tiny_config(), str(tmp_path))  # the sleeper is gone: its lock is stale
  assert "removed the stale lock" in capsys.readouterr().out
  assert checkpoint_steps(tmp_path) == [3, 6] and not lock.exists()


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


def truncate_largest_file(step_dir):
  path = max(glob.glob(f"{step_dir}/state/ocdbt.process_0/d/*"), key=os.path.getsize)
  with open(path, "r+b") as f:
    f.truncate(100)


DAMAGE = {  # what is done to the checkpoint, and the reason its one line gives
    "a truncated data file": (truncate_largest_file, ""),
    "a missing data item": (lambda d: shutil.rmtree(f"{d}/data"), "its data item is missing"),
    "missing state metadata": (lambda d: os.remove(f"{d}/state/_METADATA"),
                               "state/_METADATA is missing"),
    "missing checkpoint metadata": (lambda d: os.remove(f"{d}/_CHECKPOINT_METADATA"),
                                    "its _CHECKPOINT_METADATA is missing"),
    "a missing state database manifest": (lambda d: os.remove(f"{d}/state/manifest.ocdbt"),
                                          "its state database holds no array"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  history = train.train(tiny_config(num_train_steps=9, keep_checkpoints=5),
                        str(tmp_path_factory.mktemp("whole")))
  return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capfd, damage,
                                                                  uninterrupted):
  config = tiny_config(keep_checkpoints=5)
  train.train(config, str(tmp_path))
  capfd.readouterr()
  do_damage, reason = DAMAGE[damage]
  do_damage(tmp_path / "checkpoints" / "6")
  config.num_train_steps = 9
  history = train.train(config, str(tmp_path))
  out, err = capfd.readouterr()
  assert f"checkpoint step 6 is damaged ({reason}" in out and "resumed from step 3" in out
  assert "Traceback" not in err, err[-3000:]  # the damage is said in one line
  assert {h["step"]: h["loss"] for h in history if "loss" in h} == {
      s: v for s, v in uninterrupted.items() if s > 3}
  assert os.path.isdir(tmp_path / "damaged_checkpoints" / "6")
  assert checkpoint_steps(tmp_path) == [3, 6, 9]


def test_no_whole_checkpoint_is_an_error_not_a_new_run_until_the_user_says_so(tmp_path, capsys):
  train.train(tiny_config(), str(tmp_path))
  for step in (3, 6):
    shutil.rmtree(tmp_path / "checkpoints" / str(step) / "config")
  refusal = (r"no checkpoint in .* restores whole and .*damaged_checkpoints holds 3, 6: repair one "
             r"and move it back .* --config.new_run_over_damaged=true")
  for _ in range(2):  # the second start finds no checkpoint at all, and refuses the same
    with pytest.raises(ConfigError, match=refusal):
      train.train(tiny_config(num_train_steps=9), str(tmp_path))
  capsys.readouterr()
  train.train(tiny_config(new_run_over_damaged=True), str(tmp_path))
  assert "; new run; " in capsys.readouterr().out
  assert checkpoint_steps(tmp_path) == [3, 6]
  assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == ["3", "6"]


def test_running_out_of_memory_while_restoring_sets_nothing_aside(tmp_path, monkeypatch):
  train.train(tiny_config(), str(tmp_path))
  restore = ocp.CheckpointManager.restore

  def out_of_memory(manager, step, args=None):
    if "state" in args.keys():
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 GiB")
    return restore(manager, step, args=args)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", out_of_memory)
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    train.train(tiny_config(num_train_steps=9), str(tmp_path))
  assert checkpoint_steps(tmp_path) == [3, 6]
  assert not os.path.exists(tmp_path / "damaged_checkpoints")


def test_damaged_copies_of_one_step_are_all_kept(tmp_path, capsys):
  train.train(tiny_config(), str(tmp_path))
  six = tmp_path / "checkpoints" / "6"
  shutil.copytree(six, tmp_path / "six")
  s = trainer.setup(tiny_config())
  for copy in range(3):
    if copy:
      shutil.copytree(tmp_path / "six", six)
    os.remove(six / "state" / "_METADATA")
    with contextlib.closing(train.checkpoints(str(tmp_path), tiny_config())) as ckpts:
      state, _ = ckpts.restore(s.abstract_state)
    assert int(state.step) == 3
  assert sorted(os.listdir(tmp_path / "damaged_checkpoints")) == ["6", "6.2", "6.3"]
  for name in ("6", "6.2", "6.3"):
    assert os.path.isfile(tmp_path / "damaged_checkpoints" / name / "_CHECKPOINT_METADATA")
  assert f"moved to {tmp_path}/damaged_checkpoints/6.3;" in capsys.readouterr().out


def test_keep_checkpoints_0_is_refused_and_deletes_nothing(tmp_path):
  train.train(tiny_config(), str(tmp_path))
  with pytest.raises(ConfigError, match="keep_checkpoints=0 must be an integer >= 1"):
    train.train(tiny_config(num_train_steps=9, keep_checkpoints=0), str(tmp_path))
  assert checkpoint_steps(tmp_path) == [3, 6]


def test_the_first_log_line_after_a_resume_says_how_many_steps_it_averages(tmp_path):
  train.train(tiny_config(num_train_steps=3, log_every=2), str(tmp_path))
  history = train.train(tiny_config(num_train_steps=8, log_every=2), str(tmp_path))
  windows = [(h["step"], h.get("window_steps")) for h in history if "loss" in h]
  assert windows == [(4, 1), (6, None), (8, None)]


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
