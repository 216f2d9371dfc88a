"""Encode an image-caption dataset into VQGAN code sequences, once, for the training pipeline.

The library of `python -m cm3jax.tokenize_images` (cm3jax/tokenize_images.py)."""

import collections
import concurrent.futures
import io
import itertools
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from cm3jax.core import files
from cm3jax.data import code_shards, image_captions
from cm3jax.vqgan.tokenizer import ImageTokenizer

SHARD_SIZE = 4096  # records per shard, by default
DECODE_WORKERS = os.cpu_count() or 1  # threads decoding images: Pillow releases the GIL


def decode_image(data: bytes, resolution: int) -> np.ndarray:
  """Encoded image bytes -> uint8 RGB [resolution, resolution, 3], centre-cropped and resized.
  A JPEG is decoded at the smallest of its DCT scales (1/8 to 1) that keeps both sides at least
  `resolution` (Pillow's draft mode): 2.5x faster for a 512x640 photo to 256²."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as image:
    image.draft("RGB", (resolution, resolution))
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != resolution:
      image = image.resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(image, np.uint8)


def prepare(examples: Iterable[tuple[bytes, bytes, bytes]], resolution: int,
            skipped: collections.Counter, chunk: int = 64, workers: int = DECODE_WORKERS
            ) -> Iterator[tuple[bytes, np.ndarray, bytes]]:
  """(key, encoded image, caption) -> (key, pixels, caption), in order; bad examples are counted
  in `skipped` by reason and left out. `workers` threads decode and resize the images, a `chunk`
  of examples ahead of the one yielded, so that they work while the caller encodes."""
  def pixels_or_none(data: bytes) -> Optional[np.ndarray]:
    try:
      return decode_image(data, resolution)
    except Exception:  # PIL raises many types for truncated or foreign data.
      return None

  def submitted(examples: list) -> list:
    readable = []
    for key, data, caption in examples:
      if not caption.strip():
        skipped["empty caption"] += 1
        continue
      try:
        caption.decode("utf-8")
      except UnicodeDecodeError:
        skipped["caption is not UTF-8"] += 1
        continue
      readable.append((key, pool.submit(pixels_or_none, data), caption))
    return readable

  examples = iter(examples)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    batch = list(itertools.islice(examples, chunk))
    ahead = submitted(batch)
    while batch:
      batch = list(itertools.islice(examples, chunk))
      current, ahead = ahead, submitted(batch)
      for key, pixels, caption in current:
        if pixels.result() is None:
          skipped["undecodable image"] += 1
        else:
          yield key, pixels.result(), caption


def source(dataset: str, image_dir: str = "", image_key: str = "image",
           caption_key: str = "caption") -> dict:
  """What names a dataset's examples (image_captions.examples) in a split's made_by: a file's
  absolute path, or a TFDS name with the features read (its data_dir is only where it is
  kept)."""
  kind, _, path = dataset.partition(":")
  if kind in ("wds", "parquet") and path:
    path = files.absolute(path)
    return {"dataset": f"{kind}:{path}", "image_key": image_key, "caption_key": caption_key}
  if kind == "tsv" and path:
    return {"dataset": f"tsv:{files.absolute(path)}"}
  if kind == "coco" and path:
    return {"dataset": f"coco:{files.absolute(path)}",
            "image_dir": files.absolute(image_dir or os.path.dirname(files.absolute(path)))}
  return {"dataset": dataset, "image_key": image_key, "caption_key": caption_key}


def made_by(tokenizer: ImageTokenizer, shard_size: int, made_from: Optional[dict] = None) -> dict:
  """A split's made_by (cm3jax/core/provenance.py), of code shards and of task shards
  (tokenize_tasks): the examples (`made_from`, their `source`), the VQGAN's weights and the shard
  size."""
  return {**(made_from or {}), "shard_size": shard_size, "vqgan": tokenizer.fingerprint,
          "vqgan_step": tokenizer.step, "tokens_per_image": tokenizer.cfg.tokens_per_image,
          "codebook_size": tokenizer.cfg.n_embed}


def write_split(tokenizer: ImageTokenizer, examples: Iterable[tuple[bytes, bytes, bytes]], out: str,
                split: str, batch_size: int, shard_size: int, total: Optional[int] = None,
                skipped: Optional[collections.Counter] = None, allow_empty: bool = False,
                made_from: Optional[dict] = None, host: tuple[int, int] = (0, 1)) -> dict:
  """Encodes `examples` into shards of `shard_size` records (code_shards.write_split: resumed
  after the whole shards already in `out`, refused when made otherwise); returns the counts of
  OUT/SPLIT.json. `made_from` names the examples (`source`); `skipped` may already hold the rows
  the source could not read. With host = (h, n > 1) the examples are host h's share, written to
  its part, and process 0 then merges the parts (code_shards.merge_parts); the others return
  their part's counts."""
  skipped = collections.Counter() if skipped is None else skipped
  settings = made_by(tokenizer, shard_size, made_from)

  def records(chunk: list[tuple[bytes, np.ndarray, bytes]]) -> list[bytes]:
    keys, pixels, captions = zip(*chunk)
    codes = tokenizer.encode(np.stack(pixels))
    return [code_shards.serialize(k, c, t) for k, c, t in zip(keys, codes, captions)]

  summary = code_shards.write_split(prepare(examples, tokenizer.cfg.resolution, skipped,
                                            batch_size), records,
                                    out, split, settings, batch_size, total, skipped,
                                    allow_empty, unit="img", host=host)
  if host[1] > 1 and host[0] == 0:
    return code_shards.merge_parts(out, split, host[1], allow_empty)
  return summary


def tokenize_split(tokenizer: ImageTokenizer, dataset: str, split: str, out: str, data_dir: str = "",
                   image_dir: str = "", image_key: str = "image", caption_key: str = "caption",
                   batch_size: int = 64, shard_size: int = SHARD_SIZE, allow_empty: bool = False,
                   host: tuple[int, int] = (0, 1)) -> dict:
  """Encodes one split of `dataset` (see cm3jax/data/image_captions.py) into shards in `out`:
  host = (h, n) encodes host h's share of it (`write_split`)."""
  skipped: collections.Counter = collections.Counter()
  examples, total = image_captions.examples(dataset, split, skipped, data_dir, image_dir,
                                            image_key, caption_key, host)
  return write_split(tokenizer, examples, out, split, batch_size, shard_size, total, skipped,
                     allow_empty, source(dataset, image_dir, image_key, caption_key), host)


def describe(summary: dict) -> str:
  """One line of a split's (or a host's part's) counts."""
  skipped = ", ".join(f"{n} {why}" for why, n in summary["skipped"].items()) or "none"
  return (f"{summary['split']}: {summary['records']} records in {summary['shards']} shards; "
          f"skipped: {skipped}")
