"""Orbax checkpoints of the train state, with the run's config (and, for the token model, its
vocabulary and every host's data position) saved beside each one."""

import gc
import itertools
import json
import os
import sys
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.core.vocab import Vocab

ITEMS = ("state", "config", "vocab", "data")
DAMAGED = "damaged_checkpoints"  # WORKDIR/DAMAGED: checkpoints that did not restore, set aside


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
    # A config file written before the option existed lacks it: no new run over damaged ones.
    self.new_run_over_damaged = config.get("new_run_over_damaged", False)
    # Replica-parallel saving has each replica of an array write a slice of it, compiling one
    # slice per array (orbax#2934: 168 compilations, 13 s, for the VQGAN's state on 8 CPU
    # devices); it saves time only when the replicas sit on several hosts.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
        override=True)
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

  def restore(self, abstract_state,
              other_layouts: tuple = ()) -> Optional[tuple[Any, Optional[list]]]:
    """The newest checkpoint that restores whole: the train state, placed as `abstract_state`'s
    shardings say, and the saved data positions (None if it was saved without them); None if
    there is no checkpoint. A damaged one (an item or file missing, a file that does not read)
    is moved to WORKDIR/damaged_checkpoints/STEP, said in one line, and the one before it is
    tried; a checkpoint of another model, vocabulary or train state is refused, not passed over.
    `other_layouts`: (abstract state, function to this run's state) for each other layout of
    the train state that this run takes over (train.py: the optimiser state of the other
    skip_nonfinite_steps setting). With damaged checkpoints set aside and no whole one, a new
    run starts only with config.new_run_over_damaged."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    for step in steps:
      try:
        return self._restore(step, abstract_state, other_layouts)
      except DamagedCheckpoint as e:
        if jax.process_index() == 0:
          aside = _set_aside(self.directory, step)
          print(f"checkpoint step {step} is damaged ({e}): moved to {aside}; trying the one "
                "before it", flush=True)
        self.manager.reload()
    damaged = os.path.join(os.path.dirname(self.directory), DAMAGED)
    set_aside = files.listdir(damaged)
    if (steps or set_aside) and not self.new_run_over_damaged:
      raise ConfigError(f"no checkpoint in {self.directory} restores whole and {damaged} holds "
                        f"{', '.join(set_aside)}: repair one and move it back into "
                        f"{self.directory}, or start a new run over them with "
                        "--config.new_run_over_damaged=true")
    return None

  def _restore(self, step: int, abstract_state, other_layouts: tuple):
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
    saved_arrays = _saved_arrays(os.path.join(self.directory, str(step), "state"))
    layouts = ((abstract_state, None),) + tuple(other_layouts)
    target, convert = next(((t, c) for t, c in layouts if _array_shapes(t) == saved_arrays),
                           (None, None))
    if target is None:
      raise ConfigError(f"checkpoint {self.directory} (step {step}) holds another train state "
                        "than this run's (optimizer settings?): "
                        + _describe_difference(saved_arrays, _array_shapes(abstract_state)))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
    except (MemoryError, jax.errors.JaxRuntimeError):
      raise  # out of memory or a device fault: says nothing against the checkpoint
    except Exception as e:  # the layout matches, so what does not read is damage
      _drop_failed_reads()
      raise DamagedCheckpoint(_first_line(e)) from None
    state = restored["state"] if convert is None else convert(restored["state"])
    data = saved.get("data")
    return state, (data["positions"] if data else None)

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


def _set_aside(checkpoints_dir: str, step: int) -> str:
  """Moves checkpoint `step` to WORKDIR/damaged_checkpoints/STEP, or STEP.2, STEP.3, ... when
  damaged copies of that step are there already; returns where it went."""
  parent = os.path.join(os.path.dirname(checkpoints_dir), DAMAGED)
  files.makedirs(parent)
  for copy in itertools.count(1):
    aside = os.path.join(parent, str(step) if copy == 1 else f"{step}.{copy}")
    if not files.exists(aside):
      files.rename(os.path.join(checkpoints_dir, str(step)), aside)
      return aside


def _array_shapes(tree) -> dict[str, tuple]:
  """{dotted key path: shape} of each array of a (train state) tree, named as orbax names them."""
  return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(x.shape)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_arrays(state_dir: str) -> dict[str, tuple]:
  """{name: shape} of each array of the train state saved in `state_dir`, from its metadata; a
  DamagedCheckpoint if that does not read or an array it lists is not in the OCDBT database.
  The database is listed first: where orbax reads a missing array, its pending reads print
  tracebacks after the error."""
  if not files.exists(os.path.join(state_dir, "_METADATA")):
    raise DamagedCheckpoint("state/_METADATA is missing")
  try:
    base = (f"{state_dir}/" if files.is_uri(state_dir)  # tensorstore's own gcs or s3 driver
            else {"driver": "file", "path": state_dir + "/"})
    keys = ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()
  except Exception as e:  # tensorstore raises many types for unreadable files
    raise DamagedCheckpoint(_first_line(e)) from None
  if not keys:
    raise DamagedCheckpoint("its state database holds no array (state/manifest.ocdbt missing?)")
  try:
    tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir)).tree
  except Exception as e:  # orbax and tensorstore raise many types for unreadable files
    raise DamagedCheckpoint(_first_line(e)) from None
  arrays = {a.name: tuple(a.shape) for a in jax.tree.leaves(tree)}
  missing = sorted(set(arrays) - {k.decode().split("/")[0] for k in keys})
  if missing:
    raise DamagedCheckpoint(f"{len(missing)} of its {len(arrays)} arrays are not in its state "
                            f"database ({missing[0]}, ...)")
  return arrays


def _describe_difference(saved: dict[str, tuple], ours: dict[str, tuple]) -> str:
  def some(names):
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
  parts = []
  if only_saved := sorted(set(saved) - set(ours)):
    parts.append(f"only the checkpoint has {some(only_saved)}")
  if only_ours := sorted(set(ours) - set(saved)):
    parts.append(f"only this run has {some(only_ours)}")
  if reshaped := sorted(k for k in set(saved) & set(ours) if saved[k] != ours[k]):
    parts.append("other shapes: " + some([f"{k} {saved[k]} (this run: {ours[k]})"
                                          for k in reshaped]))
  return "; ".join(parts)


def _first_line(e: Exception) -> str:
  line = (str(e).strip().splitlines() or [type(e).__name__])[0]
  return line.split(" See full TensorStore details")[0][:200]


def saved_items(checkpoints_dir: str, step: int) -> set[str]:
  """The items checkpoint `step` was saved with (its orbax metadata lists them) that are on
  disk; a DamagedCheckpoint if the metadata is missing or a listed item is."""
  path = os.path.join(checkpoints_dir, str(step), "_CHECKPOINT_METADATA")
  try:
    listed = set(files.read_json(path)["item_handlers"])
  except (OSError, ValueError, KeyError, TypeError):
    raise DamagedCheckpoint("its _CHECKPOINT_METADATA is missing or unreadable") from None
  missing = sorted(i for i in listed if not _holds(checkpoints_dir, step, i))
  if missing:
    raise DamagedCheckpoint(f"its {', '.join(missing)} item is missing")
  return listed


def directory(workdir: str) -> str:
  """Where a workdir keeps its checkpoints."""
  return os.path.join(files.absolute(workdir), "checkpoints")


def _holds(checkpoints_dir: str, step: int, item: str) -> bool:
  """Whether checkpoint `step` has `item` (a vocabulary, data positions)."""
  return files.isdir(os.path.join(checkpoints_dir, str(step), item))


def newest_step(workdir: str) -> Optional[int]:
  """The step of the newest checkpoint in a workdir, or None."""
  if not files.isdir(directory(workdir)):
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
  workdir = files.absolute(workdir)
  probe = os.path.join(workdir, f".writable.{os.getpid()}")
  try:
    files.makedirs(workdir)
    files.write_atomic(probe, b"")
    files.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
  return workdir
