"""Image-caption sources for `cm3jax.tokenize_images`: each yields (key, encoded image, caption)
as bytes, leaving images undecoded. Rows that cannot be read are counted in `skipped` by reason.

  shapes, shapes/small, or any TFDS name   a TFDS dataset with image and text features
  tsv:PATH                                 `caption<TAB>image_path` lines (the CC3M layout); image
                                           paths relative to the TSV's folder; an optional
                                           header line `caption<TAB>image`
  coco:PATH                                a COCO captions JSON (`images` and `annotations`);
                                           images under the JSON's folder or --image_dir

In PATH, `{split}` is replaced by the split's name (tsv:cc3m_{split}.tsv).
"""

import collections
import json
import os
from typing import Iterator, Optional

from cm3jax.config import ConfigError

Example = tuple[bytes, bytes, bytes]


def examples(dataset: str, split: str, skipped: collections.Counter, data_dir: str = "",
             image_dir: str = "", image_key: str = "image", caption_key: str = "caption"
             ) -> tuple[Iterator[Example], Optional[int]]:
  """The examples of one split and, where known, how many rows it has."""
  kind, _, path = dataset.partition(":")
  if kind in ("tsv", "coco"):
    if not path:
      raise ConfigError(f"--dataset={dataset}: expected {kind}:PATH")
    path = path.replace("{split}", split)
    if not os.path.isfile(path):
      raise ConfigError(f"--dataset={dataset}: no such file {path}")
    if kind == "tsv":
      return tsv_examples(path, skipped), None
    return coco_examples(path, image_dir or os.path.dirname(os.path.abspath(path)), skipped)
  return tfds_examples(dataset, data_dir, split, image_key, caption_key)


def _read_image(path: str, skipped: collections.Counter) -> Optional[bytes]:
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    skipped["missing image file"] += 1
  except OSError:
    skipped["unreadable image file"] += 1
  return None


def tsv_examples(path: str, skipped: collections.Counter) -> Iterator[Example]:
  root = os.path.dirname(os.path.abspath(path))
  with open(path, "rb") as f:
    for number, line in enumerate(f):
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


def coco_examples(path: str, image_dir: str, skipped: collections.Counter
                  ) -> tuple[Iterator[Example], int]:
  try:
    with open(path, "rb") as f:
      index = json.load(f)
    files = {image["id"]: image["file_name"] for image in index["images"]}
    annotations = index["annotations"]
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is not a COCO captions file: {e!r}") from None

  def generate():
    for ann in annotations:
      name = files.get(ann.get("image_id"))
      caption = ann.get("caption")
      if name is None or not isinstance(caption, str):
        skipped["annotation without image or caption"] += 1
        continue
      data = _read_image(os.path.join(image_dir, name), skipped)
      if data is not None:
        yield f"{ann.get('image_id')}/{ann.get('id')}".encode(), data, caption.encode("utf-8")
  return generate(), len(annotations)


def tfds_examples(dataset: str, data_dir: str, split: str, image_key: str, caption_key: str
                  ) -> tuple[Iterator[Example], int]:
  builder = tfds_builder(dataset, data_dir)
  import tensorflow_datasets as tfds
  if split not in builder.info.splits:
    raise ConfigError(f"{dataset} has no split {split!r}; it has {list(builder.info.splits)}")
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={image_key: tfds.decode.SkipDecoding()})

  def generate():
    for i, ex in enumerate(tfds.as_numpy(ds)):
      yield f"{split}/{i}".encode(), ex[image_key], ex[caption_key]
  return generate(), builder.info.splits[split].num_examples


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
