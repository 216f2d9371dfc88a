"""The scored reports a workdir keeps (eval_shapes, eval_tasks): the results as JSON and their
table as markdown, side by side. The best setting they measure is recorded by
cm3jax/sampling/defaults.py."""

import json
import os
from typing import Sequence




def write(workdir: str, files: Sequence[str], results: dict, table: Sequence[str]):
  """WORKDIR/files[0] gets `results` as JSON, WORKDIR/files[1] the `table` lines."""
  json_path, markdown_path = (os.path.join(workdir, f) for f in files)
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1)
  with open(markdown_path, "w") as f:
    f.write("\n".join(table) + "\n")


def saved(workdir: str, files: Sequence[str]) -> dict:
  """The results `write` saved; {} when there are none."""
  try:
    with open(os.path.join(workdir, files[0])) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return {}
