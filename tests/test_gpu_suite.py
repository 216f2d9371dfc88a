"""benchmarks/gpu_suite.sh, at tiny sizes on the CPU: the one call a lent GPU gets runs every
part and writes its table (the peer, which needs CUDA, is left out here)."""

import os
import subprocess

import pytest

from tests import helpers


@pytest.mark.slow
def test_the_gpu_suite_writes_one_table_of_every_part(tmp_path):
  env = dict(helpers.command_env(), PEER_TORCH=str(tmp_path / "no_peer.py"))
  result = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path), "tiny"],
                          cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  table = (tmp_path / "gpu_suite.md").read_text()
  assert f"peer: no {tmp_path / 'no_peer.py'}" in table
  rows = [l for l in table.splitlines() if l.startswith("| training") or l.startswith("| sampling")]
  assert len(rows) == 5, table
  assert " tokens/s | no figures |" in rows[0] and "MFU" in rows[0]
  settings = [(r.split("phases ")[1].split(",")[0], r.split(", ")[3].split()[0]) for r in rows[1:]]
  assert settings == [("0", "none"), ("16", "none"), ("0", "int8"), ("16", "int8")]
  megabytes = [float(r.split("weights (")[1].split(" MB")[0]) for r in rows[1:]]
  assert megabytes[2] <= 0.55 * megabytes[0]
  assert all("x its HBM floor" in r for r in rows[1:])
  assert os.path.getsize(tmp_path / "train.txt") and os.path.getsize(tmp_path / "sample.txt")
