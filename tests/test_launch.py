"""launch/tpu_pod.sh, with a stand-in `gcloud` that records its arguments: what it starts on
every worker for a training run and for another command."""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def launch(tmp_path, *args) -> tuple[int, list[str]]:
  calls = tmp_path / "calls"
  gcloud = tmp_path / "bin" / "gcloud"
  gcloud.parent.mkdir(parents=True)
  gcloud.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n')
  gcloud.chmod(0o755)
  env = dict(os.environ, PATH=f"{gcloud.parent}:{os.environ['PATH']}")
  done = subprocess.run(["bash", str(REPO / "launch" / "tpu_pod.sh"), *args], env=env,
                        capture_output=True, text=True)
  return done.returncode, calls.read_text().splitlines() if calls.exists() else []


def started(calls: list[str]) -> str:
  """The command line the workers run."""
  return next(c for c in calls if "nohup" in c).split(">")[0].strip()


@pytest.mark.parametrize("args, command, log", [
    (("configs/7b.py", "gs://b/run", "--config.num_train_steps=10"),
     "cm3jax.train --config=configs/7b.py --workdir=gs://b/run --multihost "
     "--config.num_train_steps=10", "train.log"),
    (("tokenize_images", "--vqgan_workdir=gs://b/vq", "--out=gs://b/codes"),
     "cm3jax.tokenize_images --multihost --vqgan_workdir=gs://b/vq --out=gs://b/codes",
     "tokenize_images.log"),
])
def test_a_command_on_every_worker(tmp_path, args, command, log):
  """A config file trains it; another third argument names the command."""
  rc, calls = launch(tmp_path, "tpu", "zone", *args)
  assert rc == 0
  assert started(calls) == f"nohup python3 -m {command}"
  assert calls[-1].endswith(f"tail -f ~/cm3jax/{log}")


def test_too_few_arguments_print_the_usage(tmp_path):
  for args in (("tpu", "zone"), ("tpu", "zone", "configs/7b.py")):
    rc, calls = launch(tmp_path / str(len(args)), *args)
    assert rc == 2 and not calls
