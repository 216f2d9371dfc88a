"""Retrieve, offline, the documents each record of the code shards is trained with.

  python -m cm3jax.build_neighbours --retriever=workdirs/clip --memory=workdirs/tiny/memory       --codes=workdirs/tiny/codes --vqgan=workdirs/tiny/vqgan --out=workdirs/tiny/neighbours

Each record queries the bank by its text (query dropout) and by its image; the strategy and the
file format are in cm3jax/retrieval/neighbours.py. The CM3 stream reads the result with
cm3.retrieval.neighbours_dir: one file per code file, holding each record's neighbours and
their documents (read from the bank by record id), so that the stream never holds the bank in
memory. Files are written whole, so a second run resumes after the ones it has; a resume or a
reuse of neighbours made from another bank, VQGAN or codes, or with other settings, is refused
(cm3jax/core/provenance.py). With --multihost each host does code files host, host + hosts, ...
"""

from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.prepare import build_neighbours
from cm3jax.retrieval import mips, retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer


def _define_flags():
  flags.DEFINE_string("retriever", None, "The retriever the bank was built with.")
  flags.DEFINE_string("memory", None, "A memory bank (cm3jax.build_memory --out).")
  flags.DEFINE_string("codes", None, "Code shards whose records get neighbours.")
  flags.DEFINE_string("vqgan", None, "The VQGAN workdir that wrote the codes.")
  flags.DEFINE_string("out", None, "Directory of the neighbour shards.")
  flags.DEFINE_list("splits", ["train", "validation"], "Splits of the code shards.")
  flags.DEFINE_integer("per_record", 4, "Neighbours kept per record.")
  flags.DEFINE_integer("candidates", 128, "Candidates searched per query (enough to reach past a "
                       "query's own duplicates).")
  flags.DEFINE_float("query_dropout", 0.2, "Share of a text query's tokens dropped.")
  flags.DEFINE_float("max_relevance", 0.9, "Candidates more relevant than this are skipped.")
  flags.DEFINE_enum("engine", "exact", mips.ENGINES, "MIPS engine.")
  flags.DEFINE_integer("seed", build_neighbours.SEED, "Seed of the query dropout.")
  flags.DEFINE_integer("head_width", 64, "Head width of a state-dict CLIP (heads are not stored).")
  flags.DEFINE_string("clip_activation", "", "MLP activation of a state-dict CLIP that does "
                      "not record it: gelu or quick_gelu.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first; each host "
                    "does its share of the code files.")


def main(FLAGS):
  for name in ("retriever", "memory", "codes", "vqgan", "out"):
    if not getattr(FLAGS, name):
      raise ConfigError(f"--{name} is required")
  infos = build_neighbours.build(
      retriever.load(FLAGS.retriever, FLAGS.head_width, FLAGS.clip_activation),
      ImageTokenizer.load(FLAGS.vqgan), FLAGS.memory, FLAGS.codes, FLAGS.out, FLAGS.splits,
      FLAGS.engine, per_record=FLAGS.per_record, candidates=FLAGS.candidates,
      query_dropout=FLAGS.query_dropout, max_relevance=FLAGS.max_relevance, seed=FLAGS.seed)
  for info in infos:
    print(f"neighbours of {info['split']}: {info['records']} records x {info['per_record']} in "
          f"{FLAGS.out}")


if __name__ == "__main__":
  cli.run("build_neighbours", _define_flags, main)
