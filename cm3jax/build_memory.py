"""Embed every record of a split's code shards into a memory bank of document vectors.

  python -m cm3jax.build_memory --retriever=workdirs/clip --codes=workdirs/tiny/codes       --vqgan=workdirs/tiny/vqgan --out=workdirs/tiny/memory

A record's image is its codes decoded by the VQGAN (the picture the token model sees); its
vector is the mean of the L2-normalised text and image embeddings, normalised again. Records
whose caption is empty or not UTF-8, or whose codes the VQGAN does not have, are counted and
left out. The bank has one shard per code file, with the vectors of its records and the
documents themselves (read by record id when building neighbours and when sampling). Shards are
written whole, so a second run resumes after the ones it has; a resume or a reuse by another
retriever or VQGAN, or of other codes, is refused (cm3jax/core/provenance.py). With --multihost
each host embeds code files host, host + hosts, ... and reads only those
(cm3jax/retrieval/memory.py).
"""

from absl import flags

from cm3jax import cli
from cm3jax.config import ConfigError
from cm3jax.prepare import build_memory
from cm3jax.retrieval import retriever
from cm3jax.vqgan.tokenizer import ImageTokenizer


def _define_flags():
  flags.DEFINE_string("retriever", None, "A train_retriever workdir, a Hugging Face CLIPModel "
                      "directory or an OpenAI / open_clip state dict.")
  flags.DEFINE_string("codes", None, "Code shards (cm3jax.tokenize_images --out).")
  flags.DEFINE_string("vqgan", None, "The VQGAN workdir that wrote the codes.")
  flags.DEFINE_string("out", None, "Directory of the memory bank.")
  flags.DEFINE_string("split", "train", "Split of the code shards to embed.")
  flags.DEFINE_integer("batch_size", 256, "Documents embedded per call.")
  flags.DEFINE_integer("head_width", 64, "Head width of a state-dict CLIP (heads are not stored).")
  flags.DEFINE_string("clip_activation", "", "MLP activation of a state-dict CLIP that does "
                      "not record it: gelu or quick_gelu.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first; each host "
                    "embeds its share of the shards.")


def main(FLAGS):
  for name in ("retriever", "codes", "vqgan", "out"):
    if not getattr(FLAGS, name):
      raise ConfigError(f"--{name} is required")
  r = retriever.load(FLAGS.retriever, FLAGS.head_width, FLAGS.clip_activation)
  manifest = build_memory.build(r, ImageTokenizer.load(FLAGS.vqgan), FLAGS.codes, FLAGS.split,
                                FLAGS.out, FLAGS.batch_size)
  skipped = ", ".join(f"{n} {why}" for why, n in manifest["skipped"].items()) or "none"
  print(f"memory bank {FLAGS.out}: {manifest['records']} documents of {manifest['dim']} dims "
        f"from {manifest['split']}; skipped: {skipped}")


if __name__ == "__main__":
  cli.run("build_memory", _define_flags, main)
