"""Writes that leave a file or directory whole or not at all: the content goes to a temporary
name beside the target, which replaces the target only once it is complete."""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary path to write `path`'s content to (by any writer: numpy, TFRecord); it replaces
  `path` when the block ends normally and is removed when it raises. The name is unique to this
  process, so several processes may write the same file."""
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, data: bytes | str):
  """Writes `data` (bytes, or text as UTF-8) to `path`, making its directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str, value):
  write_atomic(path, json.dumps(value, indent=1))


@contextlib.contextmanager
def staged_directory(directory: str, prefix: str, overwrite: bool = False) -> Iterator[str]:
  """A new directory beside `directory` to fill; it becomes `directory` when the block ends
  normally (replacing an existing one if `overwrite`) and is removed otherwise."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=prefix)
  try:
    yield staging
    if overwrite and os.path.exists(directory):
      shutil.rmtree(directory)
    os.rename(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
