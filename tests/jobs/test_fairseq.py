"""CM3's fairseq checkpoints through the export command: bad files refused in one line, the
import command of docs/export.md; and an imported checkpoint trains on."""

import os
import re
import shlex

import pytest
import torch

from cm3jax.config import ConfigError
from cm3jax.core import checkpoint
from cm3jax.io import export
from cm3jax.training import train
from tests.helpers import REPO, assert_one_line_error, run_module, tiny_config
from tests.test_fairseq import (_state_and_cfg, dictionary, imported,  # noqa: F401
                                opt_form_checkpoint, spm_model, xglm_checkpoint)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_a_fairseq_checkpoint_trains_on(activation, spm_model, dictionary, tmp_path):
  _, files = xglm_checkpoint(tmp_path, spm_model, dictionary, activation)
  cfg, _, _ = imported(files, tmp_path / "run")
  config = tiny_config(num_train_steps=2, **{f"model.{k}": v for k, v in cfg.to_dict().items()})
  history = train.train(config, str(tmp_path / "run"))
  assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_bad_files_are_refused_in_one_line(spm_model, dictionary, tmp_path):
  state, model_cfg, (pt, dict_txt, spm) = _state_and_cfg(tmp_path, spm_model, dictionary)
  run = str(tmp_path / "run")
  torch.save({"model": state}, tmp_path / "nocfg.pt")
  with pytest.raises(ConfigError, match="holds no fairseq config"):
    export.import_cm3(str(tmp_path / "nocfg.pt"), dict_txt, spm, run, tiny_config())
  short = tmp_path / "short.txt"
  short.write_text("".join((tmp_path / "dict.txt").read_text().splitlines(True)[:-3]))
  with pytest.raises(ConfigError, match=re.escape(
      f"has {len(dictionary) - 3} symbols (with fairseq's 4 specials), {pt}'s embedding has "
      f"{len(dictionary)} rows: not its dictionary")):
    export.import_cm3(pt, str(short), spm, run, tiny_config())
  (tmp_path / "bad.txt").write_text("just-a-symbol\n")
  with pytest.raises(ConfigError, match=r"bad.txt:1: not a fairseq dictionary line"):
    export.import_cm3(pt, str(tmp_path / "bad.txt"), spm, run, tiny_config())
  with pytest.raises(ConfigError, match=re.escape("the dictionary has no image code '<img0>' "
                                                  "(--image_token='<img{}>')")):
    export.import_cm3(pt, dict_txt, spm, run, tiny_config(), image_token="<img{}>")
  (tmp_path / "garbage.pt").write_bytes(b"not a pickle")
  with pytest.raises(ConfigError, match="cannot read .*garbage.pt"):
    export.import_cm3(str(tmp_path / "garbage.pt"), dict_txt, spm, run, tiny_config())
  for name, damaged in (("cut.model", spm_model[:len(spm_model) // 2]), ("empty.model", b"")):
    (tmp_path / name).write_bytes(damaged)
    with pytest.raises(ConfigError, match=re.escape(
        f"{tmp_path / name} is not a sentencepiece model (it does not parse, or holds no pieces)")):
      export.import_cm3(pt, dict_txt, str(tmp_path / name), run, tiny_config())
  assert not (tmp_path / "run").exists()
  assert_one_line_error(run_module("cm3jax.export", f"--import_from={pt}", f"--workdir={run}",
                                   "--config=configs/tiny.py", timeout=300),
                        "cm3jax.export", "a fairseq --import_from needs --dict (dict.txt) and "
                        "--spm (dict.model)")


def readme_import_command(**paths) -> list[str]:
  """The arguments of docs/export.md's fairseq import command (model_13B.pt + configs/7b.py),
  with `paths` replacing the values of its flags."""
  readme = open(os.path.join(REPO, "docs", "export.md")).read()
  command = re.search(r"python -m cm3jax.export (--import_from=model_13B.pt[^#]*)", readme)
  args = shlex.split(command.group(1).replace("\\\n", " "))
  flags = dict(arg.split("=", 1) for arg in args)
  assert set(paths) <= {f.lstrip("-") for f in flags}, flags
  return [f"{f}={paths.get(f.lstrip('-'), v)}" for f, v in flags.items()]


def test_the_readmes_import_command_takes_the_checkpoints_context(spm_model, dictionary,
                                                                    tmp_path):
  _, (pt, dict_txt, spm) = opt_form_checkpoint(tmp_path, spm_model, dictionary, positions=2048)
  run = str(tmp_path / "run")
  args = readme_import_command(import_from=pt, dict=dict_txt, spm=spm, workdir=run)
  assert "--config=configs/7b.py" in args
  assert_one_line_error(run_module("cm3jax.export", *args, "--config.seq_len=4096", timeout=300),
                        "cm3jax.export", "--config.seq_len=4096 exceeds the checkpoint's 2048 "
                        "positions")
  result = run_module("cm3jax.export", *args, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "--config.seq_len=2048" in result.stdout and "--config.model.max_seq_len=2048" in (
      result.stdout), result.stdout
  saved = checkpoint.saved_config(run, 0)
  assert (saved["seq_len"], saved["model"]["max_seq_len"]) == (2048, 2048)
