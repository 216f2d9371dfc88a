"""Orbax checkpoints of the train state, with the run's config (and, for the token model, its
vocabulary and every host's data position) saved beside each one."""

import json
import os
import tempfile
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from cm3jax.config import ConfigError
from cm3jax.vocab import Vocab

ITEMS = ("state", "config", "vocab", "data")


class Checkpoints:
  """Saves the train state when asked (asynchronously if configured), keeps the newest
  `config.keep_checkpoints`, and restores the latest one into a matching train state.

  `architecture` names the config fields that fix the parameters, by config section
  ({"model": ("num_layers", ...)}); a checkpoint whose saved config differs in any of them, or
  that was trained with another vocabulary, is refused with a message that says what differs.
  """

  def __init__(self, workdir: str, config, architecture: dict[str, Sequence[str]],
               vocab: Optional[Vocab] = None):
    self.directory = directory(workdir)
    self.config_json = json.loads(config.to_json())
    self.architecture = architecture
    self.vocab = vocab
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, enable_async_checkpointing=config.async_checkpointing,
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_positions: Optional[list] = None):
    """`data_positions`: per host, where its next batch starts (cm3jax/data)."""
    items = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(self.config_json)}
    if self.vocab is not None:
      items["vocab"] = ocp.args.JsonSave(self.vocab.to_json())
    if data_positions is not None:
      items["data"] = ocp.args.JsonSave({"positions": data_positions})
    self.manager.save(step, force=True, args=ocp.args.Composite(**items))

  def restore(self, abstract_state) -> Optional[tuple[Any, Optional[list]]]:
    """The latest train state, placed as `abstract_state`'s shardings say, and the saved data
    positions (None if it has none); None if there is no checkpoint."""
    step = self.latest_step()
    if step is None:
      return None
    saved = self.manager.restore(step, args=ocp.args.Composite(
        **{name: ocp.args.JsonRestore() for name in ("config", "vocab", "data")
           if _holds(self.directory, step, name)}))
    self._check_compatible(saved["config"], step)
    self._check_vocab(saved.get("vocab"), step)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) does not match this run's "
                        f"train state (optimizer settings?): {str(e).splitlines()[0]}") from None
    data = saved.get("data")
    return restored["state"], (data["positions"] if data else None)

  def _check_vocab(self, saved: Optional[dict], step: int):
    if self.vocab is None or saved is None:
      return
    if Vocab.from_json(saved) != self.vocab:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) was trained with another "
                        f"vocabulary ({Vocab.from_json(saved).describe()}; this run: "
                        f"{self.vocab.describe()}); use a new --workdir or the same tokenizer")

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


def directory(workdir: str) -> str:
  """Where a workdir keeps its checkpoints."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _holds(checkpoints_dir: str, step: int, item: str) -> bool:
  """Whether checkpoint `step` has `item` (a vocabulary, data positions)."""
  return os.path.isdir(os.path.join(checkpoints_dir, str(step), item))


def newest_step(workdir: str) -> Optional[int]:
  """The step of the newest checkpoint in a workdir, or None."""
  if not os.path.isdir(directory(workdir)):
    return None
  with ocp.CheckpointManager(directory(workdir), item_names=ITEMS) as manager:
    return manager.latest_step()


def latest_step(workdir: str) -> int:
  """The step of the newest checkpoint of a `cm3jax.train` workdir, or a ConfigError."""
  step = newest_step(workdir)
  if step is None:
    raise ConfigError(f"no checkpoints in {workdir}: train one with python -m cm3jax.train")
  return step


def _restore(workdir: str, step: int, **items):
  with ocp.CheckpointManager(directory(workdir), item_names=ITEMS) as manager:
    return manager.restore(step, args=ocp.args.Composite(**items))


def saved_config(workdir: str, step: int) -> dict:
  """The run config saved with checkpoint `step`."""
  return _restore(workdir, step, config=ocp.args.JsonRestore())["config"]


def load_vocab(workdir: str, step: int) -> Vocab:
  """The vocabulary saved with checkpoint `step` of a token-model workdir."""
  if not _holds(directory(workdir), step, "vocab"):
    raise ConfigError(f"the checkpoint in {workdir} (step {step}) has no vocabulary: it was "
                      "trained on synthetic data")
  return Vocab.from_json(_restore(workdir, step, vocab=ocp.args.JsonRestore())["vocab"])


def restore_params(workdir: str, step: int, abstract_params, host: bool = False):
  """Only the parameters of checkpoint `step` (not the optimiser state), placed as the
  ShapeDtypeStructs of `abstract_params` say, or with `host` as numpy arrays in host memory
  (one copy of the weights, no device)."""
  item = {"params": abstract_params}
  if host:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  restored = _restore(workdir, step, state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  return restored["state"]["params"]


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
