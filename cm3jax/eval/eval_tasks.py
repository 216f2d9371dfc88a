"""Scoring the instruction-tuned tasks on the shapes task suite (`data.shapes_tasks`).

An output counts as right when it is exactly the record's truth: a generated picture when the
pixel analyser reads the scene of the record's output picture (an edit must make the asked
change and nothing else: the whole scene is compared), a caption when it describes the scene,
an answer when it equals the record's. `outputs` decodes a model's outputs, `expected` gives the
outputs that are right by construction (the VQGAN codes of each output picture, the record's
text), whose score is the task's ceiling, and `judge` tells which outputs are right. `report`
scores a run's checkpoint on each task, beside a baseline run's (`python -m cm3jax.eval_shapes
--tasks=...`): the image tasks greedy without guidance and with top-p 0.9 and the paper's
guidance (edit: instruct guidance s_img 1.5, s_txt 7.5; grounded, seg2image and text2image:
CFG 3), the text tasks greedy; each task's best decoding of the run goes to
WORKDIR/sampling_defaults.json, which `cm3jax.sample --task=...` decodes with.
"""

import dataclasses
import os
from typing import Optional, Sequence, Union

import jax
import numpy as np

from cm3jax.config import ConfigError
from cm3jax.data import sft, shapes, shapes_analyser, shapes_tasks
from cm3jax.eval import reports
from cm3jax.run import Run
from cm3jax.sampling import defaults, engine, instruct
from cm3jax.sampling.engine import Sampler, SamplingConfig, Setting
from cm3jax.vqgan.tokenizer import ImageTokenizer

Output = Union[np.ndarray, str]  # image codes [T], or text
IMAGE_OUTPUTS = ("edit", "grounded", "seg2image", "image2seg", "text2image")
GUIDED = ("edit", "grounded", "seg2image", "text2image")  # decoded with the paper's guidance too
REPORT_FILES = ("eval_tasks.json", "eval_tasks.md")  # in the workdir


@dataclasses.dataclass(frozen=True)
class Decoding:
  sampling: SamplingConfig = SamplingConfig(greedy=True)
  guided: bool = False  # the paper's guidance for GUIDED tasks; scales 1 (none) otherwise

  def setting(self, task: str) -> Setting:
    """How `task` is decoded: guided, the paper's guidance (edit: instruct guidance s_img 1.5,
    s_txt 7.5; the other GUIDED tasks CFG 3), else none."""
    fields = dataclasses.asdict(self.sampling)
    if not (self.guided and task in GUIDED):
      return Setting(sampling=fields)
    if task == "edit":
      return Setting(7.5, fields, image_guidance=1.5)
    return Setting(3.0, fields)


DECODINGS = {"greedy": Decoding(), "top-p 0.9, guided": Decoding(SamplingConfig(top_p=0.9), True)}


def _pictures(records: Sequence[sft.Record], index: int) -> list[shapes_tasks.Picture]:
  """The `index`-th picture segment of each record's input."""
  return [[s for s in r.input if isinstance(s, shapes_tasks.Picture)][index] for r in records]


def _codes(vqgan: ImageTokenizer, pictures: Sequence[shapes_tasks.Picture]) -> np.ndarray:
  return vqgan.encode(np.stack([p.render() for p in pictures]))


def outputs(sampler: Sampler, vqgan: ImageTokenizer, task: str, records: Sequence[sft.Record],
            key: jax.Array, decoding: Decoding = Decoding()) -> list[Output]:
  """The model's output for each record of `task`, decoded as `instruct` decodes the task."""
  setting = decoding.setting(task)
  cfg, guidance = setting.config, setting.guidance
  if task == "edit":
    codes = _codes(vqgan, _pictures(records, 0))
    return list(instruct.edit(sampler, codes, [r.input[2] for r in records], key,
                              setting.image_guidance, guidance, cfg))
  T = vqgan.cfg.tokens_per_image
  if task == "grounded":
    scenes = [r.output[0].scene for r in records]
    return list(instruct.grounded(sampler, [s.caption() for s in scenes],
                                  [shapes_tasks.boxes(s) for s in scenes], T, key, guidance, cfg))
  if task == "seg2image":
    return list(instruct.seg2image(sampler, _codes(vqgan, _pictures(records, 0)),
                                   [r.input[2] for r in records], key, guidance, cfg))
  if task == "image2seg":
    return list(instruct.image2seg(sampler, _codes(vqgan, _pictures(records, 0)), key, cfg))
  if task == "text2image":
    return list(engine.text_to_image(sampler, [r.input[0] for r in records], 1, T, key,
                                       guidance, cfg)[:, 0])
  if task == "caption":
    return instruct.caption(sampler, _codes(vqgan, _pictures(records, 0)), key, sampling=cfg)
  if task == "vqa":
    return instruct.vqa(sampler, _codes(vqgan, _pictures(records, 0)),
                        [r.input[1][len("Question: "):] for r in records], key, sampling=cfg)
  raise ValueError(f"task {task!r} is not one of {list(sft.TASKS)}")


def expected(vqgan: ImageTokenizer, task: str, records: Sequence[sft.Record]) -> list[Output]:
  """Outputs right by construction: the codes of each output picture, or the record's text."""
  if task in IMAGE_OUTPUTS:
    return list(_codes(vqgan, [r.output[0] for r in records]))
  if task == "vqa":
    return [sft.answer_of(r.output[0]) for r in records]
  return [r.output[0] for r in records]


def judge(vqgan: ImageTokenizer, task: str, records: Sequence[sft.Record],
          made: Sequence[Output]) -> np.ndarray:
  """bool [len(records)]: which outputs are right."""
  if len(made) != len(records):
    raise ValueError(f"{len(made)} outputs for {len(records)} records")
  if task in IMAGE_OUTPUTS:
    images = vqgan.decode(np.stack(made))
    return np.array([shapes_analyser.analyse(image) == shapes.described(r.output[0].drawn())
                     for image, r in zip(images, records)])
  if task == "caption":
    return np.array([shapes_analyser.caption_matches(text, shapes.described(r.input[0].scene))
                     for text, r in zip(made, records)])
  return np.array([answer == sft.answer_of(r.output[0]) for answer, r in zip(made, records)])



def parse_tasks(names: Sequence[str]) -> list[str]:
  unknown = [t for t in names if t not in sft.TASKS]
  if unknown or not names:
    raise ConfigError(f"--tasks={','.join(names)}: each must be one of {list(sft.TASKS)}")
  return list(names)


def evaluate(run: Run, split: str, tasks: Sequence[str], num_examples: int,
             batch_size: int = 128, seed: int = 0) -> dict:
  """The share of right outputs per task and decoding ("TASK, DECODING") and each task's
  ceiling ("TASK, ceiling"), of the first `num_examples` records of the task suite's `split`,
  for the run."""
  tasks = parse_tasks(tasks)
  sampler, vqgan = run.sampler, run.vqgan
  results = {"split": split, "step": run.step, "examples": num_examples}
  key = jax.random.PRNGKey(seed)
  for task in tasks:
    records = [shapes_tasks.example(task, split, i) for i in range(num_examples)]
    batches = [records[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    results[f"{task}, ceiling"] = float(np.mean(np.concatenate(
        [judge(vqgan, task, b, expected(vqgan, task, b)) for b in batches])))
    decodings = DECODINGS if task in GUIDED else {"greedy": DECODINGS["greedy"]}
    for name, decoding in decodings.items():
      right = [judge(vqgan, task, b, outputs(sampler, vqgan, task, b,
                                             jax.random.fold_in(key, i), decoding))
               for i, b in enumerate(batches)]
      results[f"{task}, {name}"] = float(np.mean(np.concatenate(right)))
  return results


def report(run: Run, splits: Sequence[str], tasks: Sequence[str], num_examples: int,
           batch_size: int = 128, seed: int = 0, baseline: Optional[Run] = None) -> dict:
  """`evaluate` of `run` and, when given, of the `baseline` run (the model before instruction
  tuning) on each split, written to WORKDIR/eval_tasks.json ({"RUN, SPLIT": results}, RUN its
  workdir) and, as the table `table` makes, WORKDIR/eval_tasks.md."""
  if num_examples < 1:
    raise ConfigError(f"num_examples={num_examples} must be at least 1")
  unknown = [s for s in splits if s not in shapes.SPLITS]
  if unknown or not splits:
    raise ConfigError(f"splits {list(splits)}: each must be one of {list(shapes.SPLITS)}")
  if run.vqgan is None:
    raise ConfigError(f"{run.workdir} is a text-only model: the tasks take and make images")
  runs = {}
  for scored in [run] + ([baseline] if baseline else []):
    for split in splits:
      runs[f"{scored.workdir}, {split}"] = {
          "run": scored.workdir, **evaluate(scored, split, tasks, num_examples, batch_size, seed)}
  reports.write(run.workdir, REPORT_FILES, runs, table(runs))
  defaults.record_sampling_defaults(run.workdir, REPORT_FILES[0],
                                    sampling_defaults(run.workdir, runs))
  return runs


def sampling_defaults(workdir: str, runs: dict) -> dict[str, defaults.Measured]:
  """Each task's best decoding in `report`'s results, {task: Measured}, over the columns of
  `workdir`'s own run (not the baseline's)."""
  columns = {c: r for c, r in runs.items() if r["run"] == workdir}
  out = {}
  for task in sft.TASKS:
    rows = {f"{task}, {name}": d.setting(task) for name, d in DECODINGS.items()}
    found = defaults.best(columns, rows, REPORT_FILES[0])
    if found:
      out[task] = found
  return out


def saved(workdir: str) -> dict:
  """The saved task report, {"RUN, SPLIT": results}; {} when there is none."""
  return reports.saved(workdir, REPORT_FILES)


def table(runs: dict) -> list[str]:
  """A markdown table of `report`'s results: a row per task and decoding, a column per run and
  split."""
  heads = [f"{os.path.basename(os.path.normpath(r['run']))} step {r['step']}, {r['split']}"
           for r in runs.values()]
  first = next(iter(runs.values()))
  rows = [k for k, v in first.items() if isinstance(v, float)]
  lines = [f"eval_shapes --tasks, {first['examples']} examples per task and split", "",
           "| task, decoding | " + " | ".join(heads) + " |",
           "|---|" + "---|" * len(heads)]
  return lines + [f"| {name} | " + " | ".join(f"{r[name]:.1%}" for r in runs.values()) + " |"
                  for name in rows]
