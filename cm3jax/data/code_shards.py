"""The format of image-code shards: what `cm3jax.tokenize_images` and `cm3jax.tokenize_text`
write and the CM3 stream reads.

`DIR/SPLIT-NNNNN.tfrecord` files of tf.train.Examples (`codes`: int64 [tokens_per_image],
`caption`: bytes, `key`: bytes), `DIR/SPLIT.settings.json` (what made them, written before the
first) and, once a split is complete, `DIR/SPLIT.json` with its counts (records, shards, skipped
rows by reason), its files in reading order with the records of each (`files`,
`shard_records`), its made_by (cm3jax/core/provenance.py: the source, the VQGAN, shard_size,
tokens_per_image, codebook_size, and the number of `hosts` that wrote it) and that made_by's
fingerprint. Text records (tokenize_text) are records with no codes: tokens_per_image and
codebook_size are 0 and the caption is the text.

Written by several hosts, each host h writes its own part: `DIR/SPLIT-hostHHHHH-NNNNN.tfrecord`
and, when done, `DIR/SPLIT-hostHHHHH.json` with the part's counts; process 0 then merges the
parts' counts into `DIR/SPLIT.json` (`merge_parts`), which readers read as any other.
"""

import collections
import itertools
import os
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import tqdm

from cm3jax.config import ConfigError
from cm3jax.core import files, provenance
from cm3jax.data import tf_cpu

REMEDY = "run with the settings it was made with, or write to a new --out"


def shard_path(directory: str, split: str, shard: int) -> str:
  return os.path.join(directory, f"{split}-{shard:05d}.tfrecord")


def manifest_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.json")


def settings_path(directory: str, split: str) -> str:
  """What made the shards of a split (cm3jax/core/provenance.py), for resuming."""
  return os.path.join(directory, f"{split}.settings.json")


def read_manifest(directory: str, split: str, contents: str = "",
                  maker: str = "cm3jax.tokenize_images") -> dict:
  """The counts of a complete split (of `contents`, written by `maker`: the task shards share
  this layout), or a ConfigError saying how to make it."""
  path = manifest_path(directory, split)
  if not files.exists(path):
    raise ConfigError(f"{directory} holds no complete {split} split{contents} "
                      f"({os.path.basename(path)} is missing): run python -m {maker} first")
  return files.read_json(path)


def check_codebook(directory: str, manifest: dict, num_image_codes: int):
  """A ConfigError when the shards' VQGAN has another codebook than the vocabulary."""
  if manifest["codebook_size"] != num_image_codes:
    raise ConfigError(f"{directory} holds codes of a {manifest['codebook_size']}-code VQGAN but "
                      f"the vocabulary has {num_image_codes} image codes")


def is_text(manifest: dict) -> bool:
  """Whether a split's records are text with no image codes (cm3jax.tokenize_text)."""
  return manifest["tokens_per_image"] == 0


def part_name(split: str, host: int, num_hosts: int) -> str:
  """The file stem of the shards host `host` of `num_hosts` writes of a split."""
  return split if num_hosts == 1 else f"{split}-host{host:05d}"


def shard_files(directory: str, split: str) -> tuple[list[str], list[int]]:
  """The paths of a complete split's files in reading order, and the records each holds."""
  manifest = read_manifest(directory, split)
  present = sorted(os.path.basename(p)
                   for p in files.glob(os.path.join(directory, f"{split}-*.tfrecord")))
  if "files" in manifest:
    names, counts = manifest["files"], manifest["shard_records"]
  else:  # written before manifests listed their files: by one writer, in shards of shard_size
    names = [n for n in present if n[len(split) + 1:-len(".tfrecord")].isdigit()]
    size, full = manifest["shard_size"], len(names) - 1
    counts = [size] * full + [manifest["records"] - size * full] if names else []
  if not names and manifest["records"]:
    raise ConfigError(f"{directory} has a {split}.json but no {split} shards")
  missing = sorted(set(names) - set(present))
  if missing:
    raise ConfigError(f"{directory} lacks {len(missing)} of the {len(names)} {split} shards its "
                      f"{split}.json lists ({missing[0]} first)")
  return [os.path.join(directory, name) for name in names], counts


def shard_paths(directory: str, split: str) -> list[str]:
  return shard_files(directory, split)[0]


def serialize(key: bytes, codes: np.ndarray, caption: bytes) -> bytes:
  tf = tf_cpu.tensorflow()
  feature = {
      "codes": tf.train.Feature(int64_list=tf.train.Int64List(value=codes.tolist())),
      "caption": tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption])),
      "key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[key])),
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parser(tokens_per_image: int):
  """A tf function: serialised record -> {"codes": int32 [tokens_per_image], "caption": string,
  "key": string}."""
  tf = tf_cpu.tensorflow()
  spec = {"codes": tf.io.FixedLenFeature([tokens_per_image], tf.int64),
          "caption": tf.io.FixedLenFeature([], tf.string),
          "key": tf.io.FixedLenFeature([], tf.string)}

  def parse(record):
    ex = tf.io.parse_single_example(record, spec)
    return {"codes": tf.cast(ex["codes"], tf.int32), "caption": ex["caption"], "key": ex["key"]}
  return parse


def captions(paths: list[str]):
  """Every caption in the shards, as bytes, in file order."""
  return strings(paths, "caption")


def keys(paths: list[str]):
  """Every record's key in the shards, as bytes, in file order."""
  return strings(paths, "key")


def strings(paths: list[str], name: str):
  """Every record's bytes feature `name` in the shards, in file order."""
  tf = tf_cpu.tensorflow()
  spec = {name: tf.io.FixedLenFeature([], tf.string)}
  ds = tf.data.TFRecordDataset(paths).map(lambda r: tf.io.parse_single_example(r, spec)[name])
  yield from ds.as_numpy_iterator()


def read_split(directory: str, split: str, limit: int) -> tuple[np.ndarray, list[str]]:
  """Codes [N, tokens_per_image] and captions of the first N <= limit records of a split."""
  tf = tf_cpu.tensorflow()
  parse = parser(read_manifest(directory, split)["tokens_per_image"])
  ds = tf.data.TFRecordDataset(shard_paths(directory, split)).map(parse).take(limit)
  codes, captions = [], []
  for ex in ds.as_numpy_iterator():
    codes.append(ex["codes"])
    captions.append(ex["caption"].decode("utf-8", "replace"))
  if not captions:
    raise ConfigError(f"{directory} has no {split} records")
  return np.stack(codes), captions


def write_split(examples: Iterator, records_of: Callable[[list], list[bytes]], out: str,
                split: str, settings: dict, batch_size: int, total: Optional[int] = None,
                skipped: Optional[collections.Counter] = None,
                allow_empty: Optional[bool] = False, unit: str = "record",
                count: Optional[Callable[[list[str]], dict]] = None,
                host: tuple[int, int] = (0, 1)) -> dict:
  """Writes the serialised records that `records_of` makes of each `batch_size` chunk of
  `examples` into shards of settings["shard_size"] records, and then OUT/SPLIT.json; returns its
  counts (a complete split's as they are). Each shard is written under a temporary name and
  renamed when whole, and a run resumes after the whole shards in `out`, skipping (without making
  records of) the examples they hold. `settings` is the split's made_by (cm3jax/core/provenance.py:
  the source, the encoder and the sizes that decide the shards' contents, with tokens_per_image
  and codebook_size): it is recorded in OUT/SPLIT.settings.json before the first shard and in
  OUT/SPLIT.json with its fingerprint, and a resume or a reuse with other settings is refused.
  `skipped` counts what the source and `examples` left out, by reason. A split with no record is
  an error unless `allow_empty` (None: the caller has no --allow_empty_splits to name).
  `count(shard paths)` adds fields of the whole split to OUT/SPLIT.json (the records per task of
  task shards).

  With host = (h, n > 1), `examples` are host h's share: they go to its part (the module's
  docstring), whose counts it returns; `merge_parts` makes the split. The made_by records n,
  so that no part is resumed by another number of hosts."""
  shard_size = settings["shard_size"]
  if batch_size < 1 or shard_size < 1:
    raise ConfigError(f"--batch_size={batch_size} and --shard_size={shard_size} must be at least 1")
  try:
    files.makedirs(out)
  except OSError as e:
    raise ConfigError(f"--out={out} is not a directory that can be made: {e.strerror}") from None
  num_hosts = host[1]
  settings = {**settings, "hosts": num_hosts}
  part = part_name(split, *host)
  for manifest in (manifest_path(out, split), manifest_path(out, part)):  # the split's first
    if files.exists(manifest):
      summary = files.read_json(manifest)
      provenance.check(summary, settings, f"the complete {split} split in {out}", REMEDY)
      return summary
  done_shards = 0
  while files.exists(shard_path(out, part, done_shards)):
    done_shards += 1
  provenance.start(settings_path(out, split), settings,
                   f"the {done_shards} shards of {part} in {out}", done_shards > 0, REMEDY)
  skip = done_shards * shard_size
  skipped = collections.Counter() if skipped is None else skipped
  examples = iter(examples)
  bar = tqdm.tqdm(total=total, unit=unit, desc=f"{part}", file=sys.stdout, dynamic_ncols=True,
                  disable=not sys.stdout.isatty())
  if sum(1 for _ in itertools.islice(examples, skip)) < skip:
    raise ConfigError(f"{out} holds {done_shards} shards of {part}, more than this dataset fills; "
                      "use a new --out")
  bar.update(skip + sum(skipped.values()))
  shard_records = [shard_size] * done_shards
  while True:
    records = []
    shard_items = itertools.islice(examples, shard_size)
    while chunk := list(itertools.islice(shard_items, batch_size)):
      records.extend(records_of(chunk))
      bar.update(len(chunk))
    if not records:
      break
    write_records(shard_path(out, part, len(shard_records)), records)
    shard_records.append(len(records))
  bar.close()
  names = [os.path.basename(shard_path(out, part, i)) for i in range(len(shard_records))]
  summary = {"split": split, "records": sum(shard_records), "shards": len(names), **settings,
             provenance.FINGERPRINT: provenance.fingerprint(settings), "skipped": dict(skipped),
             "files": names, "shard_records": shard_records}
  if num_hosts == 1:
    check_not_empty(summary, allow_empty)
  if count:
    summary.update(count([os.path.join(out, name) for name in names]))
  files.write_json(manifest_path(out, part), summary)
  return summary


def write_records(path: str, records: Sequence[bytes]):
  """A TFRecord file of `records`, whole or not at all."""
  tf = tf_cpu.tensorflow()
  with files.atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
    for record in records:
      writer.write(record)


def check_not_empty(summary: dict, allow_empty: Optional[bool]):
  if not summary["records"] and not allow_empty:
    remedy = "" if allow_empty is None else " (--allow_empty_splits writes an empty split)"
    raise ConfigError(f"split {summary['split']} has no usable example (skipped: "
                      f"{summary['skipped'] or 'none'}); nothing written{remedy}")


def merge_parts(out: str, split: str, num_hosts: int, allow_empty: bool = False,
                poll_seconds: float = 10.0) -> dict:
  """Process 0's last step of a split written by `num_hosts` hosts: waits until every host's
  part is complete, then writes OUT/SPLIT.json with the parts' counts summed, their skip reasons
  merged and their files listed in host order; returns it (or the split's as it is, once
  merged)."""
  if files.exists(manifest_path(out, split)):
    return read_manifest(out, split)
  paths = [manifest_path(out, part_name(split, h, num_hosts)) for h in range(num_hosts)]
  waiting = [h for h, p in enumerate(paths) if not files.exists(p)]
  while waiting:
    print(f"{split}: waiting for {len(waiting)} of {num_hosts} hosts to finish their parts "
          f"(host {waiting[0]} first)", flush=True)
    time.sleep(poll_seconds)
    waiting = [h for h in waiting if not files.exists(paths[h])]
  parts = [files.read_json(path) for path in paths]
  first = parts[0]
  for h, part in enumerate(parts):
    if part[provenance.FINGERPRINT] != first[provenance.FINGERPRINT]:
      raise ConfigError(f"host {h}'s part of {split} in {out} was made otherwise than host 0's; "
                        f"{REMEDY}")
  skipped = collections.Counter()
  for part in parts:
    skipped.update(part["skipped"])
  summary = {**first, "records": sum(p["records"] for p in parts),
             "shards": sum(p["shards"] for p in parts), "skipped": dict(skipped),
             "files": [n for p in parts for n in p["files"]],
             "shard_records": [n for p in parts for n in p["shard_records"]]}
  check_not_empty(summary, allow_empty)
  files.write_json(manifest_path(out, split), summary)
  return summary
