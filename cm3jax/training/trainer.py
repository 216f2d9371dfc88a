"""The token model's trainer, built from a config: the model, the mesh, the sharded train
state and the jitted init, train, gradient and eval functions. `cm3jax.train` runs it in a loop;
`cm3jax.training.aot` compiles it for a TPU pod."""

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cm3jax.config import ConfigError, check_ranges
from cm3jax.core import model as model_lib
from cm3jax.core import sharding
from cm3jax.training import loss, optimizer


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
  # The train state as a run with the other skip_nonfinite_steps setting saves it, and the
  # function that makes this run's state of it (checkpoint.Checkpoints.restore).
  other_layouts: tuple[tuple[TrainState, Callable], ...]


def setup(config, devices=None) -> Setup:
  if "model" not in config:
    raise ConfigError("this config has no model section: it is not a token-model config "
                      "(configs/tiny.py, 350m.py, ...)")
  check_ranges(config)
  model_cfg = model_lib.ModelConfig.from_dict(config.model.to_dict())
  mesh = sharding.make_mesh(config.mesh, devices)
  _check_run(config, model_cfg, mesh)
  model = model_lib.Decoder(model_cfg)
  tx, schedule = optimizer.make_optimizer(config.optimizer, config.num_train_steps)
  if config.skip_nonfinite_steps:
    # A non-finite gradient leaves the parameters and moments as they were, counted in the state.
    tx = optax.apply_if_finite(tx, max_consecutive_errors=config.skip_nonfinite_steps)

  def init_state(rng):
    params = model.init(rng, jnp.zeros((1, config.seq_len), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)

  abstract_state = sharding.sharded_shapes(init_state, mesh, jax.random.PRNGKey(0))
  state_sharding = sharding.shardings_of(abstract_state)

  def loss_and_grads(params, batch):
    def objective(p):
      apply = functools.partial(model.apply, {"params": p}, batch["inputs"],
                                batch.get("positions"), batch.get("segments"))
      if config.cross_entropy_chunk:
        hidden, head = apply(method="hidden")
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
    if config.skip_nonfinite_steps:
      metrics["skipped_steps"] = opt_state.total_notfinite
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state)
    return new_state, metrics

  def eval_step(params, batch):
    _, sums = loss_and_grads(params, batch)
    return sums

  replicated = sharding.replicated(mesh)
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
      other_layouts=(_skip_switched(abstract_state, bool(config.skip_nonfinite_steps)),),
  )


def _skip_switched(abstract_state: TrainState, skipping: bool) -> tuple[TrainState, Callable]:
  """The layout of a run with skip_nonfinite_steps switched the other way (its optimiser state
  with or without optax.apply_if_finite's counters), and the function that makes this run's
  state of such a state: a run resumes after switching it, as the NonFinite error advises.
  Switched on, the counters start at 0."""
  if skipping:
    counters = abstract_state.opt_state

    def wrap(state):
      start = {"notfinite_count": 0, "last_finite": True, "total_notfinite": 0}
      return state.replace(opt_state=counters._replace(inner_state=state.opt_state, **{
          name: jax.device_put(np.array(value, getattr(counters, name).dtype),
                               getattr(counters, name).sharding)
          for name, value in start.items()}))
    return abstract_state.replace(opt_state=counters.inner_state), wrap
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=abstract_state.step.sharding)
  wrapped = optax.ApplyIfFiniteState(
      notfinite_count=scalar(jnp.int32), last_finite=scalar(jnp.bool_),
      total_notfinite=scalar(jnp.int32), inner_state=abstract_state.opt_state)
  return (abstract_state.replace(opt_state=wrapped),
          lambda state: state.replace(opt_state=state.opt_state.inner_state))


def _check_run(config, model_cfg, mesh):
  if config.seq_len > model_cfg.max_seq_len:
    raise ConfigError(f"seq_len={config.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
  if config.cross_entropy_chunk and config.seq_len % config.cross_entropy_chunk:
    raise ConfigError(f"cross_entropy_chunk={config.cross_entropy_chunk} does not divide "
                      f"seq_len={config.seq_len} (0: no chunks)")
  if config.global_batch_size % config.grad_accum_steps:
    raise ConfigError(f"global_batch_size={config.global_batch_size} does not divide into "
                      f"grad_accum_steps={config.grad_accum_steps} microbatches")
  rows = config.global_batch_size // config.grad_accum_steps
  batch_devices = sharding.batch_devices(mesh)
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
