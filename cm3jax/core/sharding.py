"""The device mesh and the one table that places logical axes on it (docs/design.md, "Sharding")."""

import contextlib
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cm3jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters are sharded over `fsdp` along d_model and over `tensor`
# along heads / MLP / vocabulary; activations are sharded over `data` and `fsdp` along the batch.
LOGICAL_AXIS_RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("pos", None),
    ("word_embed", None),
    ("layers", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

BATCH_AXES = ("act_batch", "act_len")
BATCH_MESH_AXES = dict(LOGICAL_AXIS_RULES)["act_batch"]  # the mesh axes a batch's rows split over


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Sizes of ("data", "fsdp", "tensor"); one size may be -1 for the devices left over."""
  sizes = [mesh_config[axis] for axis in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ConfigError(f"mesh {described}: each size must be a positive integer, and at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh {described}: {num_devices} devices do not divide by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {described} needs {math.prod(sizes)} devices but {num_devices} "
                      "are available; set one axis to -1 to use all of them")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The mesh of ("data", "fsdp", "tensor") over `devices` (default: all). Over several TPU
  slices (multislice: slices joined by the data-center network, not ICI), `mesh_config`'s sizes
  are one slice's, and the data axis spans the slices as well: data parallelism across slices,
  whose only traffic is the gradients' reduction. mesh_config["slices"] is how many the devices
  span (-1 or absent: as many as they do)."""
  devices = list(jax.devices() if devices is None else devices)
  slices = slice_count(devices)
  wanted = mesh_config.get("slices", -1)
  if wanted not in (-1, slices):
    raise ConfigError(f"mesh.slices={wanted} but the {len(devices)} devices span {slices} "
                      f"slice{'s' * (slices > 1)}: set mesh.slices={slices} (or -1)")
  shape = mesh_shape(mesh_config, len(devices) // slices)
  if slices > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(
        shape, (slices, 1, 1), devices, allow_split_physical_axes=True)
  elif devices[0].platform == "cpu":  # Host devices have no physical topology to respect.
    device_array = np.array(devices).reshape(shape)
  else:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def slice_count(devices: Sequence[Any]) -> int:
  """How many TPU slices `devices` span (1 for other devices, which have no slice_index)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def logical_sharding(logical_specs, mesh: Mesh):
  """A tree of logical PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def sharded_shapes(init_fn: Callable, mesh: Mesh, *args):
  """ShapeDtypeStructs of what `init_fn(*args)` returns, each carrying its sharding on `mesh`:
  values boxed with logical axis names (nn.with_logical_partitioning) are placed by the table,
  the others replicated. Nothing is computed; `jax.jit(init_fn, out_shardings=...)` with these
  shardings then creates the values already sharded."""
  boxed = jax.eval_shape(init_fn, *args)
  shardings = logical_sharding(nn.get_partition_spec(boxed), mesh)
  # Unboxed without a constraint, which inside another mesh's context would apply to shapes.
  is_boxed = lambda x: isinstance(x, nn.Partitioned)
  values = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_boxed(x) else x, boxed,
                        is_leaf=is_boxed)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                         sharding=_fitted(sh, s.shape)),
                      values, shardings)


def _fitted(sharding: NamedSharding, shape) -> NamedSharding:
  """`sharding` with the mesh axes of each dimension they do not divide dropped (that
  dimension replicated): imported models may have widths such as 36 or 45."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  size = lambda axes: math.prod(sharding.mesh.shape[a] for a in (
      () if axes is None else (axes,) if isinstance(axes, str) else axes))
  fitted = [axes if n % size(axes) == 0 else None for axes, n in zip(spec, shape)]
  if fitted == spec:
    return sharding
  return NamedSharding(sharding.mesh, PartitionSpec(*fitted), memory_kind=sharding.memory_kind)


def shardings_of(shapes):
  """The shardings of a tree of sharded ShapeDtypeStructs (or arrays)."""
  return jax.tree.map(lambda s: s.sharding, shapes)


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """An array's `axis` (a batch's rows) split over data x fsdp, its other axes replicated."""
  return NamedSharding(mesh, PartitionSpec(*(None,) * axis, BATCH_MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_devices(mesh: Mesh) -> int:
  """How many parts a batch's rows are split into (data x fsdp): a batch size must divide by it."""
  return math.prod(mesh.shape[axis] for axis in BATCH_MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
  """Context for tracing and running sharded code: `nn.with_logical_constraint` inside it places
  activations on `mesh` by the table."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield


def describe(mesh: Mesh) -> str:
  slices = slice_count(mesh.devices.flat)
  return (" ".join(f"{axis}={size}" for axis, size in mesh.shape.items())
          + (f" ({slices} slices on the data axis)" if slices > 1 else ""))
