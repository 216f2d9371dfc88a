"""Image-caption sources for `cm3jax.tokenize_images`: each yields (key, encoded image, caption)
as bytes, leaving images undecoded. Rows that cannot be read are counted in `skipped` by reason.

  shapes, shapes/small, or any TFDS name   a TFDS dataset with image and text features
  tsv:PATH                                 `caption<TAB>image_path` lines (the CC3M layout); image
                                           paths relative to the TSV's folder; an optional
                                           header line `caption<TAB>image`
  coco:PATH                                a COCO captions JSON (`images` and `annotations`);
                                           images under the JSON's folder or --image_dir
  wds:PATTERN                              webdataset tar shards, as img2dataset writes them:
                                           members KEY.jpg|jpeg|png|webp and KEY.txt (KEY.json
                                           and others are ignored); PATTERN may hold brace ranges
                                           ({00000..00999}.tar) and globs
  parquet:PATTERN                          parquet files with an image-bytes column (image_key)
                                           and a caption column (caption_key), as img2dataset
                                           writes them with its parquet output

In PATH and PATTERN, `{split}` is replaced by the split's name (tsv:cc3m_{split}.tsv). Paths may
be local or on object storage (gs://, through etils.epath).

Several hosts share a split (host = (h, n)): each reads only its share, the files h, h + n, ...
of a wds or parquet split (rows h, h + n, ... of a TSV, COCO or TFDS split), so that together
they read every row once. Keys name the row in the whole split, so they are the same whichever
host reads it.
"""

import collections
import os
import tarfile
import zlib
from typing import Iterator, Optional

from cm3jax.config import ConfigError
from cm3jax.core import files

Example = tuple[bytes, bytes, bytes]
FILE_FORMATS = ("tsv", "coco", "wds", "parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the image member of a webdataset sample


def examples(dataset: str, split: str, skipped: collections.Counter, data_dir: str = "",
             image_dir: str = "", image_key: str = "image", caption_key: str = "caption",
             host: tuple[int, int] = (0, 1)) -> tuple[Iterator[Example], Optional[int]]:
  """This host's examples of one split and, where known, how many rows they are."""
  kind, _, path = dataset.partition(":")
  if kind in FILE_FORMATS:
    if not path:
      raise ConfigError(f"--dataset={dataset}: expected {kind}:PATH")
    path = path.replace("{split}", split)
  if kind in ("wds", "parquet"):
    paths = expand(path)
    if not paths:
      raise ConfigError(f"--dataset={dataset}: no file matches {path}")
    mine = paths[host[0]::host[1]]
    if kind == "wds":
      return wds_examples(mine, skipped), None
    return parquet_examples(mine, image_key, caption_key, skipped), None
  if kind in ("tsv", "coco"):
    if not files.exists(path) or files.isdir(path):
      raise ConfigError(f"--dataset={dataset}: no such file {path}")
    if kind == "tsv":
      return tsv_examples(path, skipped, host), None
    return coco_examples(path, image_dir or os.path.dirname(files.absolute(path)), skipped, host)
  return tfds_examples(dataset, data_dir, split, image_key, caption_key, host)


def expand(pattern: str) -> list[str]:
  """The files a pattern names, in order: brace ranges and lists expanded in turn, then globs
  matched (sorted); a name without a glob is kept as it is, found or not."""
  import braceexpand
  paths = []
  for name in braceexpand.braceexpand(pattern):
    if any(c in name for c in "*?["):
      paths.extend(files.glob(name))
    else:
      paths.append(name)
  return paths


def _read_image(path: str, skipped: collections.Counter) -> Optional[bytes]:
  try:
    return files.read_bytes(path)
  except FileNotFoundError:
    skipped["missing image file"] += 1
  except OSError:
    skipped["unreadable image file"] += 1
  return None


def tsv_examples(path: str, skipped: collections.Counter, host: tuple[int, int] = (0, 1)
                 ) -> Iterator[Example]:
  root = os.path.dirname(files.absolute(path))
  with files.open_file(path, "rb") as f:
    for number, line in enumerate(f):
      if number % host[1] != host[0]:
        continue
      columns = line.rstrip(b"\r\n").split(b"\t")
      if number == 0 and [c.strip().lower() for c in columns] == [b"caption", b"image"]:
        continue
      if len(columns) != 2:
        skipped["TSV row without exactly 2 columns"] += 1
        continue
      caption, image_path = columns
      try:
        image_path = image_path.decode("utf-8")
      except UnicodeDecodeError:
        skipped["image path is not UTF-8"] += 1
        continue
      data = _read_image(os.path.join(root, image_path), skipped)
      if data is not None:
        yield f"{os.path.basename(path)}:{number + 1}".encode(), data, caption


def coco_examples(path: str, image_dir: str, skipped: collections.Counter,
                  host: tuple[int, int] = (0, 1)) -> tuple[Iterator[Example], int]:
  try:
    index = files.read_json(path)
    file_names = {image["id"]: image["file_name"] for image in index["images"]}
    annotations = index["annotations"][host[0]::host[1]]
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is not a COCO captions file: {e!r}") from None

  def generate():
    for ann in annotations:
      name = file_names.get(ann.get("image_id"))
      caption = ann.get("caption")
      if name is None or not isinstance(caption, str):
        skipped["annotation without image or caption"] += 1
        continue
      data = _read_image(os.path.join(image_dir, name), skipped)
      if data is not None:
        yield f"{ann.get('image_id')}/{ann.get('id')}".encode(), data, caption.encode("utf-8")
  return generate(), len(annotations)


def tfds_examples(dataset: str, data_dir: str, split: str, image_key: str, caption_key: str,
                  host: tuple[int, int] = (0, 1)) -> tuple[Iterator[Example], int]:
  """Host h of n reads the h-th of n contiguous ranges of the split's rows."""
  builder = tfds_builder(dataset, data_dir)
  import tensorflow_datasets as tfds
  if split not in builder.info.splits:
    raise ConfigError(f"{dataset} has no split {split!r}; it has {list(builder.info.splits)}")
  rows = builder.info.splits[split].num_examples
  start, end = rows * host[0] // host[1], rows * (host[0] + 1) // host[1]
  ds = builder.as_dataset(split=f"{split}[{start}:{end}]", shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})

  def generate():
    for i, ex in enumerate(tfds.as_numpy(ds), start):
      yield f"{split}/{i}".encode(), ex[image_key], ex[caption_key]
  return generate(), end - start


def tfds_builder(dataset: str, data_dir: str):
  """The prepared TFDS builder of `dataset`; shapes is built locally, others as TFDS does."""
  from cm3jax.data import tf_cpu
  tf_cpu.tensorflow()
  if dataset.split("/")[0] == "shapes":
    from cm3jax.data import shapes_tfds
    return shapes_tfds.builder(dataset, data_dir)
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(dataset, data_dir=data_dir)
  except Exception as e:  # TFDS raises its own DatasetNotFoundError and others.
    raise ConfigError(f"TFDS dataset {dataset!r}: {str(e).splitlines()[0]}") from None
  builder.download_and_prepare()
  return builder


def wds_examples(paths: list[str], skipped: collections.Counter) -> Iterator[Example]:
  """The samples of webdataset tar shards: the members of a sample (KEY.EXT, KEY being the name
  up to the first dot of its basename) follow each other, as webdataset writes them."""
  for path in paths:
    name = os.path.basename(path)
    try:
      with files.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        sample_key, sample = None, {}
        for member in tar:
          if not member.isfile():
            continue
          directory, base = os.path.split(member.name)
          key, _, extension = base.partition(".")
          key = f"{directory}/{key}" if directory else key
          if key != sample_key:
            yield from _wds_sample(name, sample_key, sample, skipped)
            sample_key, sample = key, {}
          sample[extension.lower()] = tar.extractfile(member).read()
        yield from _wds_sample(name, sample_key, sample, skipped)
    except FileNotFoundError:
      skipped["missing tar file"] += 1
    except (tarfile.TarError, EOFError, OSError, zlib.error):
      # A truncated or corrupt tar: the samples before the damage were read; the one it cut
      # and the rest of the file are this one count.
      skipped["truncated or unreadable tar file (its rest unread)"] += 1


def _wds_sample(file_name: str, key: Optional[str], sample: dict[str, bytes],
                skipped: collections.Counter) -> Iterator[Example]:
  if key is None:
    return
  image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
  if image is None:
    skipped["sample without an image member"] += 1
  elif "txt" not in sample:
    skipped["sample without a .txt caption"] += 1
  else:
    yield f"{file_name}/{key}".encode(), image, sample["txt"]


def parquet_examples(paths: list[str], image_key: str, caption_key: str,
                     skipped: collections.Counter) -> Iterator[Example]:
  """The rows of parquet files, `image_key` holding encoded image bytes and `caption_key` the
  caption; a row's key is its `key` column where there is one (img2dataset's), else its row."""
  import pyarrow
  import pyarrow.parquet as pq
  unreadable = (OSError, pyarrow.ArrowInvalid)
  for path in paths:
    name = os.path.basename(path)
    try:
      with files.open_file(path, "rb") as f:
        try:
          table = pq.ParquetFile(f)
        except unreadable:
          skipped["unreadable parquet file"] += 1
          continue
        present = set(table.schema_arrow.names)
        missing = [c for c in (image_key, caption_key) if c not in present]
        if missing:
          raise ConfigError(f"{path} has no column {missing[0]!r} (it has {sorted(present)}): "
                            "name the image and caption columns with --image_key and "
                            "--caption_key")
        columns = [image_key, caption_key] + (["key"] if "key" in present else [])
        row = 0
        try:
          for batch in table.iter_batches(batch_size=256, columns=columns):
            values = batch.to_pydict()
            keys = values.get("key") or range(row, row + batch.num_rows)
            for image, caption, key in zip(values[image_key], values[caption_key], keys):
              row += 1
              if not image:
                skipped["row without image bytes"] += 1
              elif caption is None:
                skipped["empty caption"] += 1
              else:
                caption = caption.encode("utf-8") if isinstance(caption, str) else caption
                yield f"{name}/{key}".encode(), image, caption
        except unreadable:
          skipped["truncated parquet file (its rest unread)"] += 1
    except FileNotFoundError:
      skipped["missing parquet file"] += 1
