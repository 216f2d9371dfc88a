"""Progress output of a training run: a progress bar on terminals, one line per logged step,
TensorBoard scalars and images in the workdir, and the logged values for the caller; and the
cadence every trainer's loop shares (which steps log, evaluate and checkpoint, and the metrics
of the steps since the last log line)."""

import dataclasses
import os
import sys
import time

import jax
import numpy as np
import tqdm


@dataclasses.dataclass(frozen=True)
class Cadence:
  """Every `*_every` steps (0: only at the last step), and always at the last step."""
  total: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  @classmethod
  def of(cls, config) -> "Cadence":
    return cls(config.num_train_steps, config.log_every, config.eval_every,
               config.checkpoint_every)

  def _due(self, done: int, every: int) -> bool:
    return done == self.total or (every > 0 and done % every == 0)

  def logs(self, done: int) -> bool:
    return self._due(done, self.log_every)

  def evaluates(self, done: int) -> bool:
    return self._due(done, self.eval_every)

  def checkpoints(self, done: int) -> bool:
    return self._due(done, self.checkpoint_every)


class Window:
  """The device metrics of the steps since the last log line, by step, and the seconds they took
  (an evaluation's left out: `discount` them)."""

  def __init__(self):
    self.restart()

  def restart(self):
    self.pending, self.start, self._host = [], time.perf_counter(), None

  def discount(self, seconds: float):
    self.start += seconds

  def add(self, step: int, metrics: dict):
    self.pending.append((step, metrics))
    self._host = None

  def host(self) -> list[tuple[int, dict]]:
    """(step, metrics) of the window, fetched from the devices once."""
    if self._host is None:
      self._host = jax.device_get(self.pending)
    return self._host

  def take(self) -> tuple[dict[str, float], int, float]:
    """(the mean of each metric over the window, its steps, its seconds), and a new window. A
    metric some steps lack (a GAN loss before the GAN starts) or that is not finite in some (a
    skipped step's loss) is averaged where present and finite."""
    pending = [m for _, m in self.host()]
    seconds = time.perf_counter() - self.start

    def mean(k):
      values = [float(m[k]) for m in pending if k in m and np.isfinite(m[k])]
      return float(np.mean(values)) if values else float("nan")
    means = {k: mean(k) for k in pending[-1]}
    self.restart()
    return means, len(pending), seconds


class Progress:

  def __init__(self, workdir: str, total: int, initial: int, chief: bool):
    self.writer = None
    if chief:
      import tensorboardX
      self.writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    # Without a terminal (logs, CI) the bar would print a line per refresh; log lines suffice.
    self.bar = tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         file=sys.stdout, disable=not (chief and sys.stdout.isatty()))
    self.chief = chief
    self.history: list[dict[str, float]] = []

  def step(self):
    self.bar.update()

  def log(self, step: int, prefix: str, summary: dict[str, float]):
    """Prints `prefix step N: k v | ...`, writes `prefix/k` to TensorBoard and keeps the values
    (as `k` for train, `prefix_k` otherwise) in `history`."""
    self.history.append({"step": step, **{k if prefix == "train" else f"{prefix}_{k}": v
                                          for k, v in summary.items()}})
    if not self.chief:
      return
    self.bar.write(f"{prefix} step {step}: " + " | ".join(f"{k} {_fmt(v)}" for k, v in summary.items()))
    sys.stdout.flush()  # log files (a TPU VM's nohup train.log) see each line as it is made
    if "loss" in summary:
      self.bar.set_postfix({f"{prefix}_loss": f"{summary['loss']:.3f}"})
    for k, v in summary.items():
      self.writer.add_scalar(f"{prefix}/{k}", v, step)
    self.writer.flush()

  def image(self, step: int, name: str, image_HxWx3: np.ndarray):
    if self.writer:
      self.writer.add_image(name, image_HxWx3, step, dataformats="HWC")

  def text(self, step: int, name: str, markdown: str):
    if self.writer:
      self.writer.add_text(name, markdown, step)
      self.writer.flush()

  def close(self):
    self.bar.close()
    if self.writer:
      self.writer.close()


def _fmt(v: float) -> str:
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
