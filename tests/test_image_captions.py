"""The readers of web-scale image-text sets (webdataset tars, parquet) on small files written
here, broken members of every kind included, and the share of a split each host reads."""

import collections
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cm3jax.config import ConfigError
from cm3jax.data import image_captions
from cm3jax.prepare import tokenize_images


def encoded(format: str, seed: int = 0) -> bytes:
  rgb = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format=format)
  return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]], cut_in: str = ""):
  """A tar of `members` (name, bytes), as webdataset writes one; cut 100 bytes into the data of
  member `cut_in`, if named, as a copy that stopped there."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  data = buffer.getvalue()
  if cut_in:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
      data = data[:tar.getmember(cut_in).offset_data + 100]
  path.write_bytes(data)


def read(dataset: str, host=(0, 1), **kwargs):
  skipped = collections.Counter()
  examples, _ = image_captions.examples(dataset, "train", skipped, host=host, **kwargs)
  return list(examples), skipped


def test_webdataset_samples_and_every_broken_member_are_counted(tmp_path):
  write_tar(tmp_path / "train-00000.tar", [
      ("000.jpg", encoded("JPEG")), ("000.txt", b"a red circle"), ("000.json", b"{}"),
      ("001.png", encoded("PNG")), ("001.txt", b"a blue square"),
      ("sub/002.webp", encoded("WEBP")), ("sub/002.txt", b"a green triangle"),
      ("003.txt", b"a caption without its image"),
      ("004.jpg", encoded("JPEG")),  # an image without its caption
      ("005.jpg", b"not an image"), ("005.txt", b"undecodable"),
      ("006.jpeg", encoded("JPEG")), ("006.txt", b"   "),
  ])
  write_tar(tmp_path / "train-00001.tar", [
      ("100.jpg", encoded("JPEG")), ("100.txt", b"before the damage"),
      ("101.jpg", encoded("JPEG", 1)), ("101.txt", b"cut off"),
  ], cut_in="101.jpg")
  (tmp_path / "train-00003.tar").write_bytes(b"not a tar at all" * 64)
  examples, skipped = read(f"wds:{tmp_path}/{{split}}-{{00000..00003}}.tar")
  assert [key for key, _, _ in examples] == [
      b"train-00000.tar/000", b"train-00000.tar/001", b"train-00000.tar/sub/002",
      b"train-00000.tar/005", b"train-00000.tar/006", b"train-00001.tar/100"]
  assert examples[0][2] == b"a red circle" and examples[2][2] == b"a green triangle"
  assert dict(skipped) == {"sample without an image member": 1,
                           "sample without a .txt caption": 1,
                           "truncated or unreadable tar file (its rest unread)": 2,
                           "missing tar file": 1}
  pixels = list(tokenize_images.prepare(examples, 32, skipped))
  assert [key for key, _, _ in pixels] == [key for key, _, _ in examples[:3]] + [examples[5][0]]
  assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for _, p, _ in pixels)
  assert skipped["undecodable image"] == 1 and skipped["empty caption"] == 1


def write_parquet(path, images, captions, keys=None):
  columns = {"jpg": pa.array(images, pa.binary()), "caption": pa.array(captions, pa.string())}
  if keys is not None:
    columns["key"] = pa.array(keys, pa.string())
  pq.write_table(pa.table(columns), path, row_group_size=2)


def test_parquet_rows_and_broken_ones_are_counted(tmp_path):
  image = encoded("JPEG")
  write_parquet(tmp_path / "a.parquet", [image, None, image, image],
                ["one", "no image", None, "four"], keys=["k0", "k1", "k2", "k3"])
  write_parquet(tmp_path / "b.parquet", [image, image], ["five", "six"])
  whole = (tmp_path / "c.parquet")
  write_parquet(whole, [image] * 6, [f"c{i}" for i in range(6)])
  (tmp_path / "d.parquet").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
  (tmp_path / "e.parquet").write_bytes(b"PAR1 and nothing else")
  examples, skipped = read(f"parquet:{tmp_path}/*.parquet", image_key="jpg")
  keys = [key for key, _, _ in examples]
  assert keys[:4] == [b"a.parquet/k0", b"a.parquet/k3", b"b.parquet/0", b"b.parquet/1"]
  assert keys[4:] == [f"c.parquet/{i}".encode() for i in range(6)]
  assert [caption for _, _, caption in examples[:2]] == [b"one", b"four"]
  assert dict(skipped) == {"row without image bytes": 1, "empty caption": 1,
                           "unreadable parquet file": 2}
  with pytest.raises(ConfigError, match=r"a.parquet has no column 'image' .* --image_key"):
    read(f"parquet:{tmp_path}/a.parquet")
  with pytest.raises(ConfigError, match="no file matches"):
    read(f"parquet:{tmp_path}/none-*.parquet")


@pytest.mark.parametrize("num_hosts", [2, 3])
def test_hosts_read_disjoint_shares_that_cover_the_split(tmp_path, num_hosts):
  for shard in range(4):
    write_tar(tmp_path / f"{shard}.tar", [
        (f"{i}.{ext}", encoded("PNG", i) if ext == "png" else f"caption {i}".encode())
        for i in range(shard * 3, shard * 3 + 3) for ext in ("png", "txt")])
  (tmp_path / "rows.tsv").write_text("".join(f"c{i}\t0.png\n" for i in range(7)))
  (tmp_path / "0.png").write_bytes(encoded("PNG"))
  for dataset in (f"wds:{tmp_path}/{{0..3}}.tar", f"tsv:{tmp_path}/rows.tsv"):
    everything = [key for key, _, _ in read(dataset)[0]]
    shares = [[key for key, _, _ in read(dataset, (h, num_hosts))[0]] for h in range(num_hosts)]
    assert sorted(sum(shares, [])) == sorted(everything) and len(set(everything)) == len(everything)
    if dataset.startswith("wds"):  # whole files: host h reads files h, h + n, ...
      assert {key.split(b"/")[0] for key in shares[1]} == {
          f"{i}.tar".encode() for i in range(1, 4, num_hosts)}
