"""Train the CM3 token model on a device mesh, or compile its train step for a TPU pod.

  python -m cm3jax.train --config=configs/tiny.py --workdir=/tmp/cm3jax_tiny
  python -m cm3jax.train --config=configs/7b.py --compile_only --topology=v5p:4x4x4

A run resumes from the latest checkpoint in --workdir. Config fields are overridden on the command
line: --config.num_train_steps=100 --config.model.num_layers=2.
"""

import contextlib
import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from cm3jax import checkpoint, cli, data, hardware, loss, optimizer, sharding
from cm3jax.progress import Progress
from cm3jax import model as model_lib
from cm3jax.config import ConfigError

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # The run's root key. It seeds the data stream, so a resume continues that stream.


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run derives from its config: the model, the mesh and the jitted functions."""
  model_cfg: model_lib.ModelConfig
  mesh: jax.sharding.Mesh
  abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings.
  batch_sharding: jax.sharding.NamedSharding
  init_state: Callable  # rng -> TrainState, created already sharded.
  train_step: Callable  # (state, batch) -> (state, metrics); the state is donated.
  gradients: Callable  # (params, batch) -> (gradients of the mean loss, loss sums).
  eval_step: Callable  # (params, batch) -> loss sums.


def setup(config, devices=None) -> Setup:
  model_cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh, devices)
  _check_run(config, model_cfg, mesh)
  model = model_lib.Decoder(model_cfg)
  tx, schedule = optimizer.make_optimizer(config.optimizer, config.num_train_steps)

  def init_state(rng):
    params = model.init(rng, jnp.zeros((1, config.seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)

  boxed = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_sharding = sharding.logical_sharding(nn.get_partition_spec(boxed), mesh)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.unbox(boxed), state_sharding)

  def loss_and_grads(params, batch):
    def objective(p):
      apply = functools.partial(model.apply, {"params": p}, batch["inputs"],
                                batch.get("positions"), segments_BxL=batch.get("segments"))
      if config.cross_entropy_chunk:
        hidden, head = apply(hidden_only=True)
        return loss.head_cross_entropy(hidden, head, batch["targets"], batch["weights"],
                                       config.z_loss, config.cross_entropy_chunk)
      sums = loss.cross_entropy_sums(apply(), batch["targets"], batch["weights"], config.z_loss)
      return sums["loss"] + sums["z_loss"], sums
    (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, sums

  def gradients(params, batch):
    """Gradients of the batch's mean loss per weighted target, and the loss sums."""
    accum = config.grad_accum_steps
    if accum == 1:
      grads, sums = loss_and_grads(params, batch)
    else:
      # Microbatch i takes rows i, i+accum, ...: every device keeps its share of each microbatch.
      micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def add_microbatch(total, mb):
        mb = nn.with_logical_constraint(mb, sharding.BATCH_AXES)
        return jax.tree.map(jnp.add, total, loss_and_grads(params, mb)), None

      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
          loss_and_grads, params, jax.tree.map(lambda x: x[0], micro)))
      (grads, sums), _ = jax.lax.scan(add_microbatch, zeros, micro)
    weight = jnp.maximum(sums["weight"], 1.0)
    return jax.tree.map(lambda g: g / weight, grads), sums

  def train_step(state, batch):
    grads, sums = gradients(state.params, batch)
    weight = jnp.maximum(sums["weight"], 1.0)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": sums["loss"] / weight, "accuracy": sums["correct"] / weight,
               "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
    if config.z_loss:
      metrics["z_loss"] = sums["z_loss"] / weight
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, metrics

  def eval_step(params, batch):
    _, sums = loss_and_grads(params, batch)
    return sums

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh)
  return Setup(
      model_cfg=model_cfg, mesh=mesh, abstract_state=abstract_state, batch_sharding=batch_sharding,
      init_state=jax.jit(lambda rng: nn.unbox(init_state(rng)), out_shardings=state_sharding),
      train_step=jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated), donate_argnums=0),
      gradients=jax.jit(gradients, in_shardings=(state_sharding.params, batch_sharding),
                        out_shardings=(state_sharding.params, replicated)),
      eval_step=jax.jit(eval_step, in_shardings=(state_sharding.params, batch_sharding),
                        out_shardings=replicated),
  )


def _check_run(config, model_cfg, mesh):
  for name in ("num_train_steps", "log_every", "eval_steps", "checkpoint_every"):
    if config[name] < 1:
      raise ConfigError(f"{name} must be at least 1, got {config[name]}")
  if config.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"seq_len={config.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
  if config.cross_entropy_chunk < 0 or (config.cross_entropy_chunk
                                        and config.seq_len % config.cross_entropy_chunk):
    raise ConfigError(f"cross_entropy_chunk={config.cross_entropy_chunk} does not divide "
                      f"seq_len={config.seq_len} (0: no chunks)")
  if config.grad_accum_steps < 1 or config.global_batch_size % config.grad_accum_steps:
    raise ConfigError(f"global_batch_size={config.global_batch_size} does not divide into "
                      f"grad_accum_steps={config.grad_accum_steps} microbatches")
  rows = config.global_batch_size // config.grad_accum_steps
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if rows % batch_devices:
    raise ConfigError(f"a microbatch of {rows} rows (global_batch_size / grad_accum_steps) does "
                      f"not divide over the data x fsdp = {batch_devices} devices of the mesh")
  if config.global_batch_size % jax.process_count():
    raise ConfigError(f"global_batch_size={config.global_batch_size} does not divide over "
                      f"{jax.process_count()} hosts")


MODEL_KEYS = ("inputs", "targets", "weights")
DOCUMENT_KEYS = ("positions", "segments")  # with cm3.document_attention


def abstract_batch(config, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (config.global_batch_size, config.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
          for k, dtype in zip(MODEL_KEYS, (jnp.int32, jnp.int32, jnp.float32))}


def device_batch(host_batch: dict[str, np.ndarray], batch_sharding) -> dict[str, jax.Array]:
  """This host's rows -> the global batch the train step takes (data positions stay here)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding, host_batch[k])
          for k in MODEL_KEYS + DOCUMENT_KEYS if k in host_batch}


def checkpoints(workdir: str, config, vocab=None) -> checkpoint.Checkpoints:
  """The token model's checkpoints in `workdir`."""
  return checkpoint.Checkpoints(workdir, config, {"model": model_lib.ModelConfig.ARCHITECTURE},
                                vocab)


def _host() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def _data_positions(host_batch) -> list[list[int]]:
  """Every host's position of its next batch, for the checkpoint."""
  position = np.asarray(host_batch["position"][0], np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(position)).tolist()
  return [position.tolist()]


def _restored_position(positions: Optional[list]) -> Optional[list[int]]:
  if positions is None:
    return None
  if len(positions) != jax.process_count():
    raise ConfigError(f"the checkpoint holds the data positions of {len(positions)} hosts; "
                      f"resume it on {len(positions)} hosts, not {jax.process_count()}")
  return positions[jax.process_index()]


def train(config, workdir: str) -> list[dict[str, float]]:
  """Trains to config.num_train_steps, resuming from `workdir`; returns the logged metrics."""
  workdir = checkpoint.prepare_workdir(workdir)
  s = setup(config)
  chief = jax.process_index() == 0
  say = print if chief else (lambda *a, **k: None)
  source = data.source(config, workdir)
  if source.vocab is not None and source.vocab.size > s.model_cfg.vocab_size:
    raise ConfigError(f"model.vocab_size={s.model_cfg.vocab_size} is smaller than the vocabulary "
                      f"({source.vocab.describe()})")
  ckpts = checkpoints(workdir, config, source.vocab)
  with sharding.use_mesh(s.mesh), contextlib.closing(ckpts):
    restored = ckpts.restore(s.abstract_state)
    if restored is None:
      state, position = s.init_state(jax.random.PRNGKey(config.seed)), None
    else:
      state, position = restored[0], _restored_position(restored[1])
    start = int(state.step)
    devices = jax.devices()
    say(f"cm3jax.train: {len(devices)} x {devices[0].device_kind}, mesh "
        f"{sharding.describe(s.mesh)}; "
        f"{model_lib.num_params(state.params) / 1e6:.2f}M parameters; "
        + (f"resumed from step {start} in {ckpts.directory}" if restored else "new run")
        + f"; workdir {workdir}", flush=True)
    if start >= config.num_train_steps:
      say(f"already at step {start} of num_train_steps={config.num_train_steps}; nothing to do")
      return []

    seed = tuple(int(x) for x in np.asarray(jax.device_get(state.rng)).ravel())
    train_batches = source.batches("train", seed, position, _host())

    t = time.perf_counter()
    host_batch = next(train_batches)
    batch = device_batch(host_batch, s.batch_sharding)
    train_step = s.train_step.lower(state, batch).compile()
    say(f"compiled the train step in {time.perf_counter() - t:.1f}s", flush=True)

    tokens_per_step = config.global_batch_size * config.seq_len
    flops_per_step = model_lib.train_flops_per_token(s.model_cfg, config.seq_len) * tokens_per_step
    peak = config.peak_tflops_per_device or hardware.peak_tflops(devices[0].device_kind)
    progress = Progress(workdir, config.num_train_steps, start, chief)

    pending, t = [], time.perf_counter()
    for step in range(start, config.num_train_steps):
      state, metrics = train_step(state, batch)
      host_batch = next(train_batches)  # made while the device runs the step
      batch = device_batch(host_batch, s.batch_sharding)
      pending.append(metrics)
      done = step + 1
      last = done == config.num_train_steps
      progress.step()
      if done % config.log_every == 0 or last:
        pending = jax.device_get(pending)
        elapsed = time.perf_counter() - t
        means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
        tflops = len(pending) * flops_per_step / elapsed / 1e12 / len(devices)
        summary = {"loss": means["loss"], "perplexity": float(np.exp(means["loss"])), **means,
                   "tokens_per_s": len(pending) * tokens_per_step / elapsed,
                   "tflops_per_device": tflops}
        if peak:
          summary["mfu"] = tflops / peak
        progress.log(done, "train", summary)
        pending, t = [], time.perf_counter()
      if last or (config.eval_every and done % config.eval_every == 0):
        progress.log(done, "eval", evaluate(s, source, state.params, config, seed))
        t = time.perf_counter()
      if last or done % config.checkpoint_every == 0:
        ckpts.save(done, state, _data_positions(host_batch))
    progress.close()
    ckpts.wait()
    skipped = source.skipped()
    if skipped:
      say("data: skipped " + ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    say(f"done: step {config.num_train_steps}, checkpoint in {ckpts.directory}")
  if source.vocab is not None and jax.process_count() == 1:
    write_samples(s, source, state.params, workdir)
  return progress.history


def write_samples(s: Setup, source: data.Source, params, workdir: str):
  """A grid of images from validation captions and captions of validation images."""
  from cm3jax import sample, sampling
  from cm3jax.vqgan.tokenizer import ImageTokenizer
  t = time.perf_counter()
  sampler = sampling.Sampler(s.model_cfg, params, source.vocab, s.mesh)
  lines = sample.write_samples(sampler, ImageTokenizer.load(source.vqgan_workdir),
                               source.codes_dir, workdir)
  print(f"samples: {workdir}/samples.png and {workdir}/captions.txt "
        f"({time.perf_counter() - t:.0f}s)")
  for line in lines:
    print(f"  {line}")


def evaluate(s: Setup, source: data.Source, params, config, seed) -> dict[str, float]:
  """Loss, perplexity and accuracy over the same `eval_steps` validation batches every time."""
  batches = source.batches("validation", seed, None, _host())
  totals = None
  for _ in range(config.eval_steps):
    sums = s.eval_step(params, device_batch(next(batches), s.batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  weight = max(float(totals["weight"]), 1.0)
  mean_loss = float(totals["loss"]) / weight
  return {"loss": mean_loss, "perplexity": float(np.exp(mean_loss)),
          "accuracy": float(totals["correct"]) / weight}


def compile_only(config, topology: Optional[str]) -> bool:
  """Compiles the sharded train step for a TPU topology and prints per-device memory and FLOPs.

  Returns whether the step fits the devices' HBM.
  """
  if not topology:
    raise ConfigError("--compile_only needs --topology, e.g. --topology=v5p:4x4x4")
  devices, hbm_bytes = hardware.tpu_topology(topology)
  s = setup(config, devices)
  t = time.perf_counter()
  target = (f"{topology}: {len(devices)} x {devices[0].device_kind}, "
            f"mesh {sharding.describe(s.mesh)}")
  with sharding.use_mesh(s.mesh):
    lowered = s.train_step.lower(s.abstract_state, abstract_batch(config, s.batch_sharding))
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      print(f"the train step DOES NOT FIT {target}: {str(e).splitlines()[0]}")
      return False
  seconds = time.perf_counter() - t
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2.0**30
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  fits = total <= hbm_bytes
  model_flops = (model_lib.train_flops_per_token(s.model_cfg, config.seq_len)
                 * config.global_batch_size * config.seq_len)
  print(f"compiled the train step for {target}, remat {s.model_cfg.remat_policy}, "
        f"in {seconds:.0f}s")
  print(f"per-device memory: arguments {mem.argument_size_in_bytes / gib:.2f} GiB, "
        f"outputs {mem.output_size_in_bytes / gib:.2f} GiB "
        f"(aliased with arguments {mem.alias_size_in_bytes / gib:.2f} GiB), "
        f"temporaries {mem.temp_size_in_bytes / gib:.2f} GiB, "
        f"code {mem.generated_code_size_in_bytes / gib:.2f} GiB")
  print(f"per-device total {total / gib:.2f} GiB of {hbm_bytes / gib:.1f} GiB HBM: "
        + ("fits" if fits else "DOES NOT FIT"))
  print(f"model FLOPs per step (6N + causal attention): {model_flops:.4g}, "
        f"{model_flops / len(devices):.4g} per device")
  print(f"compiled FLOPs per step, XLA cost analysis: {cost.get('flops', float('nan')):.4g} per "
        "device (XLA counts a loop body once: scanned layers and microbatches are not "
        "multiplied by their trip counts)")
  return fits


def _define_flags():
  """Flags of the command line only, so that tests and tools can import this module."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints and TensorBoard events go here; a run resumes "
                      "from it.")
  flags.DEFINE_bool("compile_only", False,
                    "Compile the train step for --topology, report memory and FLOPs, exit.")
  flags.DEFINE_string("topology", None, "TPU topology for --compile_only: v5p:4x4x4.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (TPU pods, multi-node GPUs).")
  flags.mark_flag_as_required("config")


@cli.command("train")
def main(FLAGS):
  if FLAGS.multihost:
    jax.distributed.initialize()
  if FLAGS.compile_only:
    sys.exit(0 if compile_only(FLAGS.config, FLAGS.topology) else 1)
  train(FLAGS.config, FLAGS.workdir)


def _parse_flags(argv):
  """absl's parser, with config-file and override errors as one line instead of a traceback."""
  try:
    argv = flags.FLAGS(argv)
    flags.FLAGS.config.to_dict()  # config_flags defers a config file's load error to first use.
    return argv
  except flags.Error as e:
    sys.exit(f"cm3jax.train: error: {e}")
  except (AttributeError, KeyError) as e:  # an override names a field the config lacks
    field = str(e).strip("\"'")
    sys.exit(f"cm3jax.train: error: the config has no field {field!r} (see cm3jax/config.py)")
  except (OSError, TypeError, ValueError) as e:
    sys.exit(f"cm3jax.train: error: bad --config: {str(e).strip().splitlines()[-1].strip()}")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
