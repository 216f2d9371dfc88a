r"""Host memory of the retrieval-augmented CM3 stream as the memory bank grows; prints a table.

  python -m benchmarks.retrieval_memory                  # banks of 10,000 and 100,000 documents
  python -m benchmarks.retrieval_memory --bank=2000      # a quick look (2,000 and 20,000)

Writes a train split of --records records of 1,024 codes (CM3Leon's 32x32) in 8 code files.
Then, for a bank of --bank documents and one ten times larger: the bank's documents as
build_memory writes them (memory.write_documents, one file per 10,000 records), three neighbours
per record drawn at random from the bank and read back by record id (memory.Documents, as
build_neighbours does) into the neighbour files beside the code files, and the stream read once
through, with 2 retrieved documents before each record, in a fresh process that reports its peak
resident memory. The row "none" is the same stream without retrieval. The stream before the
neighbour files held the bank split's codes (int32) and captions in memory: that column is
computed from the bank's size, not measured.
"""

import multiprocessing
import os
import resource
import tempfile
import time

import numpy as np
from absl import app, flags

from cm3jax.core.vocab import Vocab
from cm3jax.data import cm3, code_shards, shapes
from cm3jax.prepare import train_tokenizer
from cm3jax.retrieval import memory, neighbours

_RECORDS = flags.DEFINE_integer("records", 2000, "Records of the split the stream reads.")
_BANK = flags.DEFINE_integer("bank", 10_000, "Documents of the smaller bank (the other: 10x).")
CODES, CODEBOOK, FILES, BANK_FILE, PER_RECORD, DOCUMENTS = 1024, 8192, 8, 10_000, 3, 2


def caption(i: int) -> bytes:
  return shapes.scene("train", i).caption().encode()


def write_split(directory: str, records: int):
  rng = np.random.default_rng(0)
  per_file = records // FILES
  paths = [code_shards.shard_path(directory, "train", f) for f in range(FILES)]
  for f, path in enumerate(paths):
    code_shards.write_records(path, [
        code_shards.serialize(b"%d" % i, rng.integers(0, CODEBOOK, CODES), caption(i))
        for i in range(f * per_file, (f + 1) * per_file)])
  code_shards.files.write_json(code_shards.manifest_path(directory, "train"), {
      "split": "train", "records": per_file * FILES, "shards": FILES,
      "files": [os.path.basename(p) for p in paths], "shard_records": [per_file] * FILES,
      "tokens_per_image": CODES, "codebook_size": CODEBOOK, "skipped": {}})
  return paths, per_file


def write_bank(bank: str, size: int) -> memory.Documents:
  os.makedirs(bank)
  rng = np.random.default_rng(1)
  counts = [min(BANK_FILE, size - s) for s in range(0, size, BANK_FILE)]
  for shard, count in enumerate(counts):
    first = shard * BANK_FILE
    memory.write_documents(bank, shard, [caption(first + i) for i in range(count)],
                           rng.integers(0, CODEBOOK, (count, CODES)), CODEBOOK)
  return memory.Documents(bank, {"shard_records": counts})


def write_neighbours(directory: str, bank: memory.Documents, per_file: int) -> float:
  """The neighbour files of the split, each record's drawn at random; returns records/s."""
  rng = np.random.default_rng(2)
  start = time.perf_counter()
  for f in range(FILES):
    ids = rng.integers(0, len(bank), (per_file, PER_RECORD))
    captions, codes = bank.get(ids.reshape(-1))
    neighbours.write_shard(directory, "train", f, [
        neighbours.serialize(b"%d" % (f * per_file + r), ids[r],
                             captions[r * PER_RECORD:(r + 1) * PER_RECORD],
                             codes[r * PER_RECORD:(r + 1) * PER_RECORD])
        for r in range(per_file)])
  return FILES * per_file / (time.perf_counter() - start)


def stream_peak(codes_dir: str, spm_model: bytes, beside) -> tuple[float, float]:
  """(peak resident MB, records/s) of this process reading the stream once."""
  vocab = Vocab(spm_model, num_sentinels=16, num_image_codes=CODEBOOK)
  retrieved = None if beside is None else cm3.Retrieved(beside, PER_RECORD, DOCUMENTS)
  start = time.perf_counter()
  records = 0
  for batch in cm3.batches(codes_dir=codes_dir, split="train", vocab=vocab, seq_len=4096,
                           rows=4, seed=(0, 0), repeat=False, retrieved=retrieved):
    records = int(batch["position"][-1][1])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, records / (
      time.perf_counter() - start)


def main(_):
  spawn = multiprocessing.get_context("spawn")  # a fresh process per row: its own peak
  spm_model = train_tokenizer.train([caption(i).decode() for i in range(2000)], 320)
  print("\n| bank documents | bank on disk (MB) | neighbours resolved (records/s) | stream peak "
        "RSS (MB) | stream records/s | the earlier stream's bank in memory: int32 codes + "
        "captions (MB, computed) |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as work, spawn.Pool(1, maxtasksperchild=1) as pool:
    codes_dir = os.path.join(work, "codes")
    os.makedirs(codes_dir)
    _, per_file = write_split(codes_dir, _RECORDS.value)
    peak, per_s = pool.apply(stream_peak, (codes_dir, spm_model, None))
    print(f"| none | - | - | {peak:,.0f} | {per_s:,.0f} | - |", flush=True)
    for size in (_BANK.value, 10 * _BANK.value):
      bank_dir, near = os.path.join(work, f"bank{size}"), os.path.join(work, f"near{size}")
      bank = write_bank(bank_dir, size)
      os.makedirs(near)
      resolved = write_neighbours(near, bank, per_file)
      on_disk = sum(os.path.getsize(os.path.join(bank_dir, n)) for n in os.listdir(bank_dir))
      peak, per_s = pool.apply(stream_peak, (codes_dir, spm_model, [
          neighbours.shard_path(near, "train", f) for f in range(FILES)]))
      held = size * CODES * 4 + sum(len(caption(i)) for i in range(size))
      print(f"| {size:,} | {on_disk / 2**20:,.0f} | {resolved:,.0f} | {peak:,.0f} | "
            f"{per_s:,.0f} | {held / 2**20:,.0f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
