"""Object storage: every run path goes through the one path layer (cm3jax/core/files.py), so a
workdir, code shards, a tokenizer, a memory bank, neighbours and exports may live in a bucket.

The source scan fails when a module touches a path with the builtin `open`, `os.path`'s
queries, `os`'s file operations, `glob`, `shutil` or `np.load` of a path; a line that works on a
local file by design (a temporary directory, a lock's flock) says so with `# local file:`. The
fake bucket (etils.epath's mock backend, gs:// redirected into a temporary directory) then runs
the layer's users on a gs:// path."""

import ast
import os
import pathlib
from unittest import mock

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cm3jax"
LAYER = PACKAGE / "core" / "files.py"
MARK = "# local file:"

FORBIDDEN = {  # call -> what to use instead
    "open": "files.open_file, read_text, read_bytes or read_json",
    "os.path.exists": "files.exists", "os.path.isfile": "files.exists",
    "os.path.isdir": "files.isdir", "os.path.getsize": "files.size",
    "os.path.getmtime": "a manifest's fields", "os.path.abspath": "files.absolute",
    "os.makedirs": "files.makedirs", "os.mkdir": "files.makedirs",
    "os.listdir": "files.listdir", "os.scandir": "files.listdir", "os.walk": "files.glob",
    "os.remove": "files.remove", "os.unlink": "files.remove", "os.replace": "files.atomic_path",
    "os.rename": "files.rename", "os.stat": "files.size", "glob.glob": "files.glob",
    "shutil.rmtree": "files.rmtree", "shutil.copy": "files.staged_directory",
    "shutil.copyfile": "files.staged_directory", "shutil.move": "files.staged_directory",
}


def dotted(node: ast.AST) -> str:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    return f"{dotted(node.value)}.{node.attr}"
  return ""


def violations(path: pathlib.Path) -> list[str]:
  source = path.read_text()
  lines = source.splitlines()
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    name = dotted(node.func)
    instead = FORBIDDEN.get(name)
    if name in ("np.load", "numpy.load") and node.args and not isinstance(node.args[0], ast.Name):
      instead = "np.load of a file object from files.open_file"
    if instead is None:
      continue
    span = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
    if not any(MARK in line for line in span):
      found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}(...): use {instead}")
  return found


def test_no_module_opens_a_run_path_outside_the_path_layer():
  found = [v for path in sorted(PACKAGE.rglob("*.py")) if path != LAYER
           for v in violations(path)]
  assert not found, "\n".join(found)


def test_the_scan_finds_what_it_forbids(tmp_path):
  module = tmp_path / "module.py"
  module.write_text("import os, glob\nimport numpy as np\n"
                    "def f(p):\n"
                    "  open(p)\n"
                    "  os.path.exists(p)\n"
                    "  glob.glob(p)\n"
                    "  np.load(os.path.join(p, 'x.npz'))\n"
                    "  os.makedirs(p)  # local file: a temporary directory\n"
                    "  np.load(f)\n"
                    "  os.path.join(p, 'x')\n")
  global REPO
  repo, REPO = REPO, tmp_path
  try:
    found = violations(module)
  finally:
    REPO = repo
  assert [v.split(":")[1] for v in found] == ["4", "5", "6", "7"]


@pytest.fixture
def bucket(tmp_path):
  """gs://bucket/... on a fake object store: epath's backend redirected into tmp_path/bucket, so
  the path layer's users run on gs:// paths as they would on a real bucket."""
  from etils.epath import gpath, testing
  root = tmp_path / "fs"

  def local(path) -> str:
    path = os.fspath(path)
    return str(root / path[len("gs://"):]) if path.startswith("gs://") else path

  def remote(path: str) -> str:
    return "gs://" + os.path.relpath(path, root) if path.startswith(str(root)) else path

  def redirected(original, path, *args, **kwargs):
    return original(local(path), *[local(a) if isinstance(a, str) else a for a in args],
                    **kwargs)

  def globbed(original, pattern):
    return [remote(p) for p in original(local(pattern))]

  def walked(original, top, **kwargs):
    for directory, dirs, names in original(local(top), **kwargs):
      yield remote(os.fspath(directory)), dirs, names

  names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename",
           "replace", "rmtree", "stat")
  # With TensorFlow installed epath reaches gs:// through it, past the mocked backends.
  with mock.patch.object(gpath, "_is_tf_installed", lambda: False), testing.mock_epath(
      glob=globbed, walk=walked, **dict.fromkeys(names, redirected)):
    yield "gs://bucket", root / "bucket"


def test_the_path_layer_on_a_bucket(bucket, tmp_path):
  from cm3jax.core import files
  uri, where = bucket
  files.write_json(f"{uri}/run/a.json", {"records": 3})
  assert (where / "run" / "a.json").exists()  # written in place: an object appears whole
  assert files.read_json(f"{uri}/run/a.json") == {"records": 3}
  assert files.exists(f"{uri}/run/a.json") and files.isdir(f"{uri}/run")
  assert not files.exists(f"{uri}/run/b.json")
  files.write_atomic(f"{uri}/run/b.bin", b"12345")
  assert files.size(f"{uri}/run/b.bin") == 5 and files.read_bytes(f"{uri}/run/b.bin") == b"12345"
  assert files.listdir(f"{uri}/run") == ["a.json", "b.bin"]
  assert files.glob(f"{uri}/run/*.json") == [f"{uri}/run/a.json"]
  assert files.absolute(f"{uri}/run") == f"{uri}/run"
  with files.staged_directory(f"{uri}/export", ".export-") as staging:
    assert not files.is_uri(staging)
    os.makedirs(os.path.join(staging, "sub"))  # local file: the staging directory
    pathlib.Path(staging, "sub", "weights.bin").write_bytes(b"w")
  assert files.read_bytes(f"{uri}/export/sub/weights.bin") == b"w"
  files.remove(f"{uri}/run/b.bin")
  files.rmtree(f"{uri}/export")
  assert files.listdir(uri) == ["run"]


def same_on_a_bucket(bucket, tmp_path, make):
  """make(root) on a local directory and on the bucket: the results, with the root's name
  taken out, must be equal."""
  uri, _ = bucket
  local = str(tmp_path / "local")
  strip = lambda value, root: json_of(value).replace(root, "ROOT")
  assert strip(make(local), local) == strip(make(uri), uri)


def json_of(value) -> str:
  import json
  import numpy as np
  return json.dumps(value, default=lambda v: v.tolist() if isinstance(v, np.ndarray)
                    else v.decode() if isinstance(v, bytes) else str(v), sort_keys=True)


def test_split_manifests_merged_from_host_parts_on_a_bucket(bucket, tmp_path, monkeypatch):
  from cm3jax.core import files
  from cm3jax.data import code_shards

  def no_wait(seconds):
    raise AssertionError("merge_parts found no part that is there")
  monkeypatch.setattr(code_shards.time, "sleep", no_wait)

  def make(root):
    for host, records in enumerate(([4, 4, 1], [4, 2])):
      part = code_shards.part_name("train", host, 2)
      names = [os.path.basename(code_shards.shard_path(root, part, i)) for i in range(len(records))]
      for name in names:
        files.write_atomic(os.path.join(root, name), b"")
      files.write_json(code_shards.manifest_path(root, part), {
          "split": "train", "records": sum(records), "shards": len(names), "hosts": 2,
          "fingerprint": "f", "skipped": {"empty caption": host + 1}, "files": names,
          "shard_records": records})
    summary = code_shards.merge_parts(root, "train", 2, poll_seconds=0)
    return summary, code_shards.shard_files(root, "train")

  same_on_a_bucket(bucket, tmp_path, make)
  uri, _ = bucket
  summary, (paths, counts) = make(uri)
  assert summary["records"] == 15 and summary["skipped"] == {"empty caption": 3}
  assert paths[0] == f"{uri}/train-host00000-00000.tfrecord" and counts == [4, 4, 1, 4, 2]


def test_memory_bank_and_neighbours_on_a_bucket(bucket, tmp_path):
  """The bank's vectors and documents (read by byte range) through the path layer. Neighbour
  files are TFRecords that TensorFlow writes and reads through its own gs:// filesystem, which
  the fake bucket cannot reach: one made here is copied in, and the layer lists it."""
  import numpy as np
  from cm3jax.core import files
  from cm3jax.retrieval import memory, neighbours
  local = tmp_path / "made_here"
  local.mkdir()
  neighbours.write_shard(str(local), "train", 0, [
      neighbours.serialize(b"a", np.array([1, -1]), [b"one"], np.ones((1, 4)))])
  record_file = neighbours.shard_path(str(local), "train", 0)

  def make(root):
    rng = np.random.default_rng(0)
    bank = f"{root}/memory"
    files.makedirs(bank)
    for shard in range(2):
      memory.write_shard(bank, shard, rng.normal(size=(3, 4)), np.arange(3) + 3 * shard,
                         {"empty caption": shard})
      memory.write_documents(bank, shard, [b"x" * shard, b"caption", b"last"],
                             np.arange(12).reshape(3, 4) + 12 * shard, 64)
    manifest = {"records": 6, "shards": 2, "dim": 4, "shard_records": [3, 3]}
    files.write_json(f"{bank}/{memory.MANIFEST}", manifest)
    near = f"{root}/neighbours"
    files.makedirs(near)
    files.write_atomic(neighbours.shard_path(near, "train", 0), files.read_bytes(record_file))
    neighbours.finish(near, "train", {"records": 1, "shards": 1, "shard_records": [1]})
    captions, codes = memory.Documents(bank, manifest).get(np.array([4, 0, 5]))
    assert captions == [b"caption", b"", b"last"] and codes[0].tolist() == [16, 17, 18, 19]
    return (memory.load(bank), sorted(memory.done_shards(bank)), memory.shard_skipped(bank, 1),
            captions, codes,
            [os.path.basename(p) for p in neighbours.shard_paths(near, "train")],
            sorted(neighbours.done_shards(near, "train")))

  same_on_a_bucket(bucket, tmp_path, make)


def test_a_tokenizer_and_webdataset_tars_from_a_bucket(bucket, tmp_path):
  import collections
  from cm3jax.core import files
  from cm3jax.core.vocab import Vocab
  from cm3jax.data import image_captions, shapes
  from cm3jax.prepare import train_tokenizer
  from tests.test_image_captions import encoded, write_tar
  uri, where = bucket
  model = train_tokenizer.train([shapes.scene("train", i).caption() for i in range(500)], 320)
  files.write_atomic(f"{uri}/tokenizer.model", model)
  vocab = Vocab.from_spm_file(f"{uri}/tokenizer.model", 4, 64)
  assert vocab == Vocab(model, 4, 64)
  where.joinpath("wds").mkdir()
  for shard in range(3):
    write_tar(where / "wds" / f"{shard}.tar", [(f"{shard}.png", encoded("PNG", shard)),
                                               (f"{shard}.txt", b"a caption")])
  skipped = collections.Counter()
  examples, _ = image_captions.examples(f"wds:{uri}/wds/{{0..3}}.tar", "train", skipped)
  assert [key for key, _, _ in examples] == [b"0.tar/0", b"1.tar/1", b"2.tar/2"]
  assert skipped == {"missing tar file": 1}
  examples, _ = image_captions.examples(f"wds:{uri}/wds/*.tar", "train", skipped)
  assert len(list(examples)) == 3
