r"""Throughput of the CM3 tf.data pipeline, beside what the tiny train step consumes; prints a table.

  python -m benchmarks.data_pipeline

Writes code shards of random codes with shapes captions into a temporary directory (no VQGAN
needed), then times the pipeline from shard reading to numpy batches, for CM3Leon-shaped
documents (1,024 codes of 8,192 per image, seq 4096) and for configs/tiny.py (16 codes of 1,024,
seq 128). The last row times the tiny config's jitted train step on the same machine.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import train_step
from cm3jax.config import load_config_file
from cm3jax.core.vocab import Vocab
from cm3jax.data import cm3, code_shards, shapes, tf_cpu
from cm3jax.prepare import train_tokenizer

_BATCHES = flags.DEFINE_integer("batches", 30, "Timed batches per row, after 3 warm-up batches.")

SETUPS = {  # name -> (tokens per image, codebook, seq_len, rows per batch)
    "CM3Leon-shaped, seq 4096": (1024, 8192, 4096, 8),
    "configs/tiny.py, seq 128": (16, 1024, 128, 32),
}


def write_codes(directory: str, tokens_per_image: int, codebook: int, records: int = 4000):
  tf = tf_cpu.tensorflow()
  rng = np.random.default_rng(0)
  shard_size = 1000
  for shard in range(records // shard_size):
    with tf.io.TFRecordWriter(code_shards.shard_path(directory, "train", shard)) as writer:
      for i in range(shard * shard_size, (shard + 1) * shard_size):
        caption = shapes.scene("train", i).caption().encode()
        writer.write(code_shards.serialize(b"%d" % i, rng.integers(0, codebook, tokens_per_image),
                                           caption))
  with open(code_shards.manifest_path(directory, "train"), "w") as f:
    json.dump({"split": "train", "records": records, "shards": records // shard_size,
               "tokens_per_image": tokens_per_image, "codebook_size": codebook, "skipped": {}}, f)


def time_pipeline(directory, vocab, seq_len, rows, batches):
  it = cm3.batches(codes_dir=directory, split="train", vocab=vocab, seq_len=seq_len, rows=rows,
                   seed=(0, 0))
  for _ in range(3):
    next(it)
  documents = 0
  t = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    documents += int(np.sum(batch["inputs"] == 2))  # each document starts with </s>
  seconds = time.perf_counter() - t
  return documents / seconds, batches * rows * seq_len / seconds


def time_tiny_train_step(steps):
  config = load_config_file("configs/tiny.py")
  config.data = "synthetic"
  seconds, _ = train_step.run(config, steps)
  return config.global_batch_size * config.seq_len / seconds


def main(_):
  captions = [shapes.scene("train", i).caption() for i in range(5000)]
  spm = train_tokenizer.train(captions, 320)
  print(f"{os.cpu_count()} CPU cores; {_BATCHES.value} batches per row")
  print("| pipeline | examples/s | tokens/s |\n|---|---|---|")
  rates = {}
  for name, (tokens, codebook, seq_len, rows) in SETUPS.items():
    with tempfile.TemporaryDirectory() as directory:
      write_codes(directory, tokens, codebook)
      vocab = Vocab(spm, 16, codebook)
      examples, rates[name] = time_pipeline(directory, vocab, seq_len, rows, _BATCHES.value)
    print(f"| {name} ({rows} x {seq_len} per batch) | {examples:,.0f} | {rates[name]:,.0f} |",
          flush=True)
  consumed = time_tiny_train_step(_BATCHES.value)
  tiny = rates["configs/tiny.py, seq 128"]
  print(f"| configs/tiny.py train step (consumes) | | {consumed:,.0f} |")
  print(f"\npipeline / train step, tiny config: {tiny / consumed:.1f}x")


if __name__ == "__main__":
  app.run(main)
