"""Orbax checkpoints of the train state, with the run's config (and, for the token model, its
vocabulary and every host's data position) saved beside each one."""

import gc
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cm3jax.config import ConfigError
from cm3jax.vocab import Vocab

ITEMS = ("state", "config", "vocab", "data")


class Checkpoints:
  """Saves the train state when asked (asynchronously if configured), keeps the newest
  `config.keep_checkpoints`, and restores the latest one into a matching train state.

  `architecture` names the config fields that fix the parameters, by config section, each with
  the value a saved config without it means ({"model": {"num_layers": None, "bias": False, ...}},
  see `differences`); a checkpoint whose saved config differs in any of them, or
  that was trained with another vocabulary, is refused with a message that says what differs.
  """

  def __init__(self, workdir: str, config, architecture: dict[str, dict[str, Any]],
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
    """The newest checkpoint that restores whole: the train state, placed as `abstract_state`'s
    shardings say, and the saved data positions (None if it was saved without them); None if
    there is no checkpoint. A damaged one (an item or file missing, a file that does not read)
    is moved to WORKDIR/damaged_checkpoints/STEP, said in one line, and the one before it is
    tried; a checkpoint of another model or vocabulary is refused, not passed over."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return self._restore(step, abstract_state)
      except DamagedCheckpoint as e:
        aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints", str(step))
        if jax.process_index() == 0:
          os.makedirs(os.path.dirname(aside), exist_ok=True)
          shutil.move(os.path.join(self.directory, str(step)), aside)
          print(f"checkpoint step {step} is damaged ({e}): moved to {aside}; trying the one "
                "before it", flush=True)
        self.manager.reload()
    if steps:
      raise ConfigError(f"no checkpoint in {self.directory} restores whole (each damaged one is in "
                        f"{os.path.dirname(self.directory)}/damaged_checkpoints)")
    return None

  def _restore(self, step: int, abstract_state):
    items = saved_items(self.directory, step)
    if "config" not in items or "state" not in items:
      raise DamagedCheckpoint("its config or state item is missing")
    if self.vocab is not None and "vocab" not in items:
      raise DamagedCheckpoint("its vocabulary item is missing")
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.JsonRestore() for name in ("config", "vocab", "data") if name in items}))
    except Exception as e:  # orbax and tensorstore raise many types for unreadable files
      raise DamagedCheckpoint(_first_line(e)) from None
    self._check_compatible(saved["config"], step)
    self._check_vocab(saved.get("vocab"), step)
    if not os.path.exists(os.path.join(self.directory, str(step), "state", "_METADATA")):
      raise DamagedCheckpoint("state/_METADATA is missing")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
    except (ValueError, KeyError, TypeError) as e:
      if "pytree structure" not in str(e) and "shape" not in str(e):
        raise DamagedCheckpoint(_first_line(e)) from None
      raise ConfigError(f"checkpoint {self.directory} (step {step}) does not match this run's "
                        f"train state (optimizer settings?): {_first_line(e)}") from None
    except Exception as e:
      _drop_failed_reads()
      raise DamagedCheckpoint(_first_line(e)) from None
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
    diffs = differences(saved, self.config_json, self.architecture)
    if diffs:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) was written by another model: "
                        + ", ".join(diffs) + "; use a new --workdir or the matching config")

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def differences(saved: dict, config_json: dict, fields: dict[str, dict[str, Any]]) -> list[str]:
  """`section.field=saved (this config: value)` for each of `fields` (by config section) where
  a saved config and this run's differ. `fields[section]` maps each field to the value a config
  that lacks it means (a field added after the checkpoint was written; None: no default)."""
  out = []
  for section, names in fields.items():
    for k, default in names.items():
      theirs = saved.get(section, {}).get(k, default)
      ours = config_json.get(section, {}).get(k, default)
      if theirs != ours:
        out.append(f"{section}.{k}={theirs!r} (this config: {ours!r})")
  return out


class DamagedCheckpoint(Exception):
  """A checkpoint that cannot be restored whole; says why in one line."""


def _drop_failed_reads():
  """From now on, drops the tracebacks of the reads orbax left pending when one of them failed:
  each would print one when collected, at exit, of the damage already reported. Other
  unraisable exceptions still reach the hook that was there."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_failed_reads", False):
    return

  def hook(unraisable):
    if getattr(unraisable.object, "__name__", "") != "_read_array_index_and_device_put":
      previous(unraisable)
  hook.drops_failed_reads = True
  sys.unraisablehook = hook
  gc.collect()


def _first_line(e: Exception) -> str:
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return line.split(" See full TensorStore details")[0][:200]


def saved_items(checkpoints_dir: str, step: int) -> set[str]:
  """The items checkpoint `step` was saved with (its orbax metadata lists them) that are on
  disk; a DamagedCheckpoint if the metadata is missing or a listed item is."""
  path = os.path.join(checkpoints_dir, str(step), "_CHECKPOINT_METADATA")
  try:
    with open(path) as f:
      listed = set(json.load(f)["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):
    raise DamagedCheckpoint("its _CHECKPOINT_METADATA is missing or unreadable") from None
  missing = sorted(i for i in listed if not _holds(checkpoints_dir, step, i))
  if missing:
    raise DamagedCheckpoint(f"its {', '.join(missing)} item is missing")
  return listed


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
