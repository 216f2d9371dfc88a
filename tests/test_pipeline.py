"""The pipeline's stage runner: what runs where on several hosts, and what a status decides."""

import jax
import pytest
from jax.experimental import multihost_utils

from cm3jax import pipeline
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
      ("image tokenizer", True), ("image codes", False), ("text tokenizer", False),
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
