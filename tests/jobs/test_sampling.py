"""The sample command, in a subprocess: the recorded setting, its flags and their refusals."""

import pytest

from tests.helpers import assert_one_line_error, run_module
from tests.test_sampling import record_best_of_8

pytestmark = pytest.mark.slow


def test_the_sample_command_reads_the_recorded_setting_and_its_flags(tmp_path):
  """The command's flags are unset unless given: --top_k overrides the recorded setting's, the
  rest is the recorded best of 8. (There is no checkpoint: it stops there.)"""
  record_best_of_8(tmp_path)
  result = run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a", "--top_k=3")
  assert_one_line_error(result, "cm3jax.sample", "no checkpoints in")
  assert result.stdout.startswith("sampling text_to_image with --top_k=3 --top_p=0.9 --cfg=1 "
                                  "--rerank=8 --rerank_by=model (the best measured, row "), (
                                      result.stdout)
  assert result.stdout.strip().endswith("; --top_k as given)"), result.stdout
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a",
                                   "--rerank=0"), "cm3jax.sample", "--rerank must be at least 1")
  (tmp_path / "sampling_defaults.json").write_text('{"version": 7}')
  assert_one_line_error(run_module("cm3jax.sample", f"--workdir={tmp_path}", "--prompt=a"),
                        "cm3jax.sample", "sampling_defaults.json is not a sampling-defaults file")
