"""The README's main job on shapes/small: every stage of the pipeline from the command line,
reuse and resumption on a re-run, then the sample and eval_shapes commands on what it trained,
and the one-line refusals of cm3jax.train and cm3jax.pipeline when an input is missing."""

import json
import os

import pytest

from cm3jax.training import faults
from tests.helpers import assert_one_line_error, run_module

pytestmark = pytest.mark.slow


def pipeline(workdir, data_dir, vqgan_workdir, steps, *extra):
  return run_module("cm3jax.pipeline", "--config=configs/tiny.py", f"--workdir={workdir}",
                    "--config.cm3.dataset=shapes/small", f"--config.cm3.data_dir={data_dir}",
                    f"--config.cm3.vqgan_workdir={vqgan_workdir}",
                    f"--config.num_train_steps={steps}", "--config.log_every=10",
                    "--config.eval_every=20", "--config.checkpoint_every=20",
                    "--config.eval_steps=2", "--config.optimizer.warmup_steps=5",
                    "--config.report_examples=16", *extra)


@pytest.fixture(scope="module")
def main_job(shapes_data_dir, vqgan_workdir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny")
  first = pipeline(workdir, shapes_data_dir, vqgan_workdir, 40)
  assert first.returncode == 0, first.stderr[-3000:]
  return workdir, first.stdout


def test_every_stage_runs_and_the_validation_loss_falls(main_job, vqgan_workdir):
  workdir, out = main_job
  for line in (f"[1/5] image tokenizer: reusing ({vqgan_workdir} at step 6 of 6)",
               f"[2/5] image codes: making (0 of 3 splits in {workdir}/codes)",
               "train: 512 records", "test: 128 records", "[3/5] text tokenizer: making",
               "[3/5] text tokenizer: done", "[4/5] token model: making",
               "train step 40: loss", "[4/5] token model: done", "[5/5] report: making",
               "| text_to_image, greedy, no guidance |", "[5/5] report: done"):
    assert line in out, out
  evals = [float(l.split("loss ")[1].split()[0]) for l in out.splitlines()
           if l.startswith("eval step")]
  assert len(evals) == 2 and evals[1] < evals[0]
  assert os.path.getsize(workdir / "samples.png") > 0
  assert len((workdir / "captions.txt").read_text().splitlines()) == 12
  report = json.load(open(workdir / "eval_shapes.json"))
  for split in ("validation", "test"):
    assert report[split]["step"] == 40 and report[split]["examples"] == 16
    assert report[split]["split"] == split
  table = (workdir / "eval_shapes.md").read_text()
  assert "| task, sampling | validation (seen compositions) | test (held-out compositions) |" in table
  assert out.endswith(table), out[-2000:]  # the job ends by printing the report
  assert os.path.isdir(workdir / "checkpoints" / "40" / "vocab")
  assert json.load(open(workdir / "checkpoints" / "40" / "data" / "metadata"))["positions"]


def test_a_rerun_resumes_what_is_partial_and_reuses_the_rest(main_job, shapes_data_dir,
                                                             vqgan_workdir):
  workdir, _ = main_job
  again = pipeline(workdir, shapes_data_dir, vqgan_workdir, 50)
  assert again.returncode == 0, again.stderr[-3000:]
  for line in ("[1/5] image tokenizer: reusing", "[2/5] image codes: reusing",
               "[3/5] text tokenizer: reusing", "[4/5] token model: resuming (step 40 of 50)",
               "resumed from step 40", "train step 50: loss", "[5/5] report: making"):
    assert line in again.stdout, again.stdout
  assert json.load(open(workdir / "eval_shapes.json"))["test"]["step"] == 50
  done = pipeline(workdir, shapes_data_dir, vqgan_workdir, 50)
  assert done.returncode == 0, done.stderr[-3000:]
  statuses = [l for l in done.stdout.splitlines() if l.startswith("[")]
  assert len(statuses) == 5 and all(": reusing (" in l for l in statuses), done.stdout


def test_sample_writes_a_grid_and_captions_an_image(main_job, tmp_path):
  workdir, _ = main_job
  out = tmp_path / "grid.png"
  result = run_module("cm3jax.sample", f"--workdir={workdir}",
                      "--prompt=a red circle in the center", "--num_images=3", "--cfg=2.0",
                      f"--out={out}", "--scale=2")
  assert result.returncode == 0, result.stderr[-3000:]
  from PIL import Image
  assert Image.open(out).size == ((3 * 34 - 2) * 2, 32 * 2)

  from cm3jax.data import shapes
  Image.fromarray(shapes.example("test", 0)["image"]).save(tmp_path / "image.png")
  result = run_module("cm3jax.sample", f"--workdir={workdir}", f"--image={tmp_path}/image.png",
                      "--num_captions=2", "--cd_k=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(result.stdout.strip().splitlines()) == 2


def test_eval_shapes_scores_the_test_split(main_job, retriever_workdir, tmp_path):
  workdir, _ = main_job
  result = run_module("cm3jax.eval_shapes", f"--workdir={workdir}", "--num_examples=16",
                      "--splits=test", f"--retriever={retriever_workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| text_to_image, top-p 0.9, best of 8 by the retriever's score |" in result.stdout
  assert "| text_to_image, top-p 0.9, CFG 3 |" in result.stdout
  assert "| task, sampling | test (held-out compositions) |" in result.stdout
  saved = json.load(open(workdir / "eval_shapes.json"))
  assert list(saved) == ["test"] and saved["test"]["examples"] == 16
  assert all(0 <= v <= 1 for v in saved["test"].values() if isinstance(v, float))
  assert {"VQGAN reconstructions", "text_to_image, greedy, no guidance",
          "text_to_image, top-p 0.9, CFG 1.5", "text_to_image, CD-K (k=1, alpha=0.1)",
          "text_to_image, top-p 0.9, best of 8 by the caption's likelihood",
          "image_to_text, greedy"} <= set(saved["test"])
  assert_one_line_error(run_module("cm3jax.eval_shapes", f"--workdir={workdir}",
                                   "--splits=train"), "cm3jax.eval_shapes",
                        "each must be one of ['validation', 'test']")


def test_no_train_or_validation_record_holds_a_held_out_pair(main_job):
  from cm3jax.data import code_shards, shapes
  workdir, _ = main_job
  pairs = {split: [{(t.colour, t.shape) for t in shapes.parse_caption(c).things}
                   for c in code_shards.read_split(str(workdir / "codes"), split, 10**6)[1]]
           for split in ("train", "validation", "test")}
  assert len(pairs["train"]) == 512 and len(pairs["validation"]) == 128
  held_out = set(shapes.HELD_OUT)
  assert not any(p & held_out for p in pairs["train"] + pairs["validation"])
  assert all(p & held_out for p in pairs["test"])


def test_tensorboard_shows_samples_and_captions_at_each_evaluation(main_job):
  from cm3jax.data import tf_cpu
  tf = tf_cpu.tensorflow()
  workdir, _ = main_job
  seen = {}
  for path in (workdir / "tensorboard").glob("events.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        seen.setdefault(value.tag, set()).add(event.step)
  evaluations = {20, 40}  # and 50 once the re-run test has run
  assert evaluations <= seen.get("eval/samples", set()), seen  # the grid of images
  for text in ("eval/samples/text_summary", "eval/captions/text_summary"):
    assert evaluations <= seen.get(text, set()), seen


def test_bad_input_to_the_commands(main_job, tmp_path):
  workdir, _ = main_job
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a"),
                        "cm3jax.sample", "no checkpoints in")
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={workdir}",
                                   f"--image={tmp_path}/none.png"), "cm3jax.sample", "cannot read")
  (tmp_path / "notes.png").write_text("not an image")
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={workdir}",
                                   f"--image={tmp_path}/notes.png"), "cm3jax.sample",
                        "notes.png: not an image PIL can decode")
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={workdir}", "--prompt=a",
                                   "--top_p=1.5"), "cm3jax.sample", "top_p must be in (0, 1]")
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={workdir}"), "cm3jax.sample",
                        "--workdir and one of --prompt, --image or --task are required")
  assert_one_line_error(run_module("cm3jax.eval_shapes", f"--workdir={tmp_path}"),
                        "cm3jax.eval_shapes", "no checkpoints in")
  assert_one_line_error(
      run_module("cm3jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}/small",
                 f"--config.cm3.codes_dir={workdir}/codes",
                 f"--config.cm3.tokenizer={workdir}/tokenizer.model",
                 "--config.model.vocab_size=256"),
      "cm3jax.train", "model.vocab_size=256 is smaller than the vocabulary")


def written(workdir) -> list[str]:
  """What a command left in `workdir`, less the lock's guard (faults.take_lock)."""
  return [f for f in os.listdir(workdir) if f != faults.LOCK_NAME + faults.GUARD_SUFFIX]


def test_train_refuses_missing_inputs_and_names_the_command_that_makes_them(tmp_path):
  """cm3jax.train trains the token model only: it makes no input, and a paper config pointed at
  real data with no codes yet trains nothing (no shapes VQGAN behind the user's back)."""
  assert_one_line_error(
      run_module("cm3jax.train", "--config=configs/350m.py", "--config.data=cm3",
                 "--config.cm3.dataset=coco:captions_{split}2017.json", f"--workdir={tmp_path}"),
      "cm3jax.train", f"no complete train split of image codes in {tmp_path}/codes "
      "(cm3.codes_dir): make them with python -m cm3jax.tokenize_images")
  assert written(tmp_path) == []
  assert_one_line_error(
      run_module("cm3jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path}"),
      "cm3jax.train", "or run every stage with python -m cm3jax.pipeline")


def test_the_pipeline_trains_a_vqgan_on_shapes_only(tmp_path):
  assert_one_line_error(
      run_module("cm3jax.pipeline", "--config=configs/350m.py", "--config.data=cm3",
                 "--config.cm3.dataset=coco:captions_{split}2017.json", f"--workdir={tmp_path}"),
      "cm3jax.pipeline", "the pipeline trains one on the shapes data only "
      "(cm3.dataset='coco:captions_{split}2017.json'): train one with python -m cm3jax.train_vqgan")
  assert written(tmp_path) == []
  assert_one_line_error(
      run_module("cm3jax.pipeline", "--config=configs/350m.py", f"--workdir={tmp_path}"),
      "cm3jax.pipeline", "the pipeline makes the inputs of data='cm3'")


def test_the_library_api_draws_and_captions_with_the_measured_setting(main_job):
  import jax
  import numpy as np

  import cm3jax
  from cm3jax.sampling import defaults, engine
  workdir, _ = main_job
  run = cm3jax.load(str(workdir))
  measured, chosen = defaults.sampling_defaults(str(workdir))["text_to_image"].setting, run.setting()
  assert (chosen.config, chosen.guidance, chosen.candidates, chosen.rerank_by) == (
      measured.config, measured.guidance, measured.candidates, measured.rerank_by)
  assert run.setting(cfg=3.0).guidance == 3.0 and run.setting(top_p=0.5).config.top_p == 0.5
  assert run.setting(rerank=1).candidates == 1
  captions = ["a red circle above a blue square", "a small green triangle at the top"]
  images = run.text_to_image(captions, num_images=2, guidance=2.0, rerank=1, seed=3)
  resolution = run.vqgan.cfg.resolution
  assert images.dtype == np.uint8 and images.shape == (2, 2, resolution, resolution, 3)
  setting = run.setting(cfg=2.0, rerank=1)
  codes = engine.text_to_image_reranked(
      run.sampler, [captions[0], captions[0], captions[1], captions[1]], 1,
      run.vqgan.cfg.tokens_per_image, jax.random.split(jax.random.PRNGKey(3), 4), 2.0,
      setting.config)
  np.testing.assert_array_equal(images.reshape(4, resolution, resolution, 3),
                                run.vqgan.decode(codes))
  assert run.caption(images[0]) == engine.caption_images(
      run.sampler, run.vqgan.encode(images[0]), jax.random.PRNGKey(0))
  assert all(isinstance(t, str) for t in run.continue_text(["a red"]))
  for bad in ([], "a red circle", [1]):
    with pytest.raises(cm3jax.RequestError, match="a non-empty list of strings"):
      run.text_to_image(bad)
  for bad in (images[0].astype(np.float32), images[0, 0, 0], images[:0, 0]):
    with pytest.raises(ValueError, match="images must be uint8"):
      run.caption(bad)
