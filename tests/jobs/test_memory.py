"""The build_memory and build_neighbours commands: a bank killed and resumed, and bad input."""

import os
import subprocess
import sys

import pytest

from cm3jax.retrieval import memory
from tests.helpers import REPO, assert_one_line_error, command_env, run_module

pytestmark = pytest.mark.slow


def test_a_bank_killed_after_3_of_6_shards_resumes_and_refuses_another_split(
    retriever_workdir, vqgan_workdir, small_codes, tmp_path):
  """Killed after bank shard 3 of 6 (one per code file), the bank resumes after the shards it
  has, and refuses to resume them as another split's."""
  args = [f"--retriever={retriever_workdir}", f"--codes={small_codes}", f"--vqgan={vqgan_workdir}",
          f"--out={tmp_path}/bank", "--batch_size=32"]
  process = subprocess.Popen(
      [sys.executable, "-m", "cm3jax.build_memory", *args], cwd=REPO,
      env=command_env(), text=True, stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL)
  seen = ""
  for line in process.stdout:
    seen += line
    if line.startswith("bank shard 3/6"):
      process.kill()
      break
  process.wait()
  assert "bank shard 3/6" in seen and not os.path.exists(tmp_path / "bank" / memory.MANIFEST), seen
  assert_one_line_error(run_module("cm3jax.build_memory", *args, "--split=validation"),
                        "cm3jax.build_memory", f"the 3 shards of memory bank {tmp_path}/bank: made "
                        "with split='train' (this run: 'validation')")
  resumed = run_module("cm3jax.build_memory", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "this host embeds 6, 3 already done" in resumed.stdout
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
