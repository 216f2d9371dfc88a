"""Heavy imports stay where they are used: only the input pipelines need TensorFlow, and the
model, sampler and exporter import without it (and without torch)."""

import subprocess
import sys

from tests.helpers import REPO

WITHOUT_TENSORFLOW = ["cm3jax.core.model", "cm3jax.train", "cm3jax.vqgan.model",
                      "cm3jax.vqgan.torch_io", "cm3jax.vqgan.tokenizer", "cm3jax.train_vqgan",
                      "cm3jax.tokenize_images", "cm3jax.core.vocab", "cm3jax.sampling.engine",
                      "cm3jax.sample", "cm3jax.export", "cm3jax.pipeline", "cm3jax.eval_shapes",
                      "cm3jax.sampling.instruct", "cm3jax.data.shapes_tasks",
                      "cm3jax.eval.eval_tasks", "cm3jax.tokenize_tasks", "cm3jax.data.sft_stream",
                      "cm3jax.data.shapes_analyser", "cm3jax.run", "cm3jax.serve",
                      "cm3jax.serving.app", "cm3jax.sampling.quantize"]


def test_model_and_tokenizer_import_without_tensorflow():
  code = ("import sys\n"
          "sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
          "sys.modules['torch'] = None\n"
          + "".join(f"import {m}\n" for m in WITHOUT_TENSORFLOW)
          + "import cm3jax\ncm3jax.load, cm3jax.Run, cm3jax.RequestError\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr
