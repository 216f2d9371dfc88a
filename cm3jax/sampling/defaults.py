"""The best measured sampling setting of each use (text->image, an instruction-tuned task), which
the reports (cm3jax/eval/) record in WORKDIR/sampling_defaults.json and `cm3jax.sample` and
`cm3jax.load` draw with unless told otherwise."""

import dataclasses
import os
from typing import Mapping, Optional

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.sampling import engine

SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"
SAMPLING_DEFAULTS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Measured:
  """The best measured setting of one use (text->image, an instruction-tuned task): the report
  row it came from and its score in each column of the report that scored it."""
  row: str  # as the report's table names it
  report: str  # the report's JSON file, in the workdir
  step: int
  scores: dict  # {column: share right}
  setting: engine.Setting

  def __post_init__(self):
    if not (isinstance(self.row, str) and isinstance(self.report, str)
            and isinstance(self.step, int) and isinstance(self.scores, dict)
            and all(isinstance(v, (int, float)) for v in self.scores.values())):
      raise TypeError("row and report must be strings, step an integer, scores {column: score}")

  def describe(self) -> str:
    return (f"row {self.row!r} of {self.report} at step {self.step}: "
            + ", ".join(f"{column} {score:.1%}" for column, score in self.scores.items()))


def text_to_image_use(retrieved: int) -> str:
  """The use that drawing from a caption with `retrieved` documents before it is recorded as."""
  return f"text_to_image, {retrieved} retrieved" if retrieved else "text_to_image"


def best(columns: Mapping[str, dict], rows: Mapping[str, engine.Setting], report: str
         ) -> Optional[Measured]:
  """Of `rows` ({row: its setting}) that every one of the report `columns` ({column: {row:
  score, "step": step, ...}}) scored, the one with the highest mean score, the first on a tie;
  None where there is none."""
  found = None
  for row, setting in rows.items():
    if not columns or not all(row in results for results in columns.values()):
      continue
    scores = {column: results[row] for column, results in columns.items()}
    if found is None or _mean(scores) > _mean(found.scores):
      step = next(iter(columns.values()))["step"]
      found = Measured(row, report, step, scores, setting)
  return found


def _mean(scores: dict) -> float:
  return sum(scores.values()) / len(scores)


def record_sampling_defaults(workdir: str, report: str, measured: Mapping[str, Measured]):
  """WORKDIR/SAMPLING_DEFAULTS_FILE with `measured` ({use: Measured}) in place of what `report`
  recorded before; what other reports recorded stays. A file that does not read is remade."""
  try:
    kept = {use: m for use, m in sampling_defaults(workdir).items() if m.report != report}
  except ConfigError:
    kept = {}
  defaults = {use: dataclasses.asdict(m) for use, m in {**kept, **measured}.items()}
  files.write_json(os.path.join(workdir, SAMPLING_DEFAULTS_FILE),
                   {"version": SAMPLING_DEFAULTS_VERSION, "defaults": defaults})


def sampling_defaults(workdir: str) -> dict[str, Measured]:
  """{use: Measured}, what the reports recorded in WORKDIR/SAMPLING_DEFAULTS_FILE; {} where there
  is no such file; a ConfigError, in one line, for a file that is not one this version writes."""
  path = os.path.join(workdir, SAMPLING_DEFAULTS_FILE)
  try:
    saved = files.read_json(path)
    if not isinstance(saved, dict) or saved.get("version") != SAMPLING_DEFAULTS_VERSION:
      raise ValueError(f"not version {SAMPLING_DEFAULTS_VERSION} of the format")
    return {use: Measured(**{**entry, "setting": engine.Setting(**entry["setting"])})
            for use, entry in saved["defaults"].items()}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError, TypeError, KeyError, AttributeError, ConfigError) as e:
    why = f"no field {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
    raise ConfigError(f"{path} is not a sampling-defaults file this version reads ({why}); "
                      "remake it with python -m cm3jax.eval_shapes, or delete it") from None
