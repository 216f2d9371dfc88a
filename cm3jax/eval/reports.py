"""The scored reports a workdir keeps (eval_shapes, eval_tasks): the results as JSON and their
table as markdown, side by side. The best setting they measure is recorded by
cm3jax/sampling/defaults.py."""

import json
import os
from typing import Sequence

from cm3jax.core import files


def write(workdir: str, names: Sequence[str], results: dict, table: Sequence[str]):
  """WORKDIR/names[0] gets `results` as JSON, WORKDIR/names[1] the `table` lines."""
  json_path, markdown_path = (os.path.join(workdir, name) for name in names)
  files.write_json(json_path, results)
  files.write_atomic(markdown_path, "\n".join(table) + "\n")


def saved(workdir: str, names: Sequence[str]) -> dict:
  """The results `write` saved; {} when there are none."""
  try:
    return files.read_json(os.path.join(workdir, names[0]))
  except (OSError, json.JSONDecodeError):
    return {}
