r"""CM3Leon 760M instruction tuning (§4) after configs/760m.py: LR 5e-5, 150 warm-up steps,
512 sequences of 4,096 tokens per step (2.1M), 30B tokens (14.3k steps), the task mixture of
sft.mixture over the task shards of sft.tasks_dir.

  python -m cm3jax.tokenize_tasks --vqgan_workdir=VQGAN --out=/mnt/shared/sft_tasks \
      --dataset=jsonl:/mnt/shared/sft_{split}.jsonl --splits=train,validation
  python -m cm3jax.train --config=configs/760m_sft.py --workdir=/mnt/shared/cm3leon_760m_sft \
      --config.init_from=/mnt/shared/cm3leon_760m --config.sft.tasks_dir=/mnt/shared/sft_tasks \
      --multihost

Hardware: the pre-training pod of configs/760m.py, its microbatches of the same rows.

Expected: 0.89B parameters. Measured: 7.9 GiB per chip on v5e:8x8 (4 microbatches of 128
rows, as in pre-training), compiled from a CPU machine with libtpu:

  python -m cm3jax.train --config=configs/760m_sft.py --compile_only --topology=v5e:8x8
"""

from cm3jax.config import load_config_file, paper_sft_config


def get_config():
  return paper_sft_config(load_config_file("configs/760m.py"))
