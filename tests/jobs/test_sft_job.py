"""Instruction tuning end to end: the pipeline of configs/tiny_sft.py from a pretrained run (task
data, SFT from its parameters, the task report beside the baseline's), an exact resume, the
refusal of another model or vocabulary, and sample --task on what it trained."""

import collections
import json

import pytest

from cm3jax.config import ConfigError
from cm3jax.core import files
from cm3jax.prepare import train_tokenizer
from cm3jax.training import train
from tests.helpers import assert_one_line_error, load_config, override, run_module

pytestmark = pytest.mark.slow
SMALL = {"global_batch_size": 8, "log_every": 1, "eval_every": 0, "eval_steps": 1,
         "eval_samples": 0, "checkpoint_every": 3, "async_checkpointing": False, "optimizer.warmup_steps": 2}


@pytest.fixture(scope="module")
def base(small_codes, vqgan_workdir, tmp_path_factory):
  """A tiny.py run of 6 steps on shapes/small's codes: the pretrained model."""
  workdir = tmp_path_factory.mktemp("base")
  tokenizer = str(workdir / "tokenizer.model")
  files.write_atomic(tokenizer, train_tokenizer.train(
      train_tokenizer.read_sentences(small_codes, collections.Counter()), 320))
  config = override(load_config("tiny.py").get_config(), {
      **SMALL, "num_train_steps": 6, "cm3.codes_dir": small_codes, "cm3.tokenizer": tokenizer,
      "cm3.vqgan_workdir": vqgan_workdir})
  train.train(config, str(workdir))
  return workdir


def sft_args(workdir, base, *extra):
  return ("--config=configs/tiny_sft.py", f"--workdir={workdir}", f"--config.init_from={base}",
          "--config.sft.examples_per_task=8", "--config.report_examples=4",
          "--config.num_train_steps=6", *(f"--config.{k}={v}" for k, v in SMALL.items()), *extra)


@pytest.fixture(scope="module")
def sft_job(base, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft")
  result = run_module("cm3jax.pipeline", *sft_args(workdir, base))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stdout


def test_the_sft_pipeline_tunes_the_pretrained_run_and_reports_both(sft_job, base):
  workdir, out = sft_job
  for line in (f"[1/3] task data: making (0 of 3 splits in {workdir}/tasks)",
               "train: 56 records (8 caption, 8 edit, 8 grounded, 8 image2seg, 8 seg2image, "
               "8 text2image, 8 vqa)",
               "[2/3] token model: making", f"new run from the parameters of {base}",
               "train step 6: loss", "[3/3] report: making", "| edit, top-p 0.9, guided |",
               f"| task, decoding | {workdir.name} step 6, validation | {base.name} step 6, "
               "validation |", "| text_to_image, greedy, no guidance |"):
    assert line in out, out
  runs = json.load(open(workdir / "eval_tasks.json"))
  assert list(runs) == [f"{workdir}, validation", f"{base}, validation"]
  for results in runs.values():
    assert results["examples"] == 4
    assert {f"{t}, greedy" for t in ("edit", "grounded", "seg2image", "image2seg", "caption",
                                     "vqa", "text2image")} <= set(results)
    assert all(0 <= v <= 1 for v in results.values() if isinstance(v, float))
  saved = json.load(open(workdir / "checkpoints" / "6" / "config" / "metadata"))
  assert saved["cm3"]["tokenizer"] == str(base / "tokenizer.model")  # the base run's inputs
  again = run_module("cm3jax.pipeline", *sft_args(workdir, base))
  assert again.returncode == 0, again.stderr[-3000:]
  statuses = [l for l in again.stdout.splitlines() if l.startswith("[")]
  assert len(statuses) == 3 and all(": reusing (" in l for l in statuses), again.stdout


def sft_config(workdir, base, **overrides):
  c = override(load_config("tiny_sft.py").get_config(), {
      **SMALL, "init_from": str(base), "sft.tasks_dir": str(workdir / "tasks"),
      "num_train_steps": 6, **overrides})
  return c


def test_sft_resume_continues_exactly(sft_job, base, tmp_path):
  workdir, _ = sft_job
  straight = train.train(sft_config(workdir, base), str(tmp_path / "a"))
  train.train(sft_config(workdir, base, num_train_steps=3), str(tmp_path / "b"))
  resumed = train.train(sft_config(workdir, base), str(tmp_path / "b"))
  losses = lambda h: [(x["step"], x["loss"]) for x in h if "loss" in x]
  assert losses(resumed) == losses(straight)[3:] and [s for s, _ in losses(resumed)] == [4, 5, 6]


def test_sft_refuses_another_model_or_vocabulary(sft_job, base, tmp_path):
  workdir, _ = sft_job
  with pytest.raises(ConfigError, match=r"is another model: model.num_layers=4 \(this config: 2\)"):
    train.train(sft_config(workdir, base, **{"model.num_layers": 2}), str(tmp_path / "a"))
  with pytest.raises(ConfigError, match="was trained with another vocabulary"):
    train.train(sft_config(workdir, base, **{"cm3.max_spans": 8}), str(tmp_path / "b"))
  assert_one_line_error(
      run_module("cm3jax.pipeline", "--config=configs/tiny_sft.py", f"--workdir={tmp_path}/c",
                 "--config.init_from="), "cm3jax.pipeline",
      "an sft config starts from a pretrained run: set --config.init_from")
  assert_one_line_error(
      run_module("cm3jax.train", *sft_args(tmp_path / "d", base, "--config.sft.loss_on=inputs",
                                           f"--config.sft.tasks_dir={workdir}/tasks")),
      "cm3jax.train", "sft.loss_on='inputs' is not one of ['all', 'output']")


def test_sample_does_each_task(sft_job, tmp_path):
  from PIL import Image

  from cm3jax.data import shapes
  workdir, _ = sft_job
  Image.fromarray(shapes.example("validation", 0)["image"]).save(tmp_path / "in.png")
  image = f"--image={tmp_path}/in.png"
  sample = lambda *args: run_module("cm3jax.sample", f"--workdir={workdir}", *args)
  for task, extra in (("edit", ["--instruction=make the circle blue"]),
                      ("grounded", ["--prompt=a red circle", "--objects=red circle:2 2 14 14"]),
                      ("seg2image", ["--prompt=a red circle"]), ("image2seg", [])):
    out = tmp_path / f"{task}.png"
    extra = extra if task == "grounded" else [image] + extra
    result = sample(f"--task={task}", *extra, "--num_images=2", f"--out={out}", "--scale=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote 2 images of --task={task} to {out}" in result.stdout
    assert Image.open(out).size == (2 * 34 - 2, 32)
  result = sample("--task=vqa", image, "--question=what colour is the circle?")
  assert result.returncode == 0 and len(result.stdout.splitlines()) == 1, result.stderr[-3000:]
  assert_one_line_error(sample("--task=edit", image), "cm3jax.sample",
                        "--task=edit needs --instruction")
  assert_one_line_error(sample("--task=grounded", "--prompt=a", "--objects=red circle:1 2"),
                        "cm3jax.sample", "--objects item 'red circle:1 2' is not NAME:X0 Y0 X1 Y1")


def test_the_server_does_the_instruction_tuned_tasks(sft_job):
  import io

  import numpy as np
  from PIL import Image

  import cm3jax
  from cm3jax.data import shapes
  from tests.test_serve import pixels, serve, talk
  workdir, _ = sft_job
  run = cm3jax.load(str(workdir))
  service = serve(run)
  assert service.health()["tasks"][3:] == ["edit", "vqa", "image2seg", "seg2image", "grounded"]
  image = shapes.example("validation", 0)["image"]
  upload = io.BytesIO()
  Image.fromarray(image).save(upload, format="PNG")
  files = {"image": upload.getvalue()}

  async def ask(client):
    return [await client.post("/v1/tasks/edit", files=files,
                              data={"text": "make the circle blue", "seed": "2"}),
            await client.post("/v1/tasks/vqa", files=files, data={"text": "what colour?"}),
            await client.post("/v1/tasks/grounded", data={"text": "a red circle",
                                                          "objects": "red circle:2 2 14 14"}),
            await client.post("/v1/tasks/grounded", data={"text": "a red circle",
                                                          "objects": "red circle:2 2"})]
  edit, vqa, grounded, bad = talk(service, ask)
  assert edit.status_code == vqa.status_code == grounded.status_code == 200
  np.testing.assert_array_equal(pixels(edit.json()["image"]),
                                run.edit(image, ["make the circle blue"], seed=2)[0])
  assert vqa.json()["answer"] == run.vqa(image, ["what colour?"])[0]
  np.testing.assert_array_equal(pixels(grounded.json()["image"]), run.grounded(
      ["a red circle"], [[("red circle", (2, 2, 14, 14))]])[0])
  assert bad.status_code == 400 and "is not NAME:X0 Y0 X1 Y1" in bad.json()["error"]
