r"""tokenize_text on one long document (a file with no blank line); prints a table.

  python -m benchmarks.tokenize_text                      # 2, 4, 8 and 100 MB
  python -m benchmarks.tokenize_text --sizes_mb=2,4,8

Each file is random lower-case words and spaces, with a newline every 80 characters
and never a blank line, so the whole file is one document that text_corpus.chunks cuts into
records of at most --max_chars characters. For each size: the seconds of the cut alone and of the
whole split written as shards (cm3jax.prepare.tokenize_text.tokenize_split), and the records written. A
linear cutter takes about twice the seconds for twice the size.
"""

import os
import tempfile
import time

import numpy as np
from absl import app, flags

from cm3jax.data import text_corpus, tf_cpu
from cm3jax.prepare import tokenize_text

_SIZES_MB = flags.DEFINE_list("sizes_mb", ["2", "4", "8", "100"], "File sizes, in MB (10^6 B).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", tokenize_text.MAX_CHARS, "Characters per record.")


def one_long_document(size: int, seed: int = 0) -> bytes:
  """`size` bytes of words (1 in 6 characters a space), a newline every 80 characters."""
  rng = np.random.default_rng(seed)
  text_N = rng.integers(ord("a"), ord("z") + 1, size, dtype=np.uint8)
  text_N[rng.integers(0, 6, size, dtype=np.uint8) == 0] = ord(" ")
  text_N[79::80] = ord("\n")
  text_N[0] = text_N[-1] = ord("a")
  return text_N.tobytes()


def main(_):
  max_chars = _MAX_CHARS.value
  tf_cpu.tensorflow()  # imported before the timing
  print(f"{os.cpu_count()} CPU cores; --max_chars={max_chars}")
  print("| file | cut s | tokenize_text s | records | MB/s |\n|---|---|---|---|---|")
  for size_mb in map(float, _SIZES_MB.value):
    data = one_long_document(int(size_mb * 1e6))
    with tempfile.TemporaryDirectory() as directory:
      path = os.path.join(directory, "train.txt")
      with open(path, "wb") as f:
        f.write(data)
      text = data.decode()
      t = time.perf_counter()
      text_corpus.chunks(text, max_chars)
      cut = time.perf_counter() - t
      del text
      t = time.perf_counter()
      summary = tokenize_text.tokenize_split(f"files:{path}", "train",
                                             os.path.join(directory, "out"), max_chars=max_chars)
      whole = time.perf_counter() - t
    assert summary["skipped"] == {}, summary["skipped"]
    print(f"| {size_mb:g} MB, no blank line | {cut:.3f} | {whole:.2f} | {summary['records']:,} | "
          f"{size_mb / whole:.1f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
