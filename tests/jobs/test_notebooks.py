"""The notebooks' code cells run as written (shell and magic lines are left to Colab)."""

import glob
import json
import os

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
  cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
  source = "\n".join("".join(c["source"]) for c in cells)
  source = source.replace('WORKDIR = "workdirs/quickstart"', f'WORKDIR = "{tmp_path}"')
  assert str(tmp_path) in source
  monkeypatch.chdir(REPO)
  exec(compile(source, path, "exec"), {"__name__": "__notebook__"})
  out = capsys.readouterr().out
  assert "probability on the true successors" in out
  probability = float(out.split("probability on the true successors: ")[1].split()[0])
  assert probability > 0.8
