r"""The training step compiled for an H100 on a machine without one; prints a table of what the
compiled step holds and moves through memory.

  JAX_PLATFORMS=cpu python -m benchmarks.gpu_compile --sizes=350m --batch=8 --remat=none \
      --attention=cudnn --scan=false --ce_chunk=1024 --top=12

Needs jax's CUDA plugin (the GPU install in the README, or only jax-cuda13-plugin,
jax-cuda13-pjrt and nvidia-cudnn-cu13 of the same release); no GPU and no driver. XLA compiles
for the H100 described below, without autotuning, and the grid flags are benchmarks/train_step.py's.

For each setting the table gives the memory XLA compiled the step to hold (arguments +
temporaries, as train_step.py reports it on a real GPU), the kernels one step launches, the bytes
they read and write in HBM and their FLOPs, by kind (matmuls, cuDNN attention, everything else),
and a roofline time: each kernel at max(bytes / bandwidth, FLOPs / matmul ceiling), with the
copy bandwidth and the bf16 matmul ceiling measured on the lent H100 (benchmarks/RESULTS.md). It
is a lower bound, not a measurement. --top lists the largest groups of memory-bound kernels
(same operation in every layer) of the last setting.
"""

import collections
import math
import re

import jax
from absl import app, flags

from benchmarks import train_step  # its grid flags
from cm3jax.core import sharding
from cm3jax.training import trainer

_TOP = flags.DEFINE_integer("top", 0, "List this many of the largest memory-bound kernel groups.")

HBM_BYTES_PER_S = 3.0e12  # copy bandwidth measured on the lent H100 80GB HBM3
MATMUL_FLOPS_PER_S = 7.8e14  # its bf16 matmul ceiling (8192^3 product)

# One H100 SXM 80GB as XLA's GPU compiler sees it (GpuTargetConfigProto).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 12 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
                "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.*?) ([\w-]+)\((.*?)\)(, .*)?$")
_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
_READS_A_PART = {"gather", "dynamic-slice", "slice"}  # of their first operand


def nbytes(type_text: str) -> int:
  return sum(_DTYPE_BYTES.get(dtype, 4) * math.prod(_ints(dims))
             for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", type_text))


def _ints(dims: str) -> list[int]:
  return [int(d) for d in dims.split(",") if d]


def _dims(type_text: str) -> list[int]:
  return _ints(re.search(r"\[([\d,]*)\]", type_text).group(1))


class Module:
  """The computations of an optimised HLO module's text, instruction by instruction."""

  def __init__(self, text: str):
    self.computations, self.parameters, self.types, name = {}, {}, {}, None
    for line in text.splitlines():
      header = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
      if header:
        name = header.group(2)
        self.computations[name], self.parameters[name] = [], {}
        if header.group(1):
          self.entry = name
      elif name and (m := _INSTRUCTION.match(line)):
        result, type_text, op, args, attributes = m.groups()
        self.types[result] = type_text
        if op == "parameter":
          self.parameters[name][int(args)] = result
        self.computations[name].append(
            (result, type_text, op, re.findall(r"%([\w.\-]+)", args), attributes or ""))

  def matmul_flops(self, instructions) -> float:
    flops = 0.0
    for _, type_text, op, args, attributes in instructions:
      if op == "dot":
        lhs = _dims(self.types[args[0]])
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attributes).group(1)
        flops += 2 * math.prod(_dims(type_text)) * math.prod(lhs[i] for i in _ints(contracting))
      elif called := re.search(r"calls=%([\w.\-]+)", attributes):
        flops += self.matmul_flops(self.computations.get(called.group(1), []))
    return flops

  def operand_bytes(self, computation: str, args: list[str]) -> int:
    """HBM bytes a fusion reads: whole operands, but only the part a gather or slice takes."""
    params = self.parameters.get(computation, {})
    users = collections.defaultdict(list)
    for result, type_text, op, operands, _ in self.computations.get(computation, []):
      for i, operand in enumerate(operands):
        users[operand].append((op, i, type_text))
    total = 0
    for index, arg in enumerate(args):
      uses = users.get(params.get(index), [])
      if uses and all(i == 0 and (op in _READS_A_PART or op == "dynamic-update-slice")
                      for op, i, _ in uses):  # an update in place reads nothing around it
        total += sum(nbytes(t) for op, _, t in uses if op != "dynamic-update-slice")
      else:
        total += nbytes(self.types.get(arg, ""))
    return total

  def written_bytes(self, computation: str, type_text: str) -> int:
    """HBM bytes a fusion writes: its outputs, but only the update of an update in place."""
    instructions = {result: (op, args) for result, _, op, args, _ in
                    self.computations.get(computation, [])}
    root = self.computations[computation][-1] if self.computations.get(computation) else None
    if root is None:
      return nbytes(type_text)
    outputs = root[3] if root[2] == "tuple" else [root[0]]
    total = 0
    for output in outputs:
      op, args = instructions[output]
      total += nbytes(self.types[args[1] if op == "dynamic-update-slice" else output])
    return total

  def kernels(self, computation=None, repeats=1):
    """(repeats, kind, label, HBM bytes, FLOPs) of each kernel one call of `computation` runs."""
    for instruction in self.computations[computation or self.entry]:
      result, type_text, op, args, attributes = instruction
      if op in _FREE or op.endswith("-done"):
        continue
      if op == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
        body = re.search(r"body=%([\w.\-]+)", attributes).group(1)
        yield from self.kernels(body, repeats * (int(trips.group(1)) if trips else 1))
        continue
      label = re.search(r'op_name="([^"]*)"', attributes)
      label = re.sub(r"layers_\d+", "layers_N", label.group(1) if label else result)
      called = re.search(r"calls=%([\w.\-]+)", attributes)
      if called:
        moved = (self.written_bytes(called.group(1), type_text)
                 + self.operand_bytes(called.group(1), args))
      else:
        moved = nbytes(type_text) + sum(nbytes(self.types.get(a, "")) for a in set(args))
      target = re.search(r'custom_call_target="([^"]*)"', attributes)
      if target and "fmha" in target.group(1):
        B, L, H, K = _dims(self.types[args[0]])  # queries [B, L, H, K]
        flops = 4 * B * H * L * L * K * (0.5 if '"CAUSAL"' in attributes else 1.0)
        yield repeats, "attention", label, moved, flops * (2.5 if "Backward" in target.group(1)
                                                           else 1.0)
        continue
      flops = self.matmul_flops([instruction])
      yield repeats, "matmul" if flops else "other", label, moved, flops


def roofline_seconds(moved: float, flops: float) -> float:
  return max(moved / HBM_BYTES_PER_S, flops / MATMUL_FLOPS_PER_S)


def h100():
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                        topology="1x1x1").devices
  except Exception as e:  # no plugin: jax raises a generic error naming the platform
    raise SystemExit(f"compiling for an H100 needs jax's CUDA plugin ({e})") from None


def main(_):
  if "auto" in train_step._ATTENTION.value:
    raise SystemExit("--attention=auto picks XLA's attention on a machine without a GPU: "
                     "name it, e.g. --attention=cudnn")
  devices = h100()
  print(f"target: {devices[0].device_kind} (compiled here, nothing run); jax {jax.__version__}; "
        f"roofline at {HBM_BYTES_PER_S / 1e12:.1f} TB/s and "
        f"{MATMUL_FLOPS_PER_S / 1e12:.0f} TFLOP/s\n")
  print("| size | batch | remat | attention | scan | ce_chunk | memory GiB | kernels | "
        "GiB moved: matmuls | attention | other | TFLOP | roofline ms |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for row, config in train_step.settings():
    s = trainer.setup(config, devices)
    with sharding.use_mesh(s.mesh):
      compiled = s.train_step.lower(
          s.abstract_state, trainer.abstract_batch(config, s.batch_sharding)).compile()
    mem = compiled.memory_analysis()
    kernels = list(Module(compiled.as_text()).kernels())
    moved = collections.Counter()
    for repeats, kind, _, nbytes_moved, _ in kernels:
      moved[kind] += repeats * nbytes_moved
    flops = sum(r * f for r, _, _, _, f in kernels)
    seconds = sum(r * roofline_seconds(m, f) for r, _, _, m, f in kernels)
    print(f"{row} {(mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30:.1f} | "
          f"{sum(r for r, *_ in kernels)} | {moved['matmul'] / 2**30:.1f} | "
          f"{moved['attention'] / 2**30:.1f} | {moved['other'] / 2**30:.1f} | "
          f"{flops / 1e12:.1f} | {seconds * 1e3:.1f} |", flush=True)
  if _TOP.value:
    groups = collections.defaultdict(lambda: [0, 0.0])
    for repeats, kind, label, nbytes_moved, _ in kernels:
      if kind == "other":
        groups[label][0] += repeats
        groups[label][1] += repeats * nbytes_moved
    print("\n| memory-bound kernels (last setting) | launches | GiB moved | roofline ms |\n"
          "|---|---|---|---|")
    for label, (n, b) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:_TOP.value]:
      print(f"| {label.removeprefix('jit(train_step)/')} | {n} | {b / 2**30:.2f} | "
            f"{b / HBM_BYTES_PER_S * 1e3:.2f} |")


if __name__ == "__main__":
  app.run(main)
