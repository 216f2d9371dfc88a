"""Facts about accelerators: peak bf16 FLOP/s for MFU, and TPU topologies for ahead-of-time
compilation on a machine without TPUs (README, "Compiling for a TPU pod without one")."""

import math
import os
from typing import Optional

from cm3jax.config import ConfigError

# Substring of jax's device_kind -> dense bf16 peak TFLOP/s of one device.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
)

# TPU generation in a topology name ("v5p:4x4x4") -> (HBM GiB per chip, chips per host).
TPU_CHIPS = {
    "v4": (32, (2, 2, 1)),
    "v5p": (95, (2, 2, 1)),
    "v5e": (16, (2, 2, 1)),
    "v6e": (32, (2, 2, 1)),
}


def peak_tflops(device_kind: str) -> Optional[float]:
  for fragment, tflops in PEAK_BF16_TFLOPS:
    if fragment in device_kind:
      return tflops
  return None


def tpu_topology(name: str, num_slices: int = 1):
  """A topology name such as "v5p:4x4x4" -> (devices, HBM bytes per device), the devices of
  `num_slices` such slices (multislice).

  Needs `libtpu` installed; no TPU has to be attached.
  """
  generation, _, dims = name.partition(":")
  if generation not in TPU_CHIPS or not dims:
    raise ConfigError(f"topology {name!r}: expected GENERATION:AxBxC with GENERATION one of "
                      f"{sorted(TPU_CHIPS)}, e.g. v5p:4x4x4 or v5e:4x4")
  try:
    num_chips = math.prod(int(d) for d in dims.split("x"))
  except ValueError:
    raise ConfigError(f"topology {name!r}: {dims!r} is not a shape like 4x4x4") from None
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} must be at least 1")
  try:
    import libtpu  # noqa: F401  (only to give a clear error when it is missing)
  except ImportError:
    raise ConfigError("--compile_only needs libtpu: pip install -r requirements-tpu.txt") from None
  # No TPU is driven here, so other processes that loaded libtpu (a training job, parallel
  # compiles) are no reason to stop.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  hbm_gib, chips_per_host = TPU_CHIPS[generation]
  try:
    topology = topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name="default",
        chips_per_host_bounds=chips_per_host, num_slices=num_slices)
  except Exception as e:  # libtpu reports bad shapes as a generic runtime error.
    raise ConfigError(f"topology {name!r}: {str(e).splitlines()[0]}") from None
  devices = topology.devices
  return devices, hbm_gib * 2**30 * num_chips * num_slices // len(devices)
