"""benchmarks/gpu_compile.py run as a script: its refusals on a machine without a GPU."""

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def run_script(*args):
  return subprocess.run([sys.executable, "-m", "benchmarks.gpu_compile", "--sizes=tiny", *args],
                        cwd=REPO, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu",
                                                                       "PATH": "/usr/bin:/bin"})


def test_automatic_attention_is_refused():
  result = run_script("--attention=auto")
  assert result.returncode != 0
  assert "--attention=auto picks XLA's attention on a machine without a GPU" in result.stderr


def cuda_plugin_installed():
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
  except ModuleNotFoundError:
    return False


@pytest.mark.skipif(cuda_plugin_installed(), reason="jax's CUDA plugin is installed")
def test_without_the_cuda_plugin_it_says_what_is_missing():
  result = run_script("--attention=cudnn")
  assert result.returncode != 0
  assert "compiling for an H100 needs jax's CUDA plugin" in result.stderr
