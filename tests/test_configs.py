"""Every config builds a valid model whose size matches what its docstring promises."""

import glob
import os
import re

import flax
import jax
import jax.numpy as jnp
import pytest

from cm3jax.core import model as model_lib
from tests.helpers import REPO, load_config

CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("vqgan", "clip")))


def load(path):
  return load_config(os.path.basename(path))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_docstring_gives_command_and_true_size(path):
  module = load(path)
  name = os.path.relpath(path, REPO)
  assert f"python -m cm3jax.train --config={name} --workdir=" in module.__doc__
  config = module.get_config()
  cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
  shapes = jax.eval_shape(lambda: model_lib.Decoder(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  count = model_lib.num_params(flax.linen.unbox(shapes))
  value, unit = re.search(r"Expected: ([\d.]+)([MB]) parameters", module.__doc__).groups()
  assert f"{count / {'M': 1e6, 'B': 1e9}[unit]:.2f}" == value
  assert config.seq_len <= cfg.max_seq_len
  assert config.global_batch_size % config.grad_accum_steps == 0


def test_paper_sizes():
  for name, layers, d, heads, lr in [("350m", 24, 1024, 16, 6e-4), ("760m", 24, 1536, 24, 5e-4),
                                     ("7b", 32, 4096, 32, 1.2e-4)]:
    c = load(os.path.join(REPO, "configs", f"{name}.py")).get_config()
    assert (c.model.num_layers, c.model.d_model, c.model.num_heads) == (layers, d, heads)
    assert c.optimizer.peak_lr == lr and c.optimizer.warmup_steps == 1500
    assert c.seq_len == 4096 and c.global_batch_size * c.seq_len == 8 * 2**20


@pytest.mark.parametrize("name", ["350m", "760m", "7b"])
def test_paper_sft_recipe_keeps_the_model_and_its_microbatches(name):
  base = load(os.path.join(REPO, "configs", f"{name}.py")).get_config()
  c = load(os.path.join(REPO, "configs", f"{name}_sft.py")).get_config()
  assert c.model.to_dict() == base.model.to_dict() and c.data == "sft"
  assert c.optimizer.peak_lr == 5e-5 and c.optimizer.warmup_steps == 150
  assert c.seq_len == 4096 and c.global_batch_size * c.seq_len == 2**21  # the paper: 2M
  assert (c.global_batch_size // c.grad_accum_steps
          == base.global_batch_size // base.grad_accum_steps)
  assert abs(c.num_train_steps * c.global_batch_size * c.seq_len - 30e9) < 1e7


def test_vqgan_config():
  from cm3jax.vqgan.model import VQGANConfig
  module = load(os.path.join(REPO, "configs", "vqgan_shapes.py"))
  assert ("python -m cm3jax.train_vqgan --config=configs/vqgan_shapes.py --workdir="
          in module.__doc__)
  cfg = VQGANConfig.from_dict(module.get_config().vqgan.to_dict())
  assert cfg.tokens_per_image <= 256 and cfg.resolution == 32


def test_clip_config_docstring_gives_command_and_true_size():
  from cm3jax.retrieval import clip
  from cm3jax.training import train_retriever
  module = load(os.path.join(REPO, "configs", "clip_shapes.py"))
  assert ("python -m cm3jax.train_retriever --config=configs/clip_shapes.py --workdir="
          in module.__doc__)
  config = module.get_config()
  cfg = train_retriever.clip_config(config, config.text_vocab_size + 1)  # + end of text
  shapes = jax.eval_shape(lambda: clip.init_params(cfg, jax.random.PRNGKey(0)))
  value = re.search(r"Expected: ([\d.]+)M parameters", module.__doc__).group(1)
  assert f"{model_lib.num_params(flax.linen.unbox(shapes)) / 1e6:.2f}" == value
  assert cfg.image_size == 32 and cfg.eot_id == cfg.vocab_size - 1
