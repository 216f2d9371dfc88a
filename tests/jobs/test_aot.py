"""The train command's --compile_only for a TPU topology, in a subprocess."""

import pytest

from tests.helpers import run_module

# The suite's compilation cache (tests/conftest.py) stores these TPU executables, but a client of
# no TPU cannot load them back: JAX warns and compiles again, as it does without the cache.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")]


def test_the_command_exits_1_when_the_step_does_not_fit():
  def compile_only(batch):
    return run_module("cm3jax.train", "--config=configs/tiny.py", "--compile_only",
                      "--topology=v5e:2x2", "--config.data=synthetic", "--config.seq_len=32",
                      f"--config.global_batch_size={batch}", timeout=300)
  too_big = compile_only(2**19)
  assert too_big.returncode == 1, too_big.stderr[-2000:]
  assert "the train step DOES NOT FIT v5e:2x2" in too_big.stdout
  fits = compile_only(16)
  assert fits.returncode == 0 and "16.0 GiB HBM: fits" in fits.stdout, fits.stderr[-2000:]
