"""What made an output: recorded with it, compared on every reuse or resume.

A writer whose output can be reused or resumed (code and task shards, the memory bank, the
neighbours) describes what made it in one flat dict, its `made_by`: its inputs' identities and
fingerprints and the settings that change its contents. The dict is recorded before the first
piece is written (`start`, for a resume) and in the manifest written last (for a reuse); `check`
compares a recorded one with this run's and refuses a difference in one line that names each
field that differs. `fingerprint` names a made_by (or a model's weights) in 16 hex digits, so
that an output made from another records which one it was made from.
"""

import hashlib
import json
import os

import jax
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.core import files

FINGERPRINT = "fingerprint"  # the manifest field that holds fingerprint(made_by)


def fingerprint(made_by: dict) -> str:
  return hashlib.sha256(json.dumps(made_by, sort_keys=True).encode()).hexdigest()[:16]


def params_fingerprint(params) -> str:
  """Names a model's weights (a retriever's, a VQGAN's)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf, np.float32).tobytes())
  return digest.hexdigest()[:16]


def differences(recorded: dict, made_by: dict) -> list[str]:
  """`field=recorded (this run: value)` for each field of `made_by` that `recorded` holds
  otherwise (compared as JSON, so a tuple equals the list it is recorded as). A field that
  `recorded` lacks is unknown, not a difference: an output made before cm3jax recorded it is
  reused as before."""
  made_by = json.loads(json.dumps(made_by))
  return [f"{k}={recorded[k]!r} (this run: {v!r})" for k, v in made_by.items()
          if k in recorded and recorded[k] != v]


def check(recorded: dict, made_by: dict, what: str, remedy: str):
  """Refuses `what` (an output, in words) when `recorded` differs from this run's `made_by`."""
  diffs = differences(recorded, made_by)
  if diffs:
    raise ConfigError(f"{what}: made with " + ", ".join(diffs) + f"; {remedy}")


def start(path: str, made_by: dict, what: str, started: bool, remedy: str):
  """Before a writer's first piece: records `made_by` at `path` when nothing of the output is
  written yet (not `started`); otherwise refuses to resume pieces that something else made.
  Every host of a sharded writer may call it: they record the same dict."""
  if not started:
    files.write_json(path, made_by)
    return
  try:
    recorded = files.read_json(path)
  except (OSError, ValueError):
    raise ConfigError(f"{what}: no record of what made them ({os.path.basename(path)}); "
                      f"{remedy}") from None
  check(recorded, made_by, what, remedy)
