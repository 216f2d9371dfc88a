"""The `shapes` dataset as a TFDS builder (cm3jax/data/shapes.py renders it).

Two builds: `shapes` (the default: train, validation, test and tokenizer splits of 20,000 /
1,000 / 1,000 / 20,000 images) and `shapes/small` (512 / 128 / 128 / 512, the same first
examples, for tests and quick looks).
"""

import dataclasses

import numpy as np

from cm3jax.config import ConfigError
from cm3jax.data import shapes, tf_cpu

tf_cpu.tensorflow()
import tensorflow_datasets as tfds  # noqa: E402  (after TensorFlow has let go of the GPUs)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  sizes: dict = dataclasses.field(default_factory=dict)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes with exact captions; the test split holds out colour-shape pairs."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "A tokenizer split of images that cover every colour-shape pair."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", sizes={k: n for k, (_, n) in shapes.SPLITS.items()}),
      ShapesConfig(name="small", sizes=shapes.SMALL_SPLITS),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(shapes.RESOLUTION, shapes.RESOLUTION, 3)),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "caption"),
        description=__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # Rendered locally; nothing is downloaded.
    return {split: self._generate_examples(split) for split in shapes.SPLITS}

  def _generate_examples(self, split):
    for index in range(self.builder_config.sizes[split]):
      yield index, shapes.example(split, index)


def builder(name: str, data_dir: str) -> Shapes:
  """`shapes` or `shapes/small`, prepared under `data_dir` (built there the first time)."""
  base, _, config = name.partition("/")
  configs = [c.name for c in Shapes.BUILDER_CONFIGS]
  if base != "shapes" or (config and config not in configs):
    raise ConfigError(f"data={name!r}: expected shapes or shapes/{{{','.join(configs)}}}")
  b = Shapes(config=config or "default", data_dir=data_dir)
  b.download_and_prepare()
  return b


def load(name: str, data_dir: str, split: str) -> dict[str, np.ndarray]:
  """A split as arrays: `image` uint8 [N, 32, 32, 3] and `caption` bytes [N]."""
  b = builder(name, data_dir)
  if split not in b.info.splits:
    raise ConfigError(f"split {split!r} is not one of {name}'s: {sorted(b.info.splits)}")
  return tfds.as_numpy(b.as_dataset(split=split, batch_size=-1))
