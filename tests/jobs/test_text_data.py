"""The text_tiny job from the command line: pipeline, sample --task=continue and infill."""

import pytest

from tests.helpers import assert_one_line_error, run_module

pytestmark = pytest.mark.slow


def test_text_tiny_job_trains_and_samples_from_the_command_line(tmp_path):
  workdir = tmp_path / "text_tiny"
  run = run_module("cm3jax.pipeline", "--config=configs/text_tiny.py", f"--workdir={workdir}",
                   "--config.num_train_steps=40", "--config.log_every=10",
                   "--config.eval_every=20", "--config.checkpoint_every=20",
                   "--config.eval_steps=2", "--config.optimizer.warmup_steps=5")
  assert run.returncode == 0, run.stderr[-3000:]
  for line in (f"[1/3] text records: making (0 of 3 splits in {workdir}/codes)",
               "train: 20000 text records", "[2/3] text tokenizer: done",
               "[3/3] token model: done", "train step 40: loss"):
    assert line in run.stdout, run.stdout
  evals = [float(l.split("loss ")[1].split()[0]) for l in run.stdout.splitlines()
           if l.startswith("eval step")]
  assert len(evals) == 2 and evals[1] < evals[0]
  prompt = "a small red circle above a large blue square, so"
  go = run_module("cm3jax.sample", f"--workdir={workdir}", "--task=continue",
                  f"--prompt={prompt}", "--greedy", "--max_tokens=12")
  assert go.returncode == 0, go.stderr[-2000:]
  assert go.stdout.startswith(prompt) and len(go.stdout.strip()) > len(prompt)
  filled = run_module("cm3jax.sample", f"--workdir={workdir}", "--task=infill", "--greedy",
                      "--page=a small <mask> above a large blue square.", "--max_tokens=8")
  assert filled.returncode == 0, filled.stderr[-2000:]
  assert filled.stdout.startswith("a small ") and "above a large blue square." in filled.stdout
  refused = run_module("cm3jax.sample", f"--workdir={workdir}", f"--prompt={prompt}")
  assert_one_line_error(refused, "cm3jax.sample", f"{workdir} is a text-only model (no image "
                        "codes): sample it with --task=infill or --task=continue")
