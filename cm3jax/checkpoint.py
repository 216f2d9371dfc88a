"""Orbax checkpoints of the train state, with the run's config saved beside each one."""

import json
import os
import tempfile
from typing import Any, Optional, Sequence

import orbax.checkpoint as ocp

from cm3jax.config import ConfigError


class Checkpoints:
  """Saves the train state when asked (asynchronously if configured), keeps the newest
  `config.keep_checkpoints`, and restores the latest one into a matching train state.

  `architecture` names the config fields that fix the parameters, by config section
  ({"model": ("num_layers", ...)}); a checkpoint whose saved config differs in any of them is
  refused with a message that lists the differences.
  """

  def __init__(self, workdir: str, config, architecture: dict[str, Sequence[str]]):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.config_json = json.loads(config.to_json())
    self.architecture = architecture
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, enable_async_checkpointing=config.async_checkpointing, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "config"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state):
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.config_json)))

  def restore(self, abstract_state) -> Optional[Any]:
    """The latest train state, placed as `abstract_state`'s shardings say; None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    self._check_compatible(saved["config"], step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) does not match this run's "
                        f"train state (optimizer settings?): {str(e).splitlines()[0]}") from None
    return restored["state"]

  def _check_compatible(self, saved: dict, step: int):
    diffs = [f"{section}.{k}={saved.get(section, {}).get(k)!r} "
             f"(this config: {self.config_json[section][k]!r})"
             for section, fields in self.architecture.items() for k in fields
             if saved.get(section, {}).get(k) != self.config_json[section][k]]
    if diffs:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) was written by another model: "
                        + ", ".join(diffs) + "; use a new --workdir or the matching config")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def prepare_workdir(workdir: Optional[str]) -> str:
  if not workdir:
    raise ConfigError("--workdir is required")
  if "://" in workdir:
    raise ConfigError(f"workdir {workdir} is a URL; cm3jax writes to file systems: mount the "
                      "bucket (e.g. gcsfuse) and pass the mounted path")
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
  return workdir
