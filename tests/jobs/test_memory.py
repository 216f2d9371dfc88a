"""The build_memory and build_neighbours commands: a bank killed and resumed, and bad input."""

import os
import subprocess
import sys

import pytest

from cm3jax.retrieval import memory
from tests.helpers import REPO, assert_one_line_error, command_env, run_module

pytestmark = pytest.mark.slow


def test_a_bank_killed_after_3_of_8_shards_refuses_another_shard_size(
    retriever_workdir, vqgan_workdir, small_codes, tmp_path):
  """The issue's repro: killed after shard 3 of 8, rerun with another --shard_size (before: 404
  documents of 512, nothing reported skipped)."""
  args = [f"--retriever={retriever_workdir}", f"--codes={small_codes}", f"--vqgan={vqgan_workdir}",
          f"--out={tmp_path}/bank", "--batch_size=32"]
  process = subprocess.Popen(
      [sys.executable, "-m", "cm3jax.build_memory", *args, "--shard_size=64"], cwd=REPO,
      env=command_env(), text=True, stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL)
  seen = ""
  for line in process.stdout:
    seen += line
    if line.startswith("bank shard 3/8"):
      process.kill()
      break
  process.wait()
  assert "bank shard 3/8" in seen and not os.path.exists(tmp_path / "bank" / memory.MANIFEST), seen
  assert_one_line_error(run_module("cm3jax.build_memory", *args, "--shard_size=100"),
                        "cm3jax.build_memory", f"the 3 shards of memory bank {tmp_path}/bank: made "
                        "with shard_size=64 (this run: 100); run with the retriever")
  resumed = run_module("cm3jax.build_memory", *args, "--shard_size=64")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "this host: 8, 3 already written" in resumed.stdout
  assert "memory bank" in resumed.stdout and ": 512 documents of" in resumed.stdout


def test_bad_input_to_the_commands(tmp_path, retriever_workdir, small_codes, vqgan_workdir):
  result = run_module("cm3jax.build_memory", f"--retriever={retriever_workdir}",
                      f"--codes={small_codes}", f"--out={tmp_path}")
  assert_one_line_error(result, "cm3jax.build_memory", "--vqgan is required")
  result = run_module("cm3jax.build_memory", f"--retriever={tmp_path}/nothing.pt",
                      f"--codes={small_codes}", f"--vqgan={vqgan_workdir}", f"--out={tmp_path}")
  assert_one_line_error(result, "cm3jax.build_memory", "no CLIP checkpoint")
  result = run_module("cm3jax.build_neighbours", f"--retriever={retriever_workdir}",
                      f"--memory={tmp_path}", f"--codes={small_codes}",
                      f"--vqgan={vqgan_workdir}", f"--out={tmp_path}/n")
  assert_one_line_error(result, "cm3jax.build_neighbours", "holds no complete memory bank")
