"""Atomic writes: a target is replaced whole or left as it was, with nothing left beside it."""

import json
import os

import pytest

from cm3jax.core import files


class Broken(Exception):
  pass


def test_write_atomic_writes_bytes_and_text_making_the_directory(tmp_path):
  path = str(tmp_path / "new" / "a.bin")
  files.write_atomic(path, b"\x00\x01")
  assert open(path, "rb").read() == b"\x00\x01"
  files.write_atomic(path, "é")
  assert open(path, "rb").read() == "é".encode()
  assert os.listdir(tmp_path / "new") == ["a.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"a": 1})
  with pytest.raises(Broken):
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
      f.write('{"a": ')
      raise Broken
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["a.json"]
  with pytest.raises(TypeError):
    files.write_json(path, {"a": object()})
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["a.json"]


def test_write_json_is_indented_by_one(tmp_path):
  path = str(tmp_path / "a.json")
  files.write_json(path, {"a": [1]})
  assert open(path).read() == '{\n "a": [\n  1\n ]\n}'


def test_a_staged_directory_appears_whole_or_not_at_all(tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(Broken):
    with files.staged_directory(out, ".stage-") as staging:
      open(os.path.join(staging, "half"), "w").write("x")
      raise Broken
  assert os.listdir(tmp_path) == []
  with files.staged_directory(out, ".stage-") as staging:
    open(os.path.join(staging, "a"), "w").write("x")
  assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["a"]
  with pytest.raises(OSError):  # without overwrite an existing directory stays
    with files.staged_directory(out, ".stage-") as staging:
      open(os.path.join(staging, "b"), "w").write("y")
  assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["a"]
  with files.staged_directory(out, ".stage-", overwrite=True) as staging:
    open(os.path.join(staging, "b"), "w").write("y")
  assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["b"]
