r"""Throughput of `cm3jax.tokenize_images` on web-style data, and of the CM3 stream per host;
prints markdown tables.

  python -m benchmarks.tokenize --images=512 --chameleon_images=32

Writes webdataset tars of synthetic 512x512 JPEG photos (smooth colour fields with sensor-like
noise, about 120 kB each) into a temporary directory, then times, for the shapes VQGAN
(configs/vqgan_shapes.py: 32² -> 4x4 codes of 1,024) and a Chameleon-shaped one (f16: 256² ->
16x16 codes of 8,192), both with random weights (TensorFlow, which writes the shards, is
imported before the timing):

  read + decode   the tars read and the JPEGs decoded and resized by the thread pool
                  (tokenize_images.prepare), nothing encoded
  encode          the VQGAN alone on decoded images, in the job's batches
  whole job       tokenize_images.tokenize_split: read, decode, resize, encode, write shards

and then the CM3 stream's records/s for one host of 1, 2 and 4 over 16 code shards, and the
bytes that host reads (its own files; before file-level sharding every host read all of them).
"""

import collections
import io
import os
import tarfile
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from benchmarks.vqgan_encode import tokenizer_config
from cm3jax.core.vocab import Vocab
from cm3jax.data import cm3, code_shards, image_captions, shapes, tf_cpu
from cm3jax.prepare import tokenize_images, train_tokenizer
from cm3jax.vqgan.model import VQGAN, VQGANConfig
from cm3jax.vqgan.tokenizer import ImageTokenizer

_IMAGES = flags.DEFINE_integer("images", 2048, "Images for the shapes VQGAN's rows.")
_CHAMELEON_IMAGES = flags.DEFINE_integer("chameleon_images", 32, "Images for the Chameleon "
                                         "VQGAN's rows (it encodes about 1 image/s on 2 cores).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per encoder call (tokenize_images "
                              "--batch_size).")
_STREAM_RECORDS = flags.DEFINE_integer("stream_records", 16_000, "Records of the stream's split.")


def photo(i: int, size: int = 512) -> bytes:
  rng = np.random.default_rng(i)
  y, x = np.mgrid[0:size, 0:size] / size
  image = np.stack([np.sin(x * (3 + i % 5)), np.cos(y * 4 + i), np.sin(x * y * 7)], -1) * 100
  image = image + 128 + rng.normal(0, 12, image.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def write_tars(directory: str, images: int, per_tar: int = 64) -> str:
  """The images as webdataset tars; returns the dataset name."""
  photos = [photo(i) for i in range(min(images, 64))]  # encoding JPEGs is not what is timed
  tars = -(-images // per_tar)
  for t in range(tars):
    with tarfile.open(os.path.join(directory, f"{t:05d}.tar"), "w") as tar:
      for i in range(t * per_tar, min(images, (t + 1) * per_tar)):
        for name, data in ((f"{i:06d}.jpg", photos[i % len(photos)]),
                           (f"{i:06d}.txt", f"photo {i}".encode())):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return f"wds:{directory}/{{00000..{tars - 1:05d}}}.tar"


def random_tokenizer(cfg: VQGANConfig) -> ImageTokenizer:
  images = np.zeros((1, cfg.resolution, cfg.resolution, 3), np.float32)
  params = jax.jit(VQGAN(cfg).init)(jax.random.PRNGKey(0), images)["params"]
  return ImageTokenizer(cfg, params)


def tokenize_rows(name: str, cfg: VQGANConfig, images: int, work: str) -> dict:
  data = os.path.join(work, f"{name}-wds")
  os.makedirs(data)
  dataset = write_tars(data, images)
  tokenizer = random_tokenizer(cfg)
  skipped = collections.Counter()
  tf_cpu.tensorflow()

  t = time.perf_counter()
  examples, _ = image_captions.examples(dataset, "train", skipped)
  list(tokenize_images.prepare(examples, cfg.resolution, skipped, _BATCH.value, workers=1))
  one_thread = time.perf_counter() - t
  t = time.perf_counter()
  examples, _ = image_captions.examples(dataset, "train", skipped)
  decoded = list(tokenize_images.prepare(examples, cfg.resolution, skipped, _BATCH.value))
  read_decode = time.perf_counter() - t

  pixels = np.stack([p for _, p, _ in decoded])
  tokenizer.encode(pixels[:_BATCH.value])  # compiles
  t = time.perf_counter()
  for start in range(0, len(pixels), _BATCH.value):
    tokenizer.encode(pixels[start:start + _BATCH.value])
  encode = time.perf_counter() - t

  t = time.perf_counter()
  summary = tokenize_images.tokenize_split(tokenizer, dataset, "train",
                                           os.path.join(work, f"{name}-codes"),
                                           batch_size=_BATCH.value, shard_size=1024)
  whole = time.perf_counter() - t
  assert summary["records"] == images and not summary["skipped"], summary
  return {"name": name, "cfg": cfg, "images": images, "one_thread": images / one_thread,
          "read_decode": images / read_decode,
          "encode": images / encode, "whole": images / whole,
          "decode_share": read_decode / (read_decode + encode)}


def stream_rows(work: str) -> list[tuple[int, float, int, int, int]]:
  """(hosts, records/s of host 0, its records, bytes it reads, bytes of the split) for the
  shapes-sized stream over 16 files."""
  directory = os.path.join(work, "stream")
  os.makedirs(directory)
  records, files = _STREAM_RECORDS.value, 16
  rng = np.random.default_rng(0)
  tf = tf_cpu.tensorflow()
  per_file = records // files
  for f in range(files):
    with tf.io.TFRecordWriter(code_shards.shard_path(directory, "train", f)) as writer:
      for i in range(f * per_file, (f + 1) * per_file):
        writer.write(code_shards.serialize(b"%d" % i, rng.integers(0, 1024, 64),
                                           shapes.scene("train", i).caption().encode()))
  code_shards.files.write_json(code_shards.manifest_path(directory, "train"), {
      "split": "train", "records": per_file * files, "shards": files,
      "files": [f"train-{f:05d}.tfrecord" for f in range(files)],
      "shard_records": [per_file] * files, "tokens_per_image": 64, "codebook_size": 1024,
      "skipped": {}})
  captions = [shapes.scene("train", i).caption() for i in range(2000)]
  vocab = Vocab(train_tokenizer.train(captions, 320), num_sentinels=16, num_image_codes=1024)
  sizes = [os.path.getsize(p) for p in code_shards.shard_paths(directory, "train")]
  rows = []
  for hosts in (1, 2, 4):
    batches = cm3.batches(codes_dir=directory, split="train", vocab=vocab, seq_len=128, rows=16,
                          seed=(0, 0), host=0, num_hosts=hosts, repeat=False)
    t = time.perf_counter()
    documents = sum(int(np.sum(b["inputs"] == 2)) for b in batches)
    per_s = documents / (time.perf_counter() - t)
    mine = cm3.host_files(files, 0, (0, 0), "train", 0, hosts).numpy()
    rows.append((hosts, per_s, documents, sum(sizes[i] for i in mine), sum(sizes)))
  return rows


def main(_):
  print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; {os.cpu_count()} CPUs; "
        f"{tokenize_images.DECODE_WORKERS} decode threads; batch {_BATCH.value}; jax "
        f"{jax.__version__}")
  chameleon = VQGANConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                          z_channels=256, embed_dim=256, n_embed=8192)
  with tempfile.TemporaryDirectory() as work:
    print(f"\n| VQGAN | image -> codes | images | read + decode img/s, 1 thread | read + decode "
          f"img/s, {tokenize_images.DECODE_WORKERS} threads | encode img/s | whole job img/s | "
          "decoding's share |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cfg, images in (("shapes", tokenizer_config("shapes"), _IMAGES.value),
                              ("Chameleon-shaped", chameleon, _CHAMELEON_IMAGES.value)):
      r = tokenize_rows(name.split("-")[0].lower(), cfg, images, work)
      side = int(cfg.tokens_per_image ** 0.5)
      print(f"| {name} | 512² JPEG -> {cfg.resolution}² -> {side}x{side} of {cfg.n_embed} | "
            f"{images} | {r['one_thread']:,.0f} | {r['read_decode']:,.0f} | {r['encode']:,.1f} | "
            f"{r['whole']:,.1f} | "
            f"{r['decode_share']:.0%} |", flush=True)
    print("\n| CM3 stream, 64 codes + caption, seq 128 | records of host 0 | records/s of "
          "host 0 | MB host 0 reads | before (every host read the split) |")
    print("|---|---|---|---|---|")
    for hosts, per_s, documents, read, total in stream_rows(work):
      print(f"| host 0 of {hosts} | {documents:,} | {per_s:,.0f} | {read / 1e6:.1f} | "
            f"{total / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
