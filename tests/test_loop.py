"""The one training loop (cm3jax/training/loop.py) with a trainer of plain numbers: its cadence,
log lines, checkpoints with data positions, finite check and preemption."""

import dataclasses
import os
import signal
import time

import ml_collections
import numpy as np
import pytest

from cm3jax.training import faults, loop


@dataclasses.dataclass
class State:
  step: int


class Checkpoints:
  directory = "CKPTS"

  def __init__(self):
    self.saved, self.waits = [], 0

  def save(self, step, state, data_positions=None):
    self.saved.append((step, state.step, data_positions))

  def wait(self):
    self.waits += 1


def config(**overrides):
  return ml_collections.ConfigDict({"num_train_steps": 7, "log_every": 3, "eval_every": 5,
                                    "checkpoint_every": 4, **overrides})


def trainer(losses=None, on_step=None, **overrides):
  """Step i logs loss losses[i] (default i); evaluation logs the state's step and the step
  it was called at; the data position is the number of batches drawn."""
  drawn = []

  def train_step(state, step):
    assert state.step == step
    if on_step:
      on_step(step)
    drawn.append(step)
    loss = losses[step] if losses else float(step)
    return State(step + 1), {"loss": np.float32(loss)}

  fields = dict(train_step=train_step,
                summarize=lambda means, steps, seconds: {**means, "steps_seen": steps},
                evaluate=lambda state, done, progress: {"at": float(state.step + 100 * done)},
                finite_metrics=("loss",), data_positions=lambda: [[len(drawn)]])
  fields.update(overrides)
  return loop.Trainer(**fields)


def test_the_loop_logs_evaluates_and_saves_at_its_cadence_and_always_at_the_end(tmp_path, capsys):
  ckpts = Checkpoints()
  history = loop.run(trainer(), State(0), config(), str(tmp_path), ckpts)
  assert history == [
      {"step": 3, "loss": 1.0, "steps_seen": 3},  # the mean of steps 0, 1, 2
      {"step": 5, "eval_at": 505.0},
      {"step": 6, "loss": 4.0, "steps_seen": 3},  # 3, 4, 5: the evaluation did not reset the mean
      {"step": 7, "loss": 6.0, "steps_seen": 1, "window_steps": 1},
      {"step": 7, "eval_at": 707.0},
  ]
  assert ckpts.saved == [(4, 4, [[4]]), (7, 7, [[7]])]
  assert ckpts.waits == 1
  out = capsys.readouterr().out
  assert "train step 3: loss 1 | steps_seen 3" in out and "eval step 5: at 505" in out


def test_a_resumed_loop_starts_at_its_state_and_a_done_one_does_nothing(tmp_path):
  ckpts = Checkpoints()
  history = loop.run(trainer(), State(5), config(), str(tmp_path), ckpts)
  assert history[0] == {"step": 6, "loss": 5.0, "steps_seen": 1, "window_steps": 1}
  assert ckpts.saved == [(7, 7, [[2]])]  # batches drawn by this process
  assert loop.run(trainer(), State(7), config(), str(tmp_path), Checkpoints()) == []


def test_an_evaluation_counts_in_no_window_of_steps(tmp_path):
  windows = []

  def summarize(means, steps, seconds):
    windows.append(seconds)
    return means

  def slow_evaluation(state, done, progress):
    time.sleep(0.5)
    return {}
  loop.run(trainer(summarize=summarize, evaluate=slow_evaluation), State(0),
           config(log_every=6, eval_every=3), str(tmp_path), Checkpoints())
  assert len(windows) == 2 and max(windows) < 0.4


def test_a_trainer_without_data_positions_saves_none(tmp_path):
  ckpts = Checkpoints()
  loop.run(trainer(data_positions=None), State(0), config(), str(tmp_path), ckpts)
  assert [positions for _, _, positions in ckpts.saved] == [None, None]


def test_a_non_finite_step_stops_the_run_before_its_checkpoint(tmp_path):
  ckpts = Checkpoints()
  losses = [1.0, 1.0, 1.0, 1.0, 1.0, float("nan"), 1.0]
  with pytest.raises(faults.NonFinite, match="step 6: loss nan"):
    loop.run(trainer(losses), State(0), config(checkpoint_every=2, log_every=10), str(tmp_path),
             ckpts)
  assert [step for step, _, _ in ckpts.saved] == [2, 4]


def test_sigterm_saves_the_step_it_stopped_at_and_raises_preempted(tmp_path):
  ckpts = Checkpoints()
  sigterm_in_step_1 = lambda step: step == 1 and os.kill(os.getpid(), signal.SIGTERM)
  with pytest.raises(faults.Preempted, match="after step 2: checkpoint saved in CKPTS"):
    loop.run(trainer(on_step=sigterm_in_step_1), State(0), config(), str(tmp_path), ckpts)
  assert [(step, at) for step, at, _ in ckpts.saved] == [(2, 2)]
  assert ckpts.waits == 1
  assert signal.getsignal(signal.SIGTERM) is not None  # the handler before the loop is back


def test_the_workdir_is_made_absolute_and_held_while_in_use(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with loop.workdir_held("run", "cm3jax.test") as workdir:
    assert workdir == os.path.join(str(tmp_path), "run")
    assert os.path.exists(os.path.join(workdir, faults.LOCK_NAME))


def test_a_trainer_restores_its_newest_state_or_starts_one_and_says_which(capsys):
  import jax
  import jax.numpy as jnp

  class Restoring(Checkpoints):
    def __init__(self, restored):
      super().__init__()
      self.restored = restored

    def restore(self, abstract_state):
      return self.restored

  abstract = State(jax.ShapeDtypeStruct((), jnp.int32))
  abstract.params = {"w": jax.ShapeDtypeStruct((300, 1000), jnp.float32)}
  new = loop.restored_or_new(Restoring(None), abstract, lambda key: ("new", key), 7,
                             "cm3jax.x", "what it trains", "/w")
  assert new[0] == "new" and (new[1] == jax.random.PRNGKey(7)).all()
  assert (f"cm3jax.x: {jax.device_count()} x cpu; 0.30M parameters; what it trains; new run; "
          "workdir /w") in capsys.readouterr().out
  assert loop.restored_or_new(Restoring((State(4), None)), abstract, None, 7, "cm3jax.x", "it",
                              "/w") == State(4)
  assert "; resumed from step 4; workdir /w" in capsys.readouterr().out
