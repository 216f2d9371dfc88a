"""The VQGAN's trainer, trained: its logs, grids and checkpoints, reconstructions that improve,
the GAN and perceptual losses switching on, its splits, an exact resume and one after a
preemption; and every command's bad flags in one line."""

import os
import shutil

import pytest

from cm3jax.config import ConfigError
from cm3jax.training import train_vqgan
from tests.helpers import assert_one_line_error, run_module, vqgan_config

pytestmark = pytest.mark.slow


def test_training_logs_metrics_grids_and_checkpoints(vqgan_workdir):
  assert sorted(os.listdir(os.path.join(vqgan_workdir, "checkpoints"))) == ["3", "6"]
  assert any(f.startswith("events.out") for f in os.listdir(os.path.join(vqgan_workdir,
                                                                         "tensorboard")))


def test_training_improves_reconstructions_and_resumes_exactly(shapes_data_dir, tmp_path):
  config = vqgan_config(shapes_data_dir, num_train_steps=40, log_every=10, eval_every=20,
                        checkpoint_every=20, **{"learning_rate": 3e-3, "warmup_steps": 5})
  history = train_vqgan.train(config, str(tmp_path / "a"))
  evals = [h for h in history if "eval_psnr" in h]
  assert evals[-1]["eval_psnr"] > evals[0]["eval_psnr"]
  assert 0 < evals[-1]["eval_codebook_usage"] <= 1
  assert 1 <= evals[-1]["eval_code_perplexity"] <= 64
  train_rows = [h for h in history if "psnr" in h]
  assert {"recon_loss", "vq_loss", "psnr", "learning_rate", "images_per_s"} <= set(train_rows[0])

  shutil.rmtree(tmp_path / "a" / "checkpoints" / "40")
  resumed = train_vqgan.train(config, str(tmp_path / "a"))
  last = lambda h: [x for x in h if "psnr" in x][-1]
  assert last(resumed)["recon_loss"] == last(history)["recon_loss"]


def test_gan_and_perceptual_losses_switch_on(shapes_data_dir, tmp_path):
  config = vqgan_config(shapes_data_dir, num_train_steps=4, disc_start=2,
                        perceptual="random_conv", log_every=1)
  history = train_vqgan.train(config, str(tmp_path))
  rows = [h for h in history if "psnr" in h]
  assert "gan_loss" not in rows[1] and {"gan_loss", "gan_weight", "disc_loss"} <= set(rows[2])
  assert rows[2]["gan_weight"] > 0


def test_it_trains_on_the_tokenizer_split_and_evaluates_on_validation(shapes_data_dir, tmp_path,
                                                                       monkeypatch):
  from cm3jax.data import shapes_tfds
  read, load = [], shapes_tfds.load
  monkeypatch.setattr(shapes_tfds, "load", lambda *a: read.append(a[2]) or load(*a))
  config = vqgan_config(shapes_data_dir, num_train_steps=1, eval_every=1)
  assert config.train_split == "tokenizer"  # configs/vqgan_shapes.py: every colour-shape pair
  train_vqgan.train(config, str(tmp_path / "a"))
  assert read == ["tokenizer", "validation"]
  with pytest.raises(ConfigError, match=r"split 'dev' is not one of shapes/small's: \['test', "
                     r"'tokenizer', 'train', 'validation'\]"):
    train_vqgan.train(vqgan_config(shapes_data_dir, train_split="dev"), str(tmp_path / "b"))


def test_preemption_saves_the_step_it_stopped_at_and_the_run_resumes(shapes_data_dir, tmp_path,
                                                                     monkeypatch):
  from cm3jax.training import faults
  config = vqgan_config(shapes_data_dir, num_train_steps=6, checkpoint_every=100)
  monkeypatch.setattr(faults.Preemption, "requested", lambda self, step: step == 4)
  with pytest.raises(faults.Preempted, match="after step 4: checkpoint saved"):
    train_vqgan.train(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
  monkeypatch.undo()
  history = train_vqgan.train(config, str(tmp_path))
  assert [h["step"] for h in history if "psnr" in h] == [6]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "6"]


@pytest.mark.parametrize("command, args, message", [
    ("cm3jax.train_vqgan", ["--config=configs/vqgan_shapes.py", "--config.vqgan.depth=3"],
     "the config has no field 'depth'"),
    ("cm3jax.train_vqgan", ["--config=configs/vqgan_shapes.py", "--config.batch_size=two"],
     "flag --config.batch_size=two"),
    ("cm3jax.train_vqgan", ["--config=configs/vqgan_shapes.py", "stray"],
     "unexpected arguments: ['stray']"),
    ("cm3jax.pipeline", ["--config=configs/missing.py"], "bad --config: [Errno 2]"),
    ("cm3jax.tokenize_images", ["--batch_size=many"], "flag --batch_size=many"),
])
def test_every_command_reports_bad_flags_in_one_line(command, args, message):
  assert_one_line_error(run_module(command, *args, timeout=300), command, message)
