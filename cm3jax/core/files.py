"""Every file of a run, through one path layer: local paths and object-storage URIs (gs://,
s3://) alike, through etils.epath (orbax's own path layer; it reaches buckets through
TensorFlow's file systems where TensorFlow is installed, else fsspec). tf.data reads and
writes the same URIs itself, and orbax's checkpoints take them as they are.

Writes leave a file or directory whole or not at all. A local file is written under a temporary
name beside the target, which replaces the target once complete; an object store publishes an
object only once its upload is complete, so a URI is written in place.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator

from etils import epath


def is_uri(path: str) -> bool:
  """Whether `path` names an object in a bucket (gs://B/K) rather than a local file."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URI as it is."""
  path = os.fspath(path)
  return path if is_uri(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def makedirs(path: str):
  """Makes a directory and its parents (a no-op for an existing one)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names in a directory, sorted; none for one that does not exist."""
  directory = epath.Path(path)
  return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def glob(pattern: str) -> list[str]:
  """The paths a glob pattern matches (`*`, `?`, `[...]`, in any part but the bucket's), sorted;
  local or in a bucket (gs://B/data/*.txt)."""
  parts = pattern.split("/")
  first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
  if first == len(parts):
    return [pattern] if exists(pattern) else []
  root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  return sorted(os.fspath(p) for p in epath.Path(root).glob("/".join(parts[first:])))


def size(path: str) -> int:
  return epath.Path(path).stat().length


def open_file(path: str, mode: str = "r") -> IO[Any]:
  """A file object of `path` ("r", "rb", "w", "wb"; seekable when read)."""
  return epath.Path(path).open(mode)


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def read_json(path: str):
  return json.loads(read_text(path))


def remove(path: str):
  epath.Path(path).unlink()


def rename(path: str, target: str):
  """Moves a file or directory (in a bucket: copies, then deletes)."""
  epath.Path(path).rename(target)


def rmtree(path: str):
  """Removes a directory and what it holds, if it exists."""
  directory = epath.Path(path)
  if directory.exists():
    directory.rmtree()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A path to write `path`'s content to (by any writer that takes a path: numpy, TFRecord);
  `path` holds the content once the block ends normally, and nothing new if it raises. Locally
  it is a temporary name, unique to this process so that several processes may write the same
  file, that replaces `path` at the end; a URI is written in place (see the module's docstring)."""
  if is_uri(path):
    yield path
    return
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, data: bytes | str):
  """Writes `data` (bytes, or text as UTF-8) to `path`, making its directory."""
  makedirs(os.path.dirname(absolute(path)))
  with atomic_path(path) as tmp, open_file(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str, value):
  write_atomic(path, json.dumps(value, indent=1))


@contextlib.contextmanager
def staged_directory(directory: str, prefix: str, overwrite: bool = False) -> Iterator[str]:
  """A new local directory to fill; it becomes `directory` when the block ends normally
  (replacing an existing one if `overwrite`) and is removed otherwise. Locally it lies beside
  `directory` and is renamed; for a URI it is a temporary directory, copied up file by file
  once complete."""
  parent = None if is_uri(directory) else os.path.dirname(os.path.abspath(directory))
  if parent:
    os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=prefix)
  try:
    yield staging
    if overwrite and exists(directory):
      rmtree(directory)
    if parent:
      os.rename(staging, directory)
    else:
      _upload(staging, directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _upload(local: str, uri: str):
  for root, _, names in os.walk(local):
    target = epath.Path(uri) / os.path.relpath(root, local)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
      epath.Path(os.path.join(root, name)).copy(target / name, overwrite=True)
