"""Train the VQGAN image tokenizer on the built-in shapes dataset.

  python -m cm3jax.train_vqgan --config=configs/vqgan_shapes.py --workdir=workdirs/vqgan

Reconstruction loss (L1 or L2), an optional perceptual loss, the vector-quantisation losses, and
after `disc_start` steps a PatchGAN discriminator with hinge loss and taming's adaptive weight.
Dead codes are restarted from encoder outputs. Data-parallel over the mesh; resumes from the latest
checkpoint in --workdir.
"""

from cm3jax import cli
from cm3jax.training import train_vqgan


def _define_flags():
  """Flags of the command line only, so that tests and tools can import this module."""
  cli.define_run_flags("Checkpoints and TensorBoard events go here; a run resumes from it.")


def main(FLAGS):
  train_vqgan.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  cli.run("train_vqgan", _define_flags, main)
