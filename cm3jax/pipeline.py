"""The whole job, stage by stage, in one workdir.

  python -m cm3jax.pipeline --config=configs/tiny.py --workdir=workdirs/tiny

  1. image tokenizer   a VQGAN (cm3.vqgan_config) trained on the shapes data into cm3.vqgan_workdir
  2. image codes       every split of cm3.splits encoded into shards in cm3.codes_dir
  3. text tokenizer    a sentencepiece model of cm3.text_vocab_size pieces on the train captions
  with cm3.retrieval.documents > 0 (configs/tiny_ra.py), three more before the token model:
     retriever         a CLIP (cm3.retrieval.retriever_config) trained on the shapes data
     memory bank       document vectors of the train codes (cm3jax.build_memory)
     neighbours        each train and validation record's retrieved documents
                       (cm3jax.build_neighbours)
  4. token model       the config's CM3 model (what python -m cm3jax.train runs)
  5. report            samples.png and captions.txt from validation data and, on the shapes data,
                       the cm3jax.eval_shapes report of both splits (eval_shapes.json, .md),
                       printed as its table, and its best setting, which cm3jax.sample draws
                       with (sampling_defaults.json); with retrieval, each split is scored with
                       and without cm3.retrieval.documents documents retrieved from the bank

A text-only config (data="text", configs/text_tiny.py) has no images and three stages:
  1. text records      every split of cm3.splits of the corpus cm3.dataset written into record
                       shards in cm3.codes_dir (cm3jax.tokenize_text)
  2. text tokenizer    as above, on the train records
  3. token model       the config's CM3 model on `</s> text` documents

An instruction-tuning config (data="sft", configs/tiny_sft.py) starts from the pretrained run
in config.init_from, whose VQGAN, codes and tokenizer it uses, and has three stages:
  1. task data         sft.dataset written into task shards in sft.tasks_dir (tokenize_tasks)
  2. token model       the SFT run (python -m cm3jax.train), from init_from's parameters
  3. report            on the shapes task suite: eval_shapes --tasks of this run and of
                       init_from (eval_tasks.json, .md) and this run's text->image and captions
                       (eval_shapes.json, .md), printed as their tables, and the best setting
                       of each task and of text->image (sampling_defaults.json)

Each stage looks at what the workdir holds and prints one line: it reuses a complete output,
resumes a partial one and makes a missing one. Empty cm3 paths are WORKDIR/vqgan, WORKDIR/codes
and WORKDIR/tokenizer.model (and WORKDIR/retriever, memory and neighbours); a path that names
existing inputs (a VQGAN trained elsewhere, codes of your own data) is reused as it is. On
several hosts (--multihost) a stage that is not sharded runs on process 0 while the others wait;
sharded stages (the trainers, the image codes and the memory bank) run on every host.
The stages are the rows of `STAGES`, `RETRIEVAL_STAGES`, `TEXT_STAGES` and `SFT_STAGES`.
"""

import os

import jax

from cm3jax import cli
from cm3jax.config import ConfigError, check_ranges
from cm3jax.core import checkpoint, files
from cm3jax.eval import eval_shapes, eval_tasks
from cm3jax.jobs import pipeline
from cm3jax.training import faults, train


def _define_flags():
  cli.define_run_flags("Every stage's output goes here (see the module doc).")


def main(FLAGS):
  config = FLAGS.config
  check_ranges(config)
  if config.data not in ("cm3", "text", "sft"):
    raise ConfigError(f"the pipeline makes the inputs of data='cm3', 'text' and 'sft'; this "
                      f"config has data={config.data!r}: train it with python -m cm3jax.train")
  if config.data == "sft":
    if not config.init_from:
      raise ConfigError("an sft config starts from a pretrained run: set --config.init_from")
    config = train.with_base_inputs(config)
  workdir = checkpoint.prepare_workdir(FLAGS.workdir)
  with faults.workdir_lock(workdir, "cm3jax.pipeline"):
    pipeline.run(pipeline.Job(config, workdir))
  for name in (eval_tasks.REPORT_FILES[1], eval_shapes.REPORT_FILES[1]):
    markdown = os.path.join(workdir, name)
    if jax.process_index() == 0 and files.exists(markdown):
      print(files.read_text(markdown), end="")


if __name__ == "__main__":
  cli.run("pipeline", _define_flags, main)
