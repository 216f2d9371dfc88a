"""The retrieval-augmented job of configs/tiny_ra.py from the command line: the pipeline's three
retrieval stages (retriever, memory bank, neighbours) before the token model and the report of
both conditions, then sample and eval_shapes with retrieval and their one-line refusals, and the
library API's documents and drawing with them."""

import json
import os

import jax
import numpy as np
import pytest

import cm3jax
from cm3jax.retrieval import augment, neighbours
from cm3jax.sampling import engine
from tests.helpers import assert_one_line_error, run_module

pytestmark = pytest.mark.slow


def test_the_pipeline_with_retrieval_runs_its_three_stages_and_trains_on_neighbours(
    shapes_data_dir, vqgan_workdir, retriever_workdir, tmp_path, monkeypatch):
  workdir = tmp_path / "ra"
  result = run_module(
      "cm3jax.pipeline", "--config=configs/tiny_ra.py", f"--workdir={workdir}",
      "--config.cm3.dataset=shapes/small", f"--config.cm3.data_dir={shapes_data_dir}",
      f"--config.cm3.vqgan_workdir={vqgan_workdir}",
      f"--config.cm3.retrieval.retriever={retriever_workdir}", "--config.num_train_steps=10",
      "--config.log_every=5", "--config.eval_every=10", "--config.checkpoint_every=10",
      "--config.eval_steps=1", "--config.report_examples=4", "--config.global_batch_size=8",
      "--config.cm3.splits=train,validation")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  for line in (f"[4/8] retriever: reusing (the retriever {retriever_workdir})",
               "[5/8] memory bank: making", "512 document vectors of the train split",
               "[6/8] neighbours: making", "4 per record of train, validation",
               "[7/8] token model: making", "train step 10: loss", "[8/8] report: done"):
    assert line in out, out
  keys, ids, _ = neighbours.read(str(workdir / "neighbours"), "train")
  assert len(keys) == 512 and ids.shape == (512, 4)
  report = json.load(open(workdir / "eval_shapes.json"))
  assert list(report) == ["validation", "validation, 3 retrieved"]
  assert [report[c]["retrieved"] for c in report] == [0, 3]
  dropped = "text_to_image, top-p 0.9, CFG 3, no documents in the unconditional stream"
  reranked = "text_to_image, top-p 0.9, best of 8 by the retriever's score"
  assert dropped not in report["validation"] and dropped in report["validation, 3 retrieved"]
  assert reranked in report["validation"] and reranked in report["validation, 3 retrieved"]
  table = (workdir / "eval_shapes.md").read_text()
  assert ("| task, sampling | validation (seen compositions) | validation (seen compositions, "
          "3 retrieved) |") in table
  assert f"| {dropped} | - | " in table

  result = run_module("cm3jax.sample", f"--workdir={workdir}", "--prompt=a red circle on the left",
                      f"--memory={workdir}/memory", "--retrieve=2", "--rerank=3", "--num_images=2",
                      f"--out={tmp_path}/grid.png", "--nouncond_retrieved")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("retrieved: '") == 2, result.stdout
  assert "wrote 2 images, each the best of 3 by the retriever, of" in result.stdout
  assert os.path.getsize(tmp_path / "grid.png") > 0
  for flags, message in ((["--retrieve=2"], "--retrieve needs --memory and --prompt"),
                         (["--rerank=2", "--rerank_by=retriever"],
                          "--rerank_by=retriever needs a retriever: --retriever or --memory"),
                         (["--rerank=0"], "and --rerank must be at least 1")):
    assert_one_line_error(run_module("cm3jax.sample", f"--workdir={workdir}", "--prompt=a",
                                     *flags), "cm3jax.sample", message)
  assert_one_line_error(run_module("cm3jax.eval_shapes", f"--workdir={workdir}", "--retrieve=2",
                                   f"--memory={tmp_path}/none", "--splits=validation"),
                        "cm3jax.eval_shapes", "memory bank")

  run = cm3jax.load(str(workdir))
  assert run.memory_bank == str(workdir / "memory")
  prompt, memory = "a red circle on the left", augment.Memory.load(str(workdir / "memory"))
  captions, images = run.retrieve([prompt], k=2)
  ids = memory.retrieve([prompt], 2)
  bank_captions, bank_codes = memory.bank.get(ids[0])
  assert captions == [[c.decode() for c in bank_captions]]
  np.testing.assert_array_equal(images[0], run.vqgan.decode(bank_codes))
  asked = []
  draw = engine.text_to_image_reranked
  monkeypatch.setattr(engine, "text_to_image_reranked", lambda *a: asked.append(a) or draw(*a))
  drawn = run.text_to_image([prompt], num_images=2, rerank=3, retrieve=2, seed=1)
  setting = run.setting("text_to_image, 2 retrieved", rerank=3)
  assert setting.rerank_by == "retriever"
  (_, captions, candidates, _, key, guidance, sampling, context, uncond_retrieved,
   score), = asked
  assert (captions, candidates, guidance, sampling, uncond_retrieved) == (
      [prompt, prompt], 3, setting.guidance, setting.config, setting.uncond_retrieved)
  assert (key == jax.random.split(jax.random.PRNGKey(1), 2)).all()
  for got, want in zip(context, memory.context(run.vocab, [prompt, prompt], 2), strict=True):
    np.testing.assert_array_equal(got, want)
  codes = run.vqgan.encode(drawn[0])
  np.testing.assert_allclose(score(codes, captions), augment.retriever_score(
      memory.retriever, run.vqgan)(codes, captions))
  np.testing.assert_array_equal(drawn[0], run.vqgan.decode(draw(*asked[0])))

  # The server draws with the documents and returns them, reranked as the library reranks.
  from tests.test_serve import pixels, post_all, serve
  service = serve(run)
  assert service.health()["memory"] is True
  response = post_all(service, "/v1/text_to_image", [
      {"captions": [prompt], "num_images": 2, "rerank": 3, "retrieve": 2, "seed": 1}])[0]
  assert response.status_code == 200, response.text
  body = response.json()
  np.testing.assert_array_equal(np.stack([pixels(x) for x in body["images"][0]]), drawn[0])
  assert [d["caption"] for d in body["retrieved"][0]] == [c.decode() for c in bank_captions]
  np.testing.assert_array_equal(np.stack([pixels(d["image"]) for d in body["retrieved"][0]]),
                                images[0])
