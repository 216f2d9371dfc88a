"""Train the CM3 token model on a device mesh, or compile its train step for a TPU pod.

  python -m cm3jax.train --config=configs/tiny.py --workdir=/tmp/cm3jax_tiny
  python -m cm3jax.train --config=configs/7b.py --compile_only --topology=v5p:4x4x4
  python -m cm3jax.train --config=configs/7b.py --compile_only --topology=v5e:16x16 --num_slices=2

A run resumes from the latest checkpoint in --workdir; a new run with --config.init_from=W starts
from the parameters of W's newest checkpoint (instruction tuning: configs/tiny_sft.py). Config
fields are overridden on the command line: --config.num_train_steps=100 --config.model.num_layers=2.
"""

import sys

from absl import flags

from cm3jax import cli
from cm3jax.training import aot, train


def _define_flags():
  """Flags of the command line only, so that tests and tools can import this module."""
  cli.define_run_flags("Checkpoints and TensorBoard events go here; a run resumes from it.")
  flags.DEFINE_bool("compile_only", False,
                    "Compile the train step for --topology, report memory and FLOPs, exit.")
  flags.DEFINE_string("topology", None, "TPU topology for --compile_only: v5p:4x4x4.")
  flags.DEFINE_integer("num_slices", 1, "Slices of --topology for --compile_only (multislice: "
                       "the data axis spans them, config mesh.slices).")


def main(FLAGS):
  if FLAGS.compile_only:
    report = aot.compile_train_step(FLAGS.config, FLAGS.topology, FLAGS.num_slices)
    print("\n".join(report.lines()))
    sys.exit(0 if report.fits else 1)
  train.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run("train", _define_flags, main)
