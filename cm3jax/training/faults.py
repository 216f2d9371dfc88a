"""What a training loop does about faults: a non-finite loss or gradient norm stops the run (or,
with skip_nonfinite_steps, is skipped a bounded number of times), SIGTERM asks for a checkpoint
and a clean exit, and one workdir is trained by one process at a time."""

import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from cm3jax.config import ConfigError
from cm3jax.core import files

LOCK_NAME = ".cm3jax.lock"
GUARD_SUFFIX = ".guard"  # LOCK_NAME + GUARD_SUFFIX: the file whose flock a lock is taken under
LOCK_GRACE_S = 10  # a lock file still empty after this long was left by a process that died


class NonFinite(FloatingPointError):
  """A non-finite loss or gradient norm (a diverging run, not a bad config); no checkpoint of that
  state was written."""


class Preempted(Exception):
  """SIGTERM: the run saved a checkpoint at `step` and stops; the same command resumes it."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted (SIGTERM) after step {step}: checkpoint saved in {directory}; "
                     "the same command resumes the run")


def check_finite(pending: list[tuple[int, dict]], keys: tuple[str, ...], skip_limit: int = 0):
  """A NonFinite error for the first of these (step, host metrics) whose `keys` are not finite;
  with skip_limit > 0 the train step skipped such updates itself, counted in `skipped_steps`,
  and only more than skip_limit of them stop the run."""
  for step, metrics in pending:
    if skip_limit:
      if metrics["skipped_steps"] > skip_limit:
        raise NonFinite(f"step {step}: more than skip_nonfinite_steps={skip_limit} steps had a "
                        "non-finite gradient; the last checkpoint is the last finite state")
    elif not all(np.isfinite(metrics[k]) for k in keys):
      values = ", ".join(f"{k} {float(metrics[k]):.4g}" for k in keys)
      raise NonFinite(f"step {step}: {values}; stopped before writing a checkpoint of it (the "
                      "ones before are kept); lower the learning rate, or set "
                      "--config.skip_nonfinite_steps=N to skip such steps")


class Preemption:
  """Within it, SIGTERM asks the loop to stop after the current step. On several hosts JAX's
  preemption sync point makes every host agree on the step to stop at."""

  def __init__(self):
    self.signalled = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signalled = True

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signalled

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def this_process(command: str) -> dict:
  """Who holds a lock or a staging directory: {host, pid, command}."""
  return {"host": socket.gethostname(), "pid": os.getpid(), "command": command}


def gone(owner: dict) -> bool:
  """Whether the process a `this_process` record names has ended (known on its own host only)."""
  return owner.get("host") == socket.gethostname() and not _alive(owner["pid"])


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def read_owner(path: str):
  """The {host, pid, command} JSON at `path`, {} if it is empty or not whole, None if there is
  no file."""
  try:
    text = files.read_text(path)
  except FileNotFoundError:
    return None
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  whole = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and (
      {"host", "command"} <= set(holder))
  return holder if whole else {}


@contextlib.contextmanager
def workdir_lock(workdir: str, command: str):
  """Holds WORKDIR/.cm3jax.lock (host, pid and command) while the body runs; a second process
  refuses with one line naming the first, and a lock whose process is gone is taken over (see
  `take_lock`). The process that holds it may enter again (the pipeline runs the trainers). On
  several hosts process 0 holds it for all. In a bucket the lock is best-effort (no flock there:
  two processes starting at once may both take it)."""
  if jax.process_index() != 0:
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  me = this_process(command)
  take = _take_bucket_lock if files.is_uri(workdir) else take_lock
  if not take(path, me):
    yield  # already ours
    return
  try:
    yield
  finally:
    if read_owner(path) == me:
      files.remove(path)


def take_lock(path: str, me: dict) -> bool:
  """Creates the lock file `path` naming `me` (a `this_process` record), or takes over a stale
  one (its process gone, on this host; or left empty for LOCK_GRACE_S); False if `me` holds it
  already; a ConfigError naming the holder if another process does. Processes decide under an
  flock on PATH.guard, so that of several taking over one stale lock exactly one wins; the
  kernel drops the flock when a process dies, so the guard is never stale itself. (The guard is a
  file opened for writing: NFS emulates flock with POSIX locks, which an exclusive lock needs.)"""
  with open(path + GUARD_SUFFIX, "a") as guard:  # local file: flock needs a local file
    fcntl.flock(guard, fcntl.LOCK_EX)
    while True:
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        break
      except FileExistsError:
        holder = read_owner(path)
        if holder is None:
          continue
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
          return False
        empty_and_old = holder == {} and (
            time.time() - os.path.getmtime(path)  # local file: flock needs a local file
            > LOCK_GRACE_S)
        if empty_and_old or (holder and gone(holder)):
          print(f"{me['command']}: removed the stale lock {path} ({holder or 'empty'})",
                flush=True)
          files.remove(path)
          continue
        workdir = os.path.dirname(path)
        if holder == {}:
          raise ConfigError(f"workdir {workdir} is being locked by another process ({path})")
        raise _in_use(path, holder)
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
  return True


def _take_bucket_lock(path: str, me: dict) -> bool:
  """`take_lock` for a lock object in a bucket, where there is no flock to decide under: it takes
  a lock that is absent, unreadable or stale (its process gone, on this host)."""
  holder = read_owner(path) if files.exists(path) else None
  if holder and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
    return False
  if holder and not gone(holder):
    raise _in_use(path, holder)
  files.write_json(path, me)
  return True


def _in_use(path: str, holder: dict) -> ConfigError:
  return ConfigError(f"workdir {os.path.dirname(path)} is in use by {holder['command']} (pid "
                     f"{holder['pid']} on {holder['host']}); wait for it or stop it, and if "
                     f"that process is gone, delete {path}")
