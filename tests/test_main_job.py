"""The README's main job on shapes/small: every stage from the command line, reuse on a re-run,
then the sample and eval_shapes commands on what it trained."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=600)


def train(workdir, data_dir, vqgan_workdir, steps, *extra):
  return run("cm3jax.train", "--config=configs/tiny.py", f"--workdir={workdir}",
             "--config.cm3.dataset=shapes/small", f"--config.cm3.data_dir={data_dir}",
             f"--config.cm3.vqgan_workdir={vqgan_workdir}", f"--config.num_train_steps={steps}",
             "--config.log_every=10", "--config.eval_every=20", "--config.checkpoint_every=20",
             "--config.eval_steps=2", "--config.optimizer.warmup_steps=5", *extra)


@pytest.fixture(scope="module")
def main_job(shapes_data_dir, vqgan_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  first = train(workdir, shapes_data_dir, vqgan_workdir, 40)
  assert first.returncode == 0, first.stderr[-3000:]
  return workdir, first.stdout


def test_every_stage_runs_and_the_validation_loss_falls(main_job):
  workdir, out = main_job
  for line in ("[data 1/3] image tokenizer: found", "[data 2/3] image codes: train: 512 records",
               "[data 2/3] image codes: test: 128 records",
               "[data 3/3] text tokenizer: trained", "[data 3/3] vocabulary:",
               "train step 40: loss", "samples:"):
    assert line in out, out
  evals = [float(l.split("loss ")[1].split()[0]) for l in out.splitlines()
           if l.startswith("eval step")]
  assert len(evals) == 2 and evals[1] < evals[0]
  assert os.path.getsize(workdir / "samples.png") > 0
  assert len((workdir / "captions.txt").read_text().splitlines()) == 12
  assert os.path.isdir(workdir / "checkpoints" / "40" / "vocab")
  assert json.load(open(workdir / "checkpoints" / "40" / "data" / "metadata"))["positions"]


def test_a_rerun_reuses_every_stage_and_resumes(main_job, shapes_data_dir, vqgan_workdir):
  workdir, _ = main_job
  again = train(workdir, shapes_data_dir, vqgan_workdir, 50)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "[data 2/3] image codes: found" in again.stdout
  assert "[data 3/3] text tokenizer: found" in again.stdout
  assert "resumed from step 40" in again.stdout and "train step 50: loss" in again.stdout


def test_sample_writes_a_grid_and_captions_an_image(main_job, tmp_path):
  workdir, _ = main_job
  out = tmp_path / "grid.png"
  result = run("cm3jax.sample", f"--workdir={workdir}", "--prompt=a red circle in the center",
               "--num_images=3", "--cfg=2.0", f"--out={out}", "--scale=2")
  assert result.returncode == 0, result.stderr[-3000:]
  from PIL import Image
  assert Image.open(out).size == ((3 * 34 - 2) * 2, 32 * 2)

  from cm3jax.data import shapes
  Image.fromarray(shapes.example("test", 0)["image"]).save(tmp_path / "image.png")
  result = run("cm3jax.sample", f"--workdir={workdir}", f"--image={tmp_path}/image.png",
               "--num_captions=2", "--cd_k=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(result.stdout.strip().splitlines()) == 2


def test_eval_shapes_scores_the_test_split(main_job):
  workdir, _ = main_job
  result = run("cm3jax.eval_shapes", f"--workdir={workdir}", "--num_examples=16")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| text_to_image, top-p 0.9, CFG 3 |" in result.stdout
  saved = json.load(open(workdir / "eval_shapes_test.json"))
  assert saved["examples"] == 16
  assert all(0 <= v <= 1 for v in saved.values() if isinstance(v, float))
  assert {"VQGAN reconstructions", "text_to_image, greedy, no guidance",
          "text_to_image, top-p 0.9, CFG 1.5", "text_to_image, CD-K (k=1, alpha=0.1)",
          "image_to_text, greedy"} <= set(saved)


def _one_line_error(result, tool, message):
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith(f"{tool}: error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


def test_bad_input_to_the_commands(main_job, tmp_path, shapes_data_dir, vqgan_workdir):
  workdir, _ = main_job
  _one_line_error(run("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a"), "cm3jax.sample",
                  "no checkpoints in")
  _one_line_error(run("cm3jax.sample", f"--workdir={workdir}", f"--image={tmp_path}/none.png"),
                  "cm3jax.sample", "cannot read")
  _one_line_error(run("cm3jax.sample", f"--workdir={workdir}", "--prompt=a", "--top_p=1.5"),
                  "cm3jax.sample", "top_p must be in (0, 1]")
  _one_line_error(run("cm3jax.sample", f"--workdir={workdir}"), "cm3jax.sample",
                  "--workdir and one of --prompt or --image are required")
  _one_line_error(run("cm3jax.eval_shapes", f"--workdir={tmp_path}"), "cm3jax.eval_shapes",
                  "no checkpoints in")
  _one_line_error(train(tmp_path / "small", shapes_data_dir, vqgan_workdir, 2,
                        f"--config.cm3.codes_dir={workdir}/codes",
                        f"--config.cm3.tokenizer={workdir}/tokenizer.model",
                        "--config.model.vocab_size=256"),
                  "cm3jax.train", "model.vocab_size=256 is smaller than the vocabulary")
