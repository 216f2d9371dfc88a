import collections
import glob
import io
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cm3jax.config import ConfigError
from cm3jax.prepare import tokenize_images
from cm3jax.vqgan.tokenizer import ImageTokenizer


def png(array) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def read_records(out, split):
  records = []
  for path in sorted(glob.glob(os.path.join(out, f"{split}-*.tfrecord"))):
    for raw in tf.data.TFRecordDataset(path):
      ex = tf.train.Example.FromString(raw.numpy())
      f = ex.features.feature
      records.append((f["key"].bytes_list.value[0], list(f["codes"].int64_list.value),
                      f["caption"].bytes_list.value[0]))
  return records


def test_shapes_split_is_tokenized(vqgan_workdir, shapes_data_dir, tmp_path):
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  summary = tokenize_images.tokenize_split(tokenizer, "shapes/small", "validation", str(tmp_path),
                                           shapes_data_dir, batch_size=16, shard_size=50)
  assert summary["records"] == 128 and summary["shards"] == 3 and not summary["skipped"]
  records = read_records(str(tmp_path), "validation")
  assert len({key for key, _, _ in records}) == 128
  assert all(len(codes) == 16 and 0 <= min(codes) and max(codes) < 64 for _, codes, _ in records)
  assert json.load(open(tmp_path / "validation.json"))["records"] == 128

  # The codes are the VQGAN's codes of those images.
  from cm3jax.data import shapes_tfds
  data = shapes_tfds.load("shapes/small", shapes_data_dir, "validation")
  np.testing.assert_array_equal(tokenizer.encode(data["image"][:4]),
                                np.array([codes for _, codes, _ in records[:4]]))
  assert [caption for _, _, caption in records[:4]] == list(data["caption"][:4])


def test_bad_examples_are_skipped_and_counted(vqgan_workdir, tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  examples = [
      (b"ok", png(rgb), b"a red circle"),
      (b"gray", png(rgb[..., 0]), b"a gray thing"),
      (b"rgba", png(np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], -1)), b"rgba"),
      (b"big", png(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)), b"resized"),
      (b"corrupt", png(rgb)[:40], b"truncated file"),
      (b"garbage", b"not an image", b"garbage"),
      (b"empty", png(rgb), b"   "),
      (b"latin1", png(rgb), "caf\xe9".encode("latin-1")),
  ]
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  summary = tokenize_images.write_split(tokenizer, examples, str(tmp_path), "train", 4, 100)
  assert summary["records"] == 4
  assert summary["skipped"] == {"undecodable image": 2, "empty caption": 1,
                                "caption is not UTF-8": 1}
  assert [key for key, _, _ in read_records(str(tmp_path), "train")] == [b"ok", b"gray", b"rgba",
                                                                         b"big"]


def test_interrupted_run_resumes_without_loss_or_duplicates(vqgan_workdir, tmp_path):
  rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  examples = [(f"{i}".encode(), png(rgb), f"caption {i}".encode()) for i in range(23)]
  tokenizer = ImageTokenizer.load(vqgan_workdir)

  def interrupted():  # the images are decoded a batch ahead: 12 reach the encoder
    for i, ex in enumerate(examples):
      if i == 17:
        raise KeyboardInterrupt
      yield ex

  with pytest.raises(KeyboardInterrupt):
    tokenize_images.write_split(tokenizer, interrupted(), str(tmp_path), "train", 4, 5)
  assert len(read_records(str(tmp_path), "train")) == 10  # two whole shards, no partial one
  assert not os.path.exists(tmp_path / "train.json")  # no manifest: the split is not complete
  summary = tokenize_images.write_split(tokenizer, examples, str(tmp_path), "train", 4, 5)
  keys = [key for key, _, _ in read_records(str(tmp_path), "train")]
  assert summary["records"] == 23 and keys == [f"{i}".encode() for i in range(23)]


def test_a_resume_with_other_settings_is_refused(vqgan_workdir, tmp_path):
  """Before, resuming 10 records written in shards of 5 with shards of 4 left 10 records on disk
  and a manifest that said 8."""
  rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  examples = [(f"{i}".encode(), png(rgb), f"caption {i}".encode()) for i in range(17)]
  tokenizer = ImageTokenizer.load(vqgan_workdir)

  def interrupted():  # the images are decoded a batch ahead: 12 reach the encoder
    yield from examples[:16]
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    tokenize_images.write_split(tokenizer, interrupted(), str(tmp_path), "train", 4, 5)
  with pytest.raises(ConfigError, match=r"the 2 shards of train in .*: made with "
                     r"shard_size=5 \(this run: 4\); run with the settings it was made with"):
    tokenize_images.write_split(tokenizer, examples, str(tmp_path), "train", 4, 4)
  assert len(read_records(str(tmp_path), "train")) == 10
  assert not os.path.exists(tmp_path / "train.json")
  summary = tokenize_images.write_split(tokenizer, examples, str(tmp_path), "train", 4, 5)
  assert summary["records"] == 17 and len(read_records(str(tmp_path), "train")) == 17


def test_a_finished_split_refuses_another_dataset_vqgan_or_shard_size(vqgan_workdir, tmp_path):
  """Before, a rerun into a finished --out with another --dataset or VQGAN returned the old
  counts (the command printed "8 records" and exited 0)."""
  rgb = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  (tmp_path / "0.png").write_bytes(png(rgb))
  for name, n in (("a", 8), ("b", 3)):
    (tmp_path / f"{name}_train.tsv").write_text("".join(f"c{i}\t0.png\n" for i in range(n)))
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  other_vqgan = ImageTokenizer(tokenizer.cfg, jax.tree.map(lambda p: p * 1.01, tokenizer.params),
                               tokenizer.step)
  out = str(tmp_path / "codes")
  write = lambda dataset="a", vqgan=tokenizer, **kw: tokenize_images.tokenize_split(
      vqgan, f"tsv:{tmp_path}/{dataset}_{{split}}.tsv", "train", out, batch_size=4,
      **{"shard_size": 5, **kw})
  summary = write()
  assert summary["records"] == 8 and write() == summary  # the same settings: reused
  assert summary["dataset"] == f"tsv:{tmp_path}/a_{{split}}.tsv"
  assert summary["vqgan"] == tokenizer.fingerprint != other_vqgan.fingerprint
  for change, field in (({"dataset": "b"}, "dataset"), ({"vqgan": other_vqgan}, "vqgan"),
                        ({"shard_size": 4}, "shard_size")):
    with pytest.raises(ConfigError, match=rf"the complete train split in {out}: made with "
                       rf"{field}=\S+ \(this run: \S+\); run with the settings"):
      write(**change)
  assert write() == summary
  # a TFDS dataset is named by its name and features, which a TSV's record lacks (unknown)
  with pytest.raises(ConfigError, match=r"made with dataset='tsv:.*' \(this run: "
                                        r"'shapes/small'\); run with"):
    tokenize_images.write_split(tokenizer, [], out, "train", 4, 5,
                                made_from=tokenize_images.source("shapes/small"))


def test_zero_sizes_and_empty_splits_are_refused(vqgan_workdir, tmp_path):
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  for batch_size, shard_size in ((0, 5), (4, 0)):
    with pytest.raises(ConfigError, match="must be at least 1"):
      tokenize_images.write_split(tokenizer, [], str(tmp_path), "train", batch_size, shard_size)
  empty = [(b"0", b"not an image", b"a caption")]
  with pytest.raises(ConfigError, match=r"split train has no usable example \(skipped: "
                     r"\{'undecodable image': 1\}\); nothing written"):
    tokenize_images.write_split(tokenizer, empty, str(tmp_path), "train", 4, 5)
  assert not os.path.exists(tmp_path / "train.json")
  summary = tokenize_images.write_split(tokenizer, empty, str(tmp_path), "train", 4, 5,
                                        allow_empty=True)
  assert summary["records"] == 0 and os.path.exists(tmp_path / "train.json")
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="--out=.*/file is not a directory that can be made"):
    tokenize_images.write_split(tokenizer, empty, str(tmp_path / "file"), "train", 4, 5)


def test_missing_vqgan(tmp_path):
  with pytest.raises(ConfigError, match="no VQGAN checkpoints in"):
    ImageTokenizer.load(str(tmp_path))


def test_prepare_counts_by_reason_and_keeps_the_order():
  skipped = collections.Counter()
  assert list(tokenize_images.prepare([(b"k", b"junk", b"c")], 32, skipped)) == []
  assert skipped == {"undecodable image": 1}
  rgb = np.random.default_rng(5).integers(0, 256, (40, 40, 3), dtype=np.uint8)
  bad = [(f"bad{i}".encode(), b"junk", b"c") for i in range(5)]  # a whole chunk of them
  good = [(f"{i}".encode(), png(np.roll(rgb, i, 0)), b"c") for i in range(9)]
  prepared = list(tokenize_images.prepare(good[:2] + bad + good[2:], 32, skipped, chunk=3,
                                          workers=3))
  assert [key for key, _, _ in prepared] == [key for key, _, _ in good]
  for (_, data, _), (_, pixels, _) in zip(good, prepared):
    np.testing.assert_array_equal(pixels, tokenize_images.decode_image(data, 32))
  assert skipped == {"undecodable image": 6}


def test_decode_checks_codes(vqgan_workdir):
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  images = tokenizer.decode(np.zeros((3, 16), np.int64))
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  for codes, message in [(np.full((1, 16), 64), r"codes must lie in \[0, 64\); got 64..64"),
                         (np.full((1, 16), -1), r"got -1..-1"),
                         (np.zeros((1, 15), int), r"codes must be \[batch, 16\]"),
                         (np.zeros((1, 16), float), "codes must be integers")]:
    with pytest.raises(ConfigError, match=message):
      tokenizer.decode(codes)


def test_shards_from_a_larger_dataset_are_refused(vqgan_workdir, tmp_path):
  rgb = np.zeros((32, 32, 3), np.uint8)
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  examples = [(f"{i}".encode(), png(rgb), b"c") for i in range(8)]  # 6 reach the encoder
  with pytest.raises(KeyboardInterrupt):
    def interrupted():
      yield from examples
      raise KeyboardInterrupt
    tokenize_images.write_split(tokenizer, interrupted(), str(tmp_path), "train", 2, 3)
  with pytest.raises(ConfigError, match="holds 2 shards of train, more than this dataset fills"):
    tokenize_images.write_split(tokenizer, examples[:5], str(tmp_path), "train", 2, 3)


def test_tsv_source_skips_and_counts_bad_rows(vqgan_workdir, tmp_path):
  rgb = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "ok.png").write_bytes(png(rgb))
  (tmp_path / "images" / "broken.png").write_bytes(png(rgb)[:30])
  (tmp_path / "images" / "folder.png").mkdir()
  rows = [b"caption\timage", b"a red circle\timages/ok.png", b"no tab here",
          b"too\tmany\tcolumns", b"missing\timages/nope.png", b"broken\timages/broken.png",
          b"a folder\timages/folder.png", b"caf\xe9\timages/ok.png", b"\timages/ok.png",
          b"second\timages/ok.png"]
  (tmp_path / "train.tsv").write_bytes(b"\n".join(rows) + b"\n")
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  out = str(tmp_path / "codes")
  summary = tokenize_images.tokenize_split(tokenizer, f"tsv:{tmp_path}/{{split}}.tsv", "train", out)
  assert summary["records"] == 2
  assert summary["skipped"] == {"TSV row without exactly 2 columns": 2, "missing image file": 1,
                                "unreadable image file": 1, "undecodable image": 1,
                                "caption is not UTF-8": 1, "empty caption": 1}
  assert [caption for _, _, caption in read_records(out, "train")] == [b"a red circle", b"second"]


def test_coco_source(vqgan_workdir, tmp_path):
  rgb = np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)
  (tmp_path / "val2017").mkdir()
  (tmp_path / "val2017" / "1.jpg").write_bytes(png(rgb))
  index = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
           "annotations": [{"id": 10, "image_id": 1, "caption": "a cat"},
                           {"id": 11, "image_id": 1, "caption": "a small cat"},
                           {"id": 12, "image_id": 2, "caption": "a missing image"},
                           {"id": 13, "image_id": 3, "caption": "an unknown image"}]}
  (tmp_path / "captions_val2017.json").write_text(json.dumps(index))
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  out = str(tmp_path / "codes")
  summary = tokenize_images.tokenize_split(
      tokenizer, f"coco:{tmp_path}/captions_{{split}}2017.json", "val", out,
      image_dir=str(tmp_path / "val2017"))
  assert summary["records"] == 2
  assert summary["skipped"] == {"missing image file": 1, "annotation without image or caption": 1}
  assert [k for k, _, _ in read_records(out, "val")] == [b"1/10", b"1/11"]


@pytest.mark.parametrize("dataset, message", [
    ("tsv:", "expected tsv:PATH"),
    ("tsv:/nonexistent/{split}.tsv", "no such file /nonexistent/train.tsv"),
])
def test_bad_dataset_names(dataset, message):
  from cm3jax.data import image_captions
  with pytest.raises(ConfigError, match=message):
    image_captions.examples(dataset, "train", collections.Counter())
