"""Where a run's inputs live: a path the config names, or its default under the workdir."""

import ml_collections

from cm3jax.core import paths


def test_empty_paths_are_the_workdirs_own():
  cm3 = {"vqgan_workdir": "", "codes_dir": "", "tokenizer": "",
         "retrieval": {"retriever": "", "memory": "", "neighbours_dir": ""}}
  assert paths.input_paths(cm3, "/w") == ("/w/vqgan", "/w/codes", "/w/tokenizer.model")
  assert paths.retrieval_paths(cm3, "/w") == ("/w/retriever", "/w/memory", "/w/neighbours")
  sft = ml_collections.ConfigDict({"sft": {"tasks_dir": ""}})
  assert paths.tasks_dir(sft, "/w") == "/w/tasks"


def test_a_named_path_is_kept():
  cm3 = {"vqgan_workdir": "/v", "codes_dir": "/c", "tokenizer": "/t.model",
         "retrieval": {"retriever": "/r", "memory": "/m", "neighbours_dir": "/n"}}
  inputs = paths.input_paths(cm3, "/w")
  assert (inputs.vqgan_workdir, inputs.codes_dir, inputs.tokenizer) == ("/v", "/c", "/t.model")
  retrieval = paths.retrieval_paths(cm3, "/w")
  assert (retrieval.retriever, retrieval.memory, retrieval.neighbours) == ("/r", "/m", "/n")
  sft = ml_collections.ConfigDict({"sft": {"tasks_dir": "/tasks"}})
  assert paths.tasks_dir(sft, "/w") == "/tasks"
