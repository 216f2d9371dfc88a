"""The loop every trainer runs. A trainer brings its setup, its restored state and its step; the
loop owns the workdir lock, the cadence (log, evaluate, checkpoint), the finite check, the log
lines, checkpoints with the data positions, and preemption."""

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator, Optional

import jax

from cm3jax.core import checkpoint
from cm3jax.core import model as model_lib
from cm3jax.training import faults
from cm3jax.training.progress import Cadence, Progress, Window


@contextlib.contextmanager
def workdir_held(workdir: Optional[str], command: str) -> Iterator[str]:
  """The workdir, made and checked writable (its absolute path), and held by `command`."""
  workdir = checkpoint.prepare_workdir(workdir)
  with faults.workdir_lock(workdir, command):
    yield workdir


def restored_or_new(ckpts: checkpoint.Checkpoints, abstract_state, init_state: Callable, seed: int,
                    command: str, what: str, workdir: str):
  """The newest checkpoint's state, else `init_state(PRNGKey(seed))`; says which, after the
  devices, the parameter count and `what` is trained (the chief's first line)."""
  restored = ckpts.restore(abstract_state)
  state = restored[0] if restored else init_state(jax.random.PRNGKey(seed))
  if jax.process_index() == 0:
    devices = jax.devices()
    print(f"{command}: {len(devices)} x {devices[0].device_kind}; "
          f"{model_lib.num_params(abstract_state.params) / 1e6:.2f}M parameters; {what}; "
          + (f"resumed from step {int(state.step)}" if restored else "new run")
          + f"; workdir {workdir}", flush=True)
  return state


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What one trainer gives the loop.

  train_step: (state, step) -> (state, device metrics) runs step `step` (0-based).
  summarize: (mean metrics, steps, seconds) of the window since the last log line -> the fields
    of the train log line (the loop adds `window_steps` where the window is not `log_every`).
  evaluate: (state, done, progress) -> the eval log line's fields; it may write images and text
    to `progress` too.
  finite_metrics: a logged, evaluated or saved step where any of these is not finite stops the
    run (faults.NonFinite) before its checkpoint; with skip_limit > 0 the step skipped such updates
    itself and only more than skip_limit of them stop it.
  data_positions: () -> every host's position of its next batch, saved with each checkpoint;
    None where the trainer draws its batches from the step number.
  """
  train_step: Callable[[Any, int], tuple[Any, dict]]
  summarize: Callable[[dict[str, float], int, float], dict[str, float]]
  evaluate: Callable[[Any, int, Progress], dict[str, float]]
  finite_metrics: tuple[str, ...]
  skip_limit: int = 0
  data_positions: Optional[Callable[[], list]] = None


def run(trainer: Trainer, state, config, workdir: str, ckpts: checkpoint.Checkpoints
        ) -> list[dict[str, float]]:
  """Runs `trainer` from `state` (at its step) to config.num_train_steps; returns the logged
  values. Raises NonFinite at a non-finite step and Preempted after saving on SIGTERM."""
  chief = jax.process_index() == 0
  start = int(state.step)
  progress = Progress(workdir, config.num_train_steps, start, chief)
  cadence, window = Cadence.of(config), Window()
  with faults.Preemption() as preemption:
    for step in range(start, config.num_train_steps):
      state, metrics = trainer.train_step(state, step)
      done = step + 1
      window.add(done, metrics)
      progress.step()
      preempted = preemption.requested(done)
      save = cadence.checkpoints(done) or preempted
      if cadence.logs(done) or cadence.evaluates(done) or save:
        faults.check_finite(window.host(), trainer.finite_metrics, trainer.skip_limit)
      if cadence.logs(done):
        means, steps, seconds = window.take()
        summary = trainer.summarize(means, steps, seconds)
        if steps != config.log_every:  # after a resume, or at the last step
          summary["window_steps"] = steps
        progress.log(done, "train", summary)
      if cadence.evaluates(done):
        started = time.perf_counter()
        progress.log(done, "eval", trainer.evaluate(state, done, progress))
        window.discount(time.perf_counter() - started)
      if save:
        ckpts.save(done, state, trainer.data_positions() if trainer.data_positions else None)
      if preempted:
        ckpts.wait()
        progress.close()
        raise faults.Preempted(done, ckpts.directory)
  progress.close()
  ckpts.wait()
  return progress.history
