"""`cm3jax.tokenize_images --multihost` as a pod runs it: two real processes on this machine,
joined by jax.distributed on localhost (found as a SLURM job is), tokenize one webdataset split
into one directory, and rerun after one is killed midway."""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cm3jax.data import code_shards
from tests.helpers import command_env
from tests.test_image_captions import encoded, write_tar

pytestmark = pytest.mark.slow
SHARDS, PER_SHARD = 7, 5  # input tars and samples in each


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(vqgan_workdir, data, out, port) -> list[subprocess.Popen]:
  command = [sys.executable, "-m", "cm3jax.tokenize_images", f"--vqgan_workdir={vqgan_workdir}",
             f"--out={out}", f"--dataset=wds:{data}/{{0..{SHARDS - 1}}}.tar", "--splits=train",
             "--shard_size=3", "--batch_size=2", "--multihost"]
  processes = []
  for host in range(2):
    env = dict(command_env(), SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost",
               SLURM_NTASKS="2", SLURM_PROCID=str(host), SLURM_LOCALID=str(host),
               JAX_COORDINATOR_PORT=str(port))
    processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
  return processes


def finish(processes) -> list[str]:
  outputs = [p.communicate(timeout=300)[0] for p in processes]
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
  return outputs


def check_split(out, expected_keys):
  """Every record once, in the files the manifest lists, whose counts add up."""
  manifest = code_shards.read_manifest(str(out), "train")
  paths, counts = code_shards.shard_files(str(out), "train")
  keys = list(code_shards.keys(paths))
  assert sorted(keys) == sorted(expected_keys)
  assert manifest["records"] == sum(counts) == len(keys) and manifest["hosts"] == 2
  assert manifest["shards"] == len(paths) and manifest["skipped"] == {"sample without a .txt "
                                                                      "caption": SHARDS}
  assert {os.path.basename(p).split("-")[1] for p in paths} == {"host00000", "host00001"}
  return manifest


def test_two_hosts_tokenize_one_split_and_resume_after_a_kill(vqgan_workdir, tmp_path):
  data = tmp_path / "wds"
  data.mkdir()
  expected = []
  for shard in range(SHARDS):
    members = []
    for i in range(PER_SHARD):
      members += [(f"{i}.png", encoded("PNG", shard * PER_SHARD + i)),
                  (f"{i}.txt", f"shape {shard} {i}".encode())]
      expected.append(f"{shard}.tar/{i}".encode())
    write_tar(data / f"{shard}.tar", members + [(f"{PER_SHARD}.png", encoded("PNG"))])

  outputs = finish(start(vqgan_workdir, data, tmp_path / "whole", free_port()))
  whole = check_split(tmp_path / "whole", expected)
  assert f"train: {SHARDS * PER_SHARD} records in {whole['shards']} shards" in outputs[0]
  assert "host 1 of 2's part of train:" in outputs[1]

  # Host 1 killed once it has written a shard; host 0 then stops too, as a pod's job does.
  out = tmp_path / "killed"
  processes = start(vqgan_workdir, data, out, free_port())
  first = out / "train-host00001-00000.tfrecord"
  deadline = time.time() + 240
  while not first.exists() and time.time() < deadline and processes[1].poll() is None:
    time.sleep(0.05)
  assert first.exists(), processes[1].communicate()[0][-3000:]
  for p in processes[::-1]:
    p.send_signal(signal.SIGKILL)
    p.wait()
  written = {p.name: p.stat().st_mtime_ns for p in out.glob("train-host*.tfrecord")}
  finish(start(vqgan_workdir, data, out, free_port()))
  resumed = check_split(out, expected)
  assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-host*.tfrecord")
          if p.name in written} == written  # whole shards are kept, not written again
  assert resumed["shard_records"] == whole["shard_records"]
  assert np.array_equal(sorted(code_shards.keys(code_shards.shard_paths(str(out), "train"))),
                        sorted(expected))
