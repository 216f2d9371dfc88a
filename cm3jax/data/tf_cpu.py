"""TensorFlow for input pipelines only: imported on first use and kept off the accelerators, so
that it never competes with JAX for device memory (docs/design.md, "Sharding")."""

import functools


@functools.cache
def tensorflow():
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  return tf
