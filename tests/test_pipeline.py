"""The pipeline's stage runner: what runs where on several hosts, and what a status decides."""

import itertools
import json
import shutil

import jax
import pytest
from jax.experimental import multihost_utils

from cm3jax.config import ConfigError
from cm3jax.data import code_shards
from cm3jax.jobs import pipeline
from cm3jax.prepare import tokenize_images
from cm3jax.vqgan.tokenizer import ImageTokenizer
from tests.helpers import tiny_config


def recording_stages(state: str, calls: list):
  """A non-sharded and a sharded stage whose status is `state`; `calls` records what runs."""
  def stage(name, sharded):
    def status(job):
      calls.append(("status", name))
      return state, "what is there"

    def make(job):
      calls.append(("make", name))
      return "made"
    return pipeline.Stage(name, sharded, status, make)
  return [stage("codes", False), stage("model", True)]


@pytest.fixture
def hosts(monkeypatch):
  """Patches the process index and count; returns the barriers passed."""
  synced = []
  monkeypatch.setattr(multihost_utils, "sync_global_devices", synced.append)

  def place(index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)
  return place, synced


@pytest.mark.parametrize("index", [0, 1, 2])
def test_a_stage_that_is_not_sharded_runs_on_process_0_while_the_others_wait(hosts, index, capsys):
  place, synced = hosts
  place(index, 3)
  calls = []
  pipeline.run(pipeline.Job(tiny_config(), "/unused"), recording_stages(pipeline.MISSING, calls))
  expected = [("status", "model"), ("make", "model")]
  if index == 0:
    expected = [("status", "codes"), ("make", "codes")] + expected
  assert calls == expected
  assert synced == ["cm3jax.pipeline: codes"]  # every process waits at the non-sharded stage
  printed = capsys.readouterr().out
  assert bool(printed) == (index == 0)  # process 0 alone prints
  if index == 0:
    assert "[1/2] codes: making (what is there)" in printed
    assert "[2/2] model: done in 0s: made" in printed


def test_one_process_needs_no_barrier(hosts):
  place, synced = hosts
  place(0, 1)
  calls = []
  pipeline.run(pipeline.Job(tiny_config(), "/unused"), recording_stages(pipeline.PARTIAL, calls))
  assert calls == [("status", "codes"), ("make", "codes"), ("status", "model"), ("make", "model")]
  assert synced == []


def test_a_complete_stage_is_reused(hosts, capsys):
  place, _ = hosts
  place(0, 1)
  calls = []
  pipeline.run(pipeline.Job(tiny_config(), "/unused"), recording_stages(pipeline.COMPLETE, calls))
  assert calls == [("status", "codes"), ("status", "model")]
  assert capsys.readouterr().out.splitlines() == ["[1/2] codes: reusing (what is there)",
                                                  "[2/2] model: reusing (what is there)"]


def test_the_stage_table(tmp_path):
  assert [(s.name, s.sharded) for s in pipeline.STAGES] == [
      ("image tokenizer", True), ("image codes", True), ("text tokenizer", False),
      ("token model", True), ("report", False)]
  job = pipeline.Job(tiny_config(data="cm3"), str(tmp_path))
  assert [s.status(job)[0] for s in pipeline.STAGES] == [pipeline.MISSING] * 5
  (tmp_path / "codes").mkdir()
  (tmp_path / "codes" / "train-00000.tfrecord").write_bytes(b"")
  assert pipeline.codes_status(job)[0] == pipeline.PARTIAL
  (tmp_path / "tokenizer.model").write_bytes(b"")
  assert pipeline.tokenizer_status(job)[0] == pipeline.COMPLETE


def test_retrieval_adds_three_stages_before_the_token_model(tmp_path):
  assert pipeline.config_stages(tiny_config()) == pipeline.STAGES
  config = tiny_config(data="cm3", **{"cm3.retrieval.documents": 3})
  assert [s.name for s in pipeline.config_stages(config)] == [
      "image tokenizer", "image codes", "text tokenizer", "retriever", "memory bank",
      "neighbours", "token model", "report"]
  job = pipeline.Job(config, str(tmp_path))
  assert [s.status(job)[0] for s in pipeline.RETRIEVAL_STAGES] == [pipeline.MISSING] * 3
  (tmp_path / "memory").mkdir()
  (tmp_path / "memory" / "bank-00000.npz").write_bytes(b"")
  assert pipeline.memory_status(job)[0] == pipeline.PARTIAL
  given = pipeline.Job(override_retriever(config, tmp_path / "clip.pt"), str(tmp_path))
  assert pipeline.retriever_status(given)[0] == pipeline.MISSING
  (tmp_path / "clip.pt").write_bytes(b"")
  assert pipeline.retriever_status(given)[0] == pipeline.COMPLETE


def override_retriever(config, path):
  config.cm3.retrieval.retriever = str(path)
  return config


def test_an_output_of_the_pipeline_that_its_config_would_not_make_is_refused(
    vqgan_workdir, shapes_data_dir, tmp_path):
  """Before, the pipeline reused its VQGAN after its config changed ("reusing ... step 6 of 6").
  It refuses (it owns the output, but remaking it would strand what was made from it)."""
  shutil.copytree(vqgan_workdir, tmp_path / "vqgan")
  files = itertools.count()

  def job(dataset="shapes/small", cm3=(), **vqgan_overrides):
    config_file = tmp_path / f"vq{next(files)}.py"  # a new name: no stale bytecode
    config_file.write_text("from tests.helpers import vqgan_config\n\n\ndef get_config():\n"
                           f"  return vqgan_config({shapes_data_dir!r}, **{vqgan_overrides!r})\n")
    return pipeline.Job(tiny_config(data="cm3", **{
        "cm3.vqgan_config": str(config_file), "cm3.dataset": dataset,
        "cm3.data_dir": shapes_data_dir, **dict(cm3)}), str(tmp_path))

  where = f"{tmp_path}/vqgan"
  assert pipeline.vqgan_status(job()) == (pipeline.COMPLETE, f"{where} at step 6 of 6")
  assert pipeline.vqgan_status(job(log_every=3, keep_checkpoints=1))[0] == pipeline.COMPLETE
  assert pipeline.vqgan_status(job(num_train_steps=9))[0] == pipeline.PARTIAL  # resumed
  for field, change in (("vqgan.n_embed", {"vqgan.n_embed": 32}),
                        ("learning_rate", {"learning_rate": 1e-3}), ("seed", {"seed": 1}),
                        ("data", {"dataset": "shapes"})):
    with pytest.raises(ConfigError, match=rf"^the VQGAN in {where} \(step 6\): made with "
                       rf"{field}=\S+ \(this run: \S+\); delete it for the pipeline to make it"):
      pipeline.vqgan_status(job(**change))
  given = job(cm3={"cm3.vqgan_workdir": where}, **{"vqgan.n_embed": 32})
  assert pipeline.vqgan_status(given)[0] == pipeline.COMPLETE  # a given path is used as it is

  # the codes, made from another dataset
  (tmp_path / "codes").mkdir()
  made_by = tokenize_images.made_by(ImageTokenizer.load(where), tokenize_images.SHARD_SIZE,
                                    tokenize_images.source("shapes"))
  (tmp_path / "codes" / "train.json").write_text(json.dumps({"records": 1, **made_by}))
  assert code_shards.read_manifest(str(tmp_path / "codes"), "train")["dataset"] == "shapes"
  assert pipeline.codes_status(job("shapes"))[0] == pipeline.MISSING  # no shard: not begun
  with pytest.raises(ConfigError, match=rf"^the train codes in {tmp_path}/codes: made with "
                     r"dataset='shapes' \(this run: 'shapes/small'\); delete it"):
    pipeline.codes_status(job())
