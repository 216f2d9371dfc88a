"""Ahead-of-time compilation of the sharded train step for a TPU pod, on any machine with libtpu:
what each chip would hold, and whether it fits (`python -m cm3jax.train --compile_only`)."""

import dataclasses
import time
from typing import Optional

import jax

from cm3jax.config import ConfigError
from cm3jax.core import hardware, sharding
from cm3jax.core import model as model_lib
from cm3jax.training import trainer

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device figures of one compiled train step; without `memory` it did not compile
  (`error` says why: XLA ran out of HBM)."""
  target: str  # topology, devices and mesh
  remat_policy: str
  hbm_bytes: int
  model_flops: float  # per step, all devices: 6N + causal attention
  num_devices: int
  seconds: float = 0.0
  memory: Optional[dict[str, int]] = None  # arguments, outputs, aliased, temporaries, code
  compiled_flops: float = float("nan")  # XLA's count: one trip of each loop body
  error: str = ""

  @property
  def total_bytes(self) -> int:
    m = self.memory
    return m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]

  @property
  def fits(self) -> bool:
    return self.memory is not None and self.total_bytes <= self.hbm_bytes

  def lines(self) -> list[str]:
    if self.memory is None:
      return [f"the train step DOES NOT FIT {self.target}: {self.error}"]
    m = {k: v / GIB for k, v in self.memory.items()}
    return [
        f"compiled the train step for {self.target}, remat {self.remat_policy}, in "
        f"{self.seconds:.0f}s",
        f"per-device memory: arguments {m['arguments']:.2f} GiB, outputs {m['outputs']:.2f} GiB "
        f"(aliased with arguments {m['aliased']:.2f} GiB), temporaries {m['temporaries']:.2f} "
        f"GiB, code {m['code']:.2f} GiB",
        f"per-device total {self.total_bytes / GIB:.2f} GiB of {self.hbm_bytes / GIB:.1f} GiB HBM: "
        + ("fits" if self.fits else "DOES NOT FIT"),
        f"model FLOPs per step (6N + causal attention): {self.model_flops:.4g}, "
        f"{self.model_flops / self.num_devices:.4g} per device",
        f"compiled FLOPs per step, XLA cost analysis: {self.compiled_flops:.4g} per device (XLA "
        "counts a loop body once: scanned layers and microbatches are not multiplied by their "
        "trip counts)"]


def compile_train_step(config, topology: Optional[str], num_slices: int = 1) -> CompileReport:
  """Compiles config's sharded train step for `num_slices` slices of a TPU topology (v5p:4x4x4)
  and reports it."""
  if not topology:
    raise ConfigError("--compile_only needs --topology, e.g. --topology=v5p:4x4x4")
  devices, hbm_bytes = hardware.tpu_topology(topology, num_slices)
  s = trainer.setup(config, devices)
  slices = f"{num_slices} x " if num_slices > 1 else ""
  report = CompileReport(
      target=f"{slices}{topology}: {len(devices)} x {devices[0].device_kind}, "
             f"mesh {sharding.describe(s.mesh)}",
      remat_policy=s.model_cfg.remat_policy, hbm_bytes=hbm_bytes, num_devices=len(devices),
      model_flops=(model_lib.train_flops_per_token(s.model_cfg, config.seq_len)
                   * config.global_batch_size * config.seq_len))
  t = time.perf_counter()
  with sharding.use_mesh(s.mesh):
    lowered = s.train_step.lower(s.abstract_state, trainer.abstract_batch(config, s.batch_sharding))
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      return dataclasses.replace(report, error=str(e).splitlines()[0])
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dataclasses.replace(
      report, seconds=time.perf_counter() - t, compiled_flops=cost.get("flops", float("nan")),
      memory={"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
              "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
              "code": mem.generated_code_size_in_bytes})
