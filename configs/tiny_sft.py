r"""Instruction tuning of the tiny model (configs/tiny.py) on the shapes task suite, on any CPU.

  python -m cm3jax.pipeline --config=configs/tiny_sft.py --workdir=workdirs/tiny_sft \
      --config.init_from=workdirs/tiny

Hardware: any; written for the 2-core CPU that CI runs on.
Stages (cm3jax/pipeline.py): the pretrained run in init_from (made by the configs/tiny.py pipeline
when it is missing), the task data (the shapes task suite of cm3jax/data/shapes_tasks.py, edit,
grounded, seg2image, image2seg, caption and vqa, its images encoded by init_from's VQGAN into
WORKDIR/tasks), this model (init_from's parameters, a fresh optimiser, the weighted task mixture
of sft.mixture, CM3-masked as in pretraining) and the report: eval_shapes --tasks of this model
and of init_from (the baseline), and eval_shapes of this model's text->image. Once the task data
exists, the model alone trains with

  python -m cm3jax.train --config=configs/tiny_sft.py --workdir=workdirs/tiny_sft \
      --config.init_from=workdirs/tiny

Expected: 1.16M parameters; 8 min 36 s for the 1,000 steps on a 2-core AMD EPYC at about 8k
tokens/s. eval_shapes --tasks on 200 validation records per task, greedy: VQA 76.5%, captions 63.0%, seg2image 43.5%, grounded 42.0%, image2seg 16.5%,
edit 8.5% (the pretrained model: 0% on each); text->image 55.8% greedy on 500 validation
captions (57.6% before). The paper's guidance (CFG 3, instruct guidance 7.5) scores under 8% at
this size (benchmarks/RESULTS.md, "Instruction tuning").
"""

from cm3jax.config import load_config_file


def get_config():
  c = load_config_file("configs/tiny.py")
  c.data = "sft"
  c.init_from = "workdirs/tiny"
  # Twice the draws of the pretraining document keep text->image within 2 points of the base.
  c.sft.update(examples_per_task=6000, mixture="text2image:2", loss_on="output", max_spans=4)
  c.cm3.whole_segment_rate = 0.25  # keeps the masked conditions of guidance in training
  c.num_train_steps = 1000
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.eval_samples = 0
  c.report_examples = 200
  c.optimizer.update(peak_lr=1e-3, warmup_steps=50, weight_decay=0.0)
  return c
