"""Faults injected into training runs in subprocesses: SIGTERM, kill -9 during a save, two
processes on one workdir; and bad inputs to the commands in one line."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from cm3jax.training import faults, train
from tests.helpers import REPO, run_module, tiny_config
from tests.test_faults import checkpoint_steps

pytestmark = pytest.mark.slow


TRAIN = ["--config=configs/tiny.py", "--config.data=synthetic", "--config.seq_len=32",
         "--config.global_batch_size=8", "--config.model.max_seq_len=32",
         "--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.mlp_dim=64",
         "--config.model.vocab_size=128", "--config.log_every=1"]


def losses(stdout: str) -> dict[int, str]:
  return {int(m.group(1)): m.group(2) for m in re.finditer(r"train step (\d+): loss (\S+)", stdout)}


def start(*args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "cm3jax.train", *TRAIN, *args], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
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
