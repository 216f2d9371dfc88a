"""The whole job, stage by stage, in one workdir.

The library of `python -m cm3jax.pipeline` (cm3jax/pipeline.py)."""

import collections
import dataclasses
import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
from flax import traverse_util
from jax.experimental import multihost_utils

from cm3jax import run as run_lib
from cm3jax.config import ConfigError, load_config_file
from cm3jax.core import checkpoint, files, provenance
from cm3jax.core.paths import InputPaths, RetrievalPaths, input_paths, retrieval_paths, tasks_dir
from cm3jax.data import code_shards, sft, task_shards, text_corpus
from cm3jax.eval import eval_shapes, eval_tasks
from cm3jax.prepare import (
  build_memory,
  build_neighbours,
  tokenize_images,
  tokenize_tasks,
  tokenize_text,
  train_tokenizer,
)
from cm3jax.retrieval import memory, neighbours, retriever
from cm3jax.sampling import defaults, sample
from cm3jax.training import train, train_retriever, train_vqgan
from cm3jax.vqgan.tokenizer import ImageTokenizer, progress

COMPLETE, PARTIAL, MISSING = "complete", "partial", "missing"
VERBS = {COMPLETE: "reusing", PARTIAL: "resuming", MISSING: "making"}
# A stage's output in the workdir that this config would not make is refused, not remade: what
# was made from it (down to the token model's checkpoints) would be stale, and the pipeline
# never deletes a run's work.
REMAKE = ("delete it for the pipeline to make it again (and what was made from it), or run "
          "with the config it was made with")
# Fields of a trainer's config that do not change what it trains (its progress, bookkeeping,
# where the data is kept), so that they may differ between the output and this config.
NOT_MADE_BY = {"num_train_steps", "log_every", "eval_every", "eval_images", "eval_examples",
               "checkpoint_every", "keep_checkpoints", "async_checkpointing",
               "new_run_over_damaged", "data_dir", "tokenizer", "mesh"}


@dataclasses.dataclass(frozen=True)
class Job:
  config: object
  workdir: str

  @property
  def paths(self) -> InputPaths:
    return input_paths(self.config.cm3, self.workdir)

  @property
  def retrieval(self) -> RetrievalPaths:
    return retrieval_paths(self.config.cm3, self.workdir)

  @property
  def splits(self) -> list[str]:
    return [s.strip() for s in self.config.cm3.splits.split(",") if s.strip()]


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  sharded: bool  # runs on every host; otherwise on process 0 while the others wait
  status: Callable[[Job], tuple[str, str]]  # (COMPLETE | PARTIAL | MISSING, what is there)
  make: Callable[[Job], str]  # makes or resumes the output; returns what it made, in words


def check_trained(where: str, step: int, config, what: str):
  """Refuses a trainer's checkpoint in the workdir whose saved config differs from `config` in
  a field that changes what it trains (any but NOT_MADE_BY; a field the saved config lacks is
  one added since, unknown)."""
  saved = traverse_util.flatten_dict(checkpoint.saved_config(where, step), sep=".")
  wanted = {k: v for k, v in traverse_util.flatten_dict(json.loads(config.to_json()),
                                                        sep=".").items()
            if not NOT_MADE_BY & set(k.split("."))}
  provenance.check(saved, wanted, f"the {what} in {where} (step {step})", REMAKE)


def check_made(manifest: dict, made_by: dict, what: str):
  """Refuses an output in the workdir that this config would not make."""
  provenance.check(manifest, made_by, what, REMAKE)


# 1. Image tokenizer.

def vqgan_status(job: Job) -> tuple[str, str]:
  where = job.paths.vqgan_workdir
  saved = progress(where)
  if saved is None:
    return MISSING, f"no checkpoint in {where}"
  step, total = saved
  if not job.config.cm3.vqgan_workdir:  # the pipeline's own, trained to this config's steps
    config = vqgan_config(job)
    check_trained(where, step, config, "VQGAN")
    total = config.num_train_steps
  return (COMPLETE if step >= total else PARTIAL), f"{where} at step {step} of {total}"


def vqgan_config(job: Job):
  """The config the pipeline trains its VQGAN with."""
  c = job.config.cm3
  config = load_config_file(c.vqgan_config)
  config.data, config.data_dir = c.dataset, c.data_dir
  return config


def make_vqgan(job: Job) -> str:
  c = job.config.cm3
  if c.dataset.split("/")[0] != "shapes":
    raise ConfigError(f"no finished VQGAN in {job.paths.vqgan_workdir}, and the pipeline trains "
                      f"one on the shapes data only (cm3.dataset={c.dataset!r}): train one with "
                      "python -m cm3jax.train_vqgan, or set cm3.vqgan_workdir to one")
  evals = [h for h in train_vqgan.train(vqgan_config(job), job.paths.vqgan_workdir)
           if "eval_psnr" in h]
  return (f"validation PSNR {evals[-1]['eval_psnr']:.1f} dB, "
          f"{evals[-1]['eval_codebook_usage']:.0%} of the codebook in use")


# 2. Image codes.

def codes_status(job: Job) -> tuple[str, str]:
  where = job.paths.codes_dir
  done = [s for s in job.splits if files.exists(code_shards.manifest_path(where, s))]
  if done and not job.config.cm3.codes_dir and job.config.data != "text":  # the pipeline's own
    made_by = tokenize_images.made_by(ImageTokenizer.load(job.paths.vqgan_workdir),
                                      tokenize_images.SHARD_SIZE,
                                      tokenize_images.source(job.config.cm3.dataset))
    for split in done:
      check_made(code_shards.read_manifest(where, split), made_by,
                 f"the {split} codes in {where}")
  if len(done) == len(job.splits):
    return COMPLETE, f"{', '.join(done)} in {where}"
  started = any(f.endswith(".tfrecord") for f in files.listdir(where))
  return (PARTIAL if started else MISSING), f"{len(done)} of {len(job.splits)} splits in {where}"


def dataset_to_write(job: Job, what: str) -> str:
  """cm3.dataset, once it and cm3.splits are fit to write records of (`what` is, in words)."""
  c = job.config.cm3
  if "train" not in job.splits or "validation" not in job.splits:
    raise ConfigError(f"cm3.splits={c.splits!r} must include train and validation")
  if not c.dataset:
    raise ConfigError(f"cm3.dataset is empty: name {what}, or set cm3.codes_dir to its records")
  return c.dataset


def make_codes(job: Job) -> str:
  dataset = dataset_to_write(job, "the image-caption data to encode (shapes, a TFDS name, "
                                  "tsv:PATH, coco:PATH, wds:PATTERN or parquet:PATTERN)")
  tokenizer = ImageTokenizer.load(job.paths.vqgan_workdir)
  host = (jax.process_index(), jax.process_count())
  return "; ".join(
      tokenize_images.describe(tokenize_images.tokenize_split(
          tokenizer, dataset, split, job.paths.codes_dir, job.config.cm3.data_dir, host=host))
      for split in job.splits)


def make_text_records(job: Job) -> str:
  dataset = dataset_to_write(job, f"the text corpus to write ({text_corpus.FORMS})")
  return "; ".join(
      tokenize_text.describe(tokenize_text.tokenize_split(dataset, split, job.paths.codes_dir,
                                                          job.config.cm3.data_dir))
      for split in job.splits)


# 3. Text tokenizer.

def tokenizer_status(job: Job) -> tuple[str, str]:
  where = job.paths.tokenizer
  return (COMPLETE, where) if files.exists(where) else (MISSING, f"no {where}")


def make_tokenizer(job: Job) -> str:
  skipped = collections.Counter()
  model = train_tokenizer.train(train_tokenizer.read_sentences(job.paths.codes_dir, skipped),
                                job.config.cm3.text_vocab_size)
  files.write_atomic(job.paths.tokenizer, model)
  left_out = ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"
  return (f"{train_tokenizer.num_pieces(model)} pieces from the train captions (or texts) of "
          f"{job.paths.codes_dir} in {job.paths.tokenizer}; captions left out: {left_out}")


# Retrieval (cm3.retrieval.documents > 0): the retriever, the memory bank, the neighbours.

def retriever_config(job: Job):
  c = job.config.cm3
  config = load_config_file(c.retrieval.retriever_config)
  config.data, config.data_dir, config.tokenizer = c.dataset, c.data_dir, job.paths.tokenizer
  return config


def retriever_status(job: Job) -> tuple[str, str]:
  where = job.retrieval.retriever
  if job.config.cm3.retrieval.retriever:  # given: used as it is
    return (COMPLETE, f"the retriever {where}") if files.exists(where) else (
        MISSING, f"no {where}")
  step = checkpoint.newest_step(where)
  if step is None:
    return MISSING, f"no checkpoint in {where}"
  check_trained(where, step, retriever_config(job), "retriever")
  total = retriever_config(job).num_train_steps
  return (COMPLETE if step >= total else PARTIAL), f"{where} at step {step} of {total}"


def make_retriever(job: Job) -> str:
  c = job.config.cm3
  if c.dataset.split("/")[0] != "shapes":
    raise ConfigError(f"no retriever at {job.retrieval.retriever}, and the pipeline "
                      f"trains one on the shapes data only (cm3.dataset={c.dataset!r}): set "
                      "cm3.retrieval.retriever to a CLIP (a Hugging Face or open_clip checkpoint)")
  evals = [h for h in train_retriever.train(retriever_config(job), job.retrieval.retriever)
           if "eval_text_to_image_r@1" in h]
  return (f"validation recall@1 text->image {evals[-1]['eval_text_to_image_r@1']:.1%}, "
          f"image->text {evals[-1]['eval_image_to_text_r@1']:.1%}") if evals else "trained"


def memory_status(job: Job) -> tuple[str, str]:
  where = job.retrieval.memory
  if files.exists(os.path.join(where, memory.MANIFEST)):
    if not job.config.cm3.retrieval.memory:  # the pipeline's own
      check_made(memory.read_manifest(where), build_memory.made_by(
          retriever.load(job.retrieval.retriever),
          ImageTokenizer.load(job.paths.vqgan_workdir), job.paths.codes_dir, "train"),
          f"the memory bank {where}")
    return COMPLETE, where
  done = memory.done_shards(where) if files.isdir(where) else set()
  return (PARTIAL if done else MISSING), f"{len(done)} shards in {where}"


def make_memory(job: Job) -> str:
  paths = job.retrieval
  manifest = build_memory.build(retriever.load(paths.retriever), ImageTokenizer.load(
      job.paths.vqgan_workdir), job.paths.codes_dir, "train", paths.memory)
  return f"{manifest['records']} document vectors of the train split in {paths.memory}"


NEIGHBOUR_SPLITS = ("train", "validation")


def neighbours_status(job: Job) -> tuple[str, str]:
  where = job.retrieval.neighbours
  done = [s for s in NEIGHBOUR_SPLITS
          if files.exists(neighbours.manifest_path(where, s))]
  if done and not job.config.cm3.retrieval.neighbours_dir:  # the pipeline's own
    r, bank = job.config.cm3.retrieval, job.retrieval.memory
    vqgan = ImageTokenizer.load(job.paths.vqgan_workdir).fingerprint
    for split in done:
      check_made(neighbours.read_manifest(where, split), build_neighbours.made_by(
          vqgan, {**memory.read_manifest(bank), "path": files.absolute(bank)},
          job.paths.codes_dir, split, r.per_record, r.candidates, r.query_dropout,
          r.max_relevance, build_neighbours.SEED),
          f"the {split} neighbours in {where}")
  if len(done) == len(NEIGHBOUR_SPLITS):
    return COMPLETE, f"{', '.join(done)} in {where}"
  return (PARTIAL if files.isdir(where) else MISSING), f"{len(done)} of 2 splits in {where}"


def make_neighbours(job: Job) -> str:
  paths, r = job.retrieval, job.config.cm3.retrieval
  build_neighbours.build(retriever.load(paths.retriever),
                         ImageTokenizer.load(job.paths.vqgan_workdir), paths.memory,
                         job.paths.codes_dir, paths.neighbours, NEIGHBOUR_SPLITS, r.engine,
                         per_record=r.per_record, candidates=r.candidates,
                         query_dropout=r.query_dropout, max_relevance=r.max_relevance)
  return f"{r.per_record} per record of {', '.join(NEIGHBOUR_SPLITS)} in {paths.neighbours}"


# 4. Token model.

def model_status(job: Job) -> tuple[str, str]:
  step = checkpoint.newest_step(job.workdir)
  total = job.config.num_train_steps
  if step is None:
    return MISSING, f"no checkpoint in {checkpoint.directory(job.workdir)}"
  return (COMPLETE if step >= total else PARTIAL), f"step {step} of {total}"


def make_model(job: Job) -> str:
  evals = [h for h in train.train(job.config, job.workdir) if "eval_loss" in h]
  return f"validation loss {evals[-1]['eval_loss']:.3f}" if evals else "trained"


# 5. Report.

def report_splits(job: Job) -> list[str]:
  """The splits eval_shapes scores: shapes data only."""
  if job.config.cm3.dataset.split("/")[0] != "shapes":
    return []
  return [s for s in ("validation", "test") if s in job.splits]


def recorded_steps(job: Job) -> dict[str, int]:
  """{use: step} of the best settings the reports recorded; {} where that file does not read
  (the report remakes it)."""
  try:
    return {use: m.step for use, m in defaults.sampling_defaults(job.workdir).items()}
  except ConfigError:
    return {}


def report_status(job: Job) -> tuple[str, str]:
  step = checkpoint.newest_step(job.workdir)
  samples = [os.path.join(job.workdir, f) for f in sample.SAMPLE_FILES]
  report = eval_shapes.saved(job.workdir)
  wanted = eval_shapes.columns(report_splits(job), job.config.cm3.retrieval.documents)
  scored = [c for c in wanted if report.get(c, {}).get("step") == step]
  recorded = not wanted or recorded_steps(job).get(defaults.text_to_image_use(0)) == step
  if all(files.exists(f) for f in samples) and len(scored) == len(wanted) and recorded:
    return COMPLETE, f"samples and the eval_shapes report of step {step}"
  return MISSING, f"nothing for step {step}"


def make_report(job: Job) -> str:
  run = run_lib.load(job.workdir)
  lines = sample.write_samples(run.sampler, run.vqgan, job.paths.codes_dir, job.workdir)
  made = list(sample.SAMPLE_FILES)
  if report_splits(job):
    eval_shapes.report(run, report_splits(job), job.config.report_examples,
                       retrieve=job.config.cm3.retrieval.documents)
    made += eval_shapes.REPORT_FILES + (defaults.SAMPLING_DEFAULTS_FILE,)
  print("\n".join(f"  {line}" for line in lines))
  return ", ".join(made)


# Instruction tuning (data="sft").

def task_splits(job: Job) -> list[str]:
  """The splits of the task data: the shapes task suite's test split too."""
  return ["train", "validation"] + (["test"] if job.config.sft.dataset == "shapes_tasks" else [])


def tasks_status(job: Job) -> tuple[str, str]:
  where = tasks_dir(job.config, job.workdir)
  done = [s for s in task_splits(job) if files.exists(task_shards.manifest_path(where, s))]
  if done and not job.config.sft.tasks_dir:  # the pipeline's own
    tokenizer = ImageTokenizer.load(job.paths.vqgan_workdir)
    for split in done:
      check_made(task_shards.read_manifest(where, split), tokenize_images.made_by(
          tokenizer, tokenize_tasks.SHARD_SIZE,
          tokenize_tasks.source(job.config.sft.dataset, task_examples(job, split))),
          f"the {split} task records in {where}")
  if len(done) == len(task_splits(job)):
    return COMPLETE, f"{', '.join(done)} in {where}"
  return MISSING, f"{len(done)} of {len(task_splits(job))} splits in {where}"


def make_tasks(job: Job) -> str:
  c = job.config
  tokenizer = ImageTokenizer.load(job.paths.vqgan_workdir)
  where = tasks_dir(c, job.workdir)
  return "; ".join(tokenize_tasks.describe(tokenize_tasks.tokenize_split(
      tokenizer, c.sft.dataset, split, where, task_examples(job, split)))
      for split in task_splits(job))


def task_examples(job: Job, split: str) -> int:
  """Records per task of a split of the shapes task suite."""
  c = job.config
  return c.sft.examples_per_task if split == "train" else c.report_examples


def sft_report_status(job: Job) -> tuple[str, str]:
  if job.config.sft.dataset != "shapes_tasks":
    return COMPLETE, "nothing to score: the report scores the shapes task suite only"
  step = checkpoint.newest_step(job.workdir)
  tasks = eval_tasks.saved(job.workdir).get(f"{job.workdir}, validation", {})
  scored = eval_shapes.saved(job.workdir).get("validation", {})
  recorded = recorded_steps(job)
  uses = [defaults.text_to_image_use(0), *sft.TASKS]
  if (tasks.get("step") == step and scored.get("step") == step
      and all(recorded.get(use) == step for use in uses)):
    return COMPLETE, f"the reports of step {step}"
  return MISSING, f"nothing for step {step}"


def make_sft_report(job: Job) -> str:
  run = run_lib.load(job.workdir)
  runs = eval_tasks.report(run, ["validation"], sft.TASKS, job.config.report_examples,
                           baseline=run_lib.load(job.config.init_from)
                           if job.config.init_from else None)
  print("\n".join(f"  {line}" for line in eval_tasks.table(runs)))
  encoded = [s for s in eval_shapes.SPLITS
             if files.exists(code_shards.manifest_path(job.paths.codes_dir, s))]
  eval_shapes.report(run, encoded, job.config.report_examples)
  return ", ".join(eval_tasks.REPORT_FILES + eval_shapes.REPORT_FILES
                   + (defaults.SAMPLING_DEFAULTS_FILE,))


TEXT_TOKENIZER = Stage("text tokenizer", False, tokenizer_status, make_tokenizer)
TOKEN_MODEL = Stage("token model", True, model_status, make_model)
STAGES = (
    Stage("image tokenizer", True, vqgan_status, make_vqgan),
    Stage("image codes", True, codes_status, make_codes),
    TEXT_TOKENIZER,
    TOKEN_MODEL,
    Stage("report", False, report_status, make_report),
)
RETRIEVAL_STAGES = (  # before the token model, when cm3.retrieval.documents > 0
    Stage("retriever", True, retriever_status, make_retriever),
    Stage("memory bank", True, memory_status, make_memory),
    Stage("neighbours", True, neighbours_status, make_neighbours),
)


TEXT_STAGES = (
    Stage("text records", False, codes_status, make_text_records),
    TEXT_TOKENIZER,
    TOKEN_MODEL,
)


SFT_STAGES = (
    Stage("task data", False, tasks_status, make_tasks),
    TOKEN_MODEL,
    Stage("report", False, sft_report_status, make_sft_report),
)


def config_stages(config) -> tuple[Stage, ...]:
  if config.data == "sft":
    return SFT_STAGES
  if config.data == "text":
    return TEXT_STAGES
  if not config.cm3.retrieval.documents:
    return STAGES
  return STAGES[:3] + RETRIEVAL_STAGES + STAGES[3:]


def run(job: Job, stages: Optional[Sequence[Stage]] = None):
  """Runs each stage that is not complete (all of the config's by default): a sharded one on
  every process, any other on process 0 only, the others waiting for it."""
  chief = jax.process_index() == 0
  stages = config_stages(job.config) if stages is None else stages
  for i, stage in enumerate(stages, 1):
    if stage.sharded or chief:
      state, found = stage.status(job)
      if chief:
        print(f"[{i}/{len(stages)}] {stage.name}: {VERBS[state]} ({found})", flush=True)
      if state != COMPLETE:
        t = time.perf_counter()
        made = stage.make(job)
        if chief:
          print(f"[{i}/{len(stages)}] {stage.name}: done in {time.perf_counter() - t:.0f}s: "
                f"{made}", flush=True)
    if not stage.sharded and jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"cm3jax.pipeline: {stage.name}")
