"""Orbax checkpoints of the train state, with the run's config saved beside each one."""

import json
import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from cm3jax.config import ConfigError
from cm3jax.model import ModelConfig


class Checkpoints:
  """Saves the train state when asked (asynchronously if configured), keeps the newest
  `config.keep_checkpoints`, and restores the latest one into a matching train state."""

  def __init__(self, workdir: str, config):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.config_json = json.loads(config.to_json())
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
    self._check_compatible(saved["config"]["model"], step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) does not match this run's "
                        f"train state (optimizer settings?): {str(e).splitlines()[0]}") from None
    return restored["state"]

  def _check_compatible(self, saved_model: dict, step: int):
    current = self.config_json["model"]
    diffs = [f"model.{k}={saved_model.get(k)!r} (this config: {current[k]!r})"
             for k in ModelConfig.ARCHITECTURE if saved_model.get(k) != current[k]]
    if diffs:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) was written by another model: "
                        + ", ".join(diffs) + "; use a new --workdir or the matching config")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
