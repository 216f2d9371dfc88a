"""Faults injected into training runs: divergence, skipped steps, locks on one workdir, damaged
checkpoints; in subprocesses SIGTERM, kill -9 during a save, two processes on one workdir; and bad
inputs to the commands in one line."""

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.core import model as model_lib
from cm3jax.data import synthetic
from cm3jax.sampling import engine
from cm3jax.training import faults, train, trainer
from tests.helpers import REPO, command_env, run_module, tiny_config

pytestmark = pytest.mark.slow

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


TRAIN = ["--config=configs/tiny.py", "--config.data=synthetic", "--config.seq_len=32",
         "--config.global_batch_size=8", "--config.model.max_seq_len=32",
         "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
         "--config.model.vocab_size=128", "--config.log_every=1"]


def losses(stdout: str) -> dict[int, str]:
  return {int(m.group(1)): m.group(2) for m in re.finditer(r"train step (\d+): loss (\S+)", stdout)}


def start(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "cm3jax.train", *TRAIN, *args], cwd=REPO,
                          env=command_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def read_until(process: subprocess.Popen, marker: str) -> str:
  seen = ""
  for line in process.stdout:
    seen += line
    if marker in line:
      return seen
  raise AssertionError(f"{marker!r} never came: {seen[-2000:]} {process.stderr.read()[-2000:]}")


def test_sigterm_saves_a_checkpoint_exits_0_and_the_run_resumes_exactly(tmp_path):
  steps = ["--config.num_train_steps=40", "--config.checkpoint_every=1000"]
  whole = run_module("cm3jax.train", *TRAIN, *steps, f"--workdir={tmp_path}/a")
  assert whole.returncode == 0, whole.stderr[-2000:]
  process = start(*steps, f"--workdir={tmp_path}/b")
  out = read_until(process, "train step 5:")
  process.send_signal(signal.SIGTERM)
  rest, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-2000:]
  stopped = int(re.search(r"preempted \(SIGTERM\) after step (\d+): checkpoint saved", rest).group(1))
  assert 5 <= stopped < 40 and checkpoint_steps(tmp_path / "b") == [stopped]
  resumed = run_module("cm3jax.train", *TRAIN, *steps, f"--workdir={tmp_path}/b")
  assert resumed.returncode == 0 and f"resumed from step {stopped}" in resumed.stdout
  want = losses(whole.stdout)
  got = {**losses(out + rest), **losses(resumed.stdout)}
  assert got == want  # every step once, with the uninterrupted run's loss


def test_kill_9_during_an_asynchronous_save_loses_at_most_the_steps_since_the_last(tmp_path):
  steps = ["--config.num_train_steps=30", "--config.checkpoint_every=5",
           "--config.async_checkpointing=true"]
  whole = run_module("cm3jax.train", *TRAIN, *steps, f"--workdir={tmp_path}/a")
  process = start(*steps, f"--workdir={tmp_path}/b")
  # A save waits for the one before it, so once step 11 is logged the step-5 save is committed
  # and the step-10 one has started (it may also be finished): the kill can lose steps 6-10 at most.
  read_until(process, "train step 11:")
  process.kill()
  process.wait(timeout=60)
  resumed = run_module("cm3jax.train", *TRAIN, *steps, f"--workdir={tmp_path}/b")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  start_step = int(re.search(r"resumed from step (\d+)", resumed.stdout).group(1))
  assert start_step in (5, 10)
  # The stale lock of the killed process is taken over, and the run continues exactly.
  assert "removed the stale lock" in resumed.stdout
  want = losses(whole.stdout)
  assert losses(resumed.stdout) == {s: v for s, v in want.items() if s > start_step}


def test_a_second_process_on_a_workdir_refuses_and_names_the_first(tmp_path):
  first = start("--config.num_train_steps=100000", f"--workdir={tmp_path}")
  try:
    read_until(first, "train step 1:")
    second = run_module("cm3jax.train", *TRAIN, "--config.num_train_steps=4",
                        f"--workdir={tmp_path}")
  finally:
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
  assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-2000:]
  assert (f"workdir {tmp_path} is in use by cm3jax.train (pid {first.pid} on "
          f"{socket.gethostname()})") in second.stderr
  assert first.returncode == 0, err[-3000:]
  assert not os.path.exists(tmp_path / faults.LOCK_NAME)


@pytest.fixture(scope="module")
def token_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("token"))
  train.train(tiny_config(), workdir)
  return workdir


def test_bad_inputs_to_the_commands_are_one_line(token_workdir, tmp_path):
  (tmp_path / "file").write_text("")
  (tmp_path / "dir").mkdir()
  cases = [
      ("cm3jax.train_vqgan", ["--config=configs/tiny.py", f"--workdir={tmp_path}/v"],
       "no vqgan section"),
      ("cm3jax.train_vqgan", ["--config=configs/vqgan_shapes.py", "--config.batch_size=0",
                              f"--workdir={tmp_path}/v"], "batch_size=0 must be an integer >= 1"),
      ("cm3jax.tokenize_images", [f"--vqgan_workdir={token_workdir}", f"--out={tmp_path}/c"],
       "is not a cm3jax.train_vqgan workdir"),
      ("cm3jax.train_tokenizer", ["--input=x.txt", "--vocab_size=0", "--out=x.model"],
       "--vocab_size=0 must be more than the 4 special pieces"),
      ("cm3jax.train_tokenizer", [f"--input={tmp_path}/file", "--vocab_size=300",
                                  f"--out={tmp_path}/dir"], "is a directory; name the model file"),
      ("cm3jax.eval_shapes", [f"--workdir={token_workdir}", "--batch_size=0"],
       "--batch_size=0 must be at least 1"),
      ("cm3jax.eval_shapes", [f"--workdir={token_workdir}", "--num_examples=0"],
       "--num_examples=0 and --batch_size=128 must be at least 1"),
  ]
  for command, args, message in cases:
    result = run_module(command, *args, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, (command, result.stderr)
    assert message in result.stderr, (command, result.stderr[-2000:])
