r"""CM3Leon 7B instruction tuning (§4) after configs/7b.py: LR 5e-5, 150 warm-up steps,
512 sequences of 4,096 tokens per step (2.1M), 30B tokens (14.3k steps), the task mixture of
sft.mixture over the task shards of sft.tasks_dir.

  python -m cm3jax.tokenize_tasks --vqgan_workdir=VQGAN --out=/mnt/shared/sft_tasks \
      --dataset=jsonl:/mnt/shared/sft_{split}.jsonl --splits=train,validation
  python -m cm3jax.train --config=configs/7b_sft.py --workdir=/mnt/shared/cm3leon_7b_sft \
      --config.init_from=/mnt/shared/cm3leon_7b --config.sft.tasks_dir=/mnt/shared/sft_tasks \
      --multihost

Hardware: the pre-training pod of configs/7b.py, its microbatches of the same rows.

Expected: 7.00B parameters. Measured: 52.1 GiB per chip on v5p:4x4x4 (1 microbatch of 512
rows; the pre-training step, 4 of 512, needs 53.0), compiled from a CPU machine with libtpu:

  python -m cm3jax.train --config=configs/7b_sft.py --compile_only --topology=v5p:4x4x4
"""

from cm3jax.config import load_config_file, paper_sft_config


def get_config():
  return paper_sft_config(load_config_file("configs/7b.py"))
