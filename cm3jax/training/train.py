"""Train the CM3 token model on a device mesh, or compile its train step for a TPU pod.

The library of `python -m cm3jax.train` (cm3jax/train.py)."""

import contextlib
import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cm3jax import data
from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, hardware, sharding
from cm3jax.core import model as model_lib
from cm3jax.core.paths import input_paths
from cm3jax.sampling.watch import Watch
from cm3jax.training import loop
from cm3jax.training.trainer import Setup, device_batch, setup

FINITE_METRICS = ("loss", "grad_norm")  # a step where either is not finite stops the run


def checkpoints(workdir: str, config, vocab=None) -> checkpoint.Checkpoints:
  """The token model's checkpoints in `workdir`."""
  return checkpoint.Checkpoints(workdir, config, {"model": model_lib.ModelConfig.architecture()},
                                vocab)


def _host() -> tuple[int, int]:
  return jax.process_index(), jax.process_count()


def _data_positions(host_batch) -> list[list[int]]:
  """Every host's position of its next batch, for the checkpoint."""
  position = np.asarray(host_batch["position"][0], np.int64)
  if jax.process_count() > 1:
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
  """Trains to config.num_train_steps, resuming from `workdir`; returns the logged metrics.
  Raises NonFinite at a non-finite step and Preempted after saving on SIGTERM."""
  with loop.workdir_held(workdir, "cm3jax.train") as workdir:
    return _train(with_base_inputs(config), workdir)


def with_base_inputs(config):
  """`config` with its empty cm3 input paths (VQGAN, codes, tokenizer) set to those of the run
  it starts from (config.init_from), so that its checkpoints name them; unchanged without one."""
  if not config.init_from:
    return config
  base = config.init_from
  step = checkpoint.newest_step(base)
  if step is None:
    raise ConfigError(f"init_from={base} holds no checkpoint: train the run to start from "
                      "first (python -m cm3jax.pipeline --config=configs/tiny.py "
                      f"--workdir={base})")
  saved = checkpoint.saved_config(base, step)
  paths = input_paths(saved["cm3"], base)
  config = config.copy_and_resolve_references()
  for field, path in zip(("vqgan_workdir", "codes_dir", "tokenizer"), paths):
    if not config.cm3[field]:
      config.cm3[field] = path
  return config


def pretrained_params(s: Setup, config, vocab):
  """The parameters of config.init_from's newest checkpoint, placed as this run's; a
  ConfigError when its model or vocabulary is not this run's."""
  base = config.init_from
  step = checkpoint.latest_step(base)
  diffs = checkpoint.differences(checkpoint.saved_config(base, step), json.loads(config.to_json()),
                                 {"model": model_lib.ModelConfig.architecture()})
  if diffs:
    raise ConfigError(f"init_from={base} (step {step}) is another model: {', '.join(diffs)}")
  if vocab is not None and (saved_vocab := checkpoint.load_vocab(base, step)) != vocab:
    raise ConfigError(f"init_from={base} (step {step}) was trained with another vocabulary "
                      f"({saved_vocab.describe()}; this run: {vocab.describe()}): use its "
                      "tokenizer and VQGAN")
  return checkpoint.restore_params(base, step, s.abstract_state.params)


def _train(config, workdir: str) -> list[dict[str, float]]:
  s = setup(config)
  chief = jax.process_index() == 0
  say = print if chief else (lambda *a, **k: None)
  source = data.source(config, workdir)
  if source.vocab is not None:
    source.vocab.check_fits(s.model_cfg.vocab_size)
  ckpts = checkpoints(workdir, config, source.vocab)
  with sharding.use_mesh(s.mesh), contextlib.closing(ckpts):
    restored = ckpts.restore(s.abstract_state, s.other_layouts)
    if restored is None:
      state, position = s.init_state(jax.random.PRNGKey(config.seed)), None
      if config.init_from:
        state = state.replace(params=pretrained_params(s, config, source.vocab))
    else:
      state, position = restored[0], _restored_position(restored[1])
    start = int(state.step)
    devices = jax.devices()
    say(f"cm3jax.train: {len(devices)} x {devices[0].device_kind}, mesh "
        f"{sharding.describe(s.mesh)}; "
        f"{model_lib.num_params(state.params) / 1e6:.2f}M parameters; "
        + (f"resumed from step {start} in {ckpts.directory}" if restored else
           f"new run from the parameters of {config.init_from}" if config.init_from else
           "new run")
        + f"; workdir {workdir}", flush=True)
    if start >= config.num_train_steps:
      say(f"already at step {start} of num_train_steps={config.num_train_steps}; nothing to do")
      return []

    seed = tuple(int(x) for x in np.asarray(jax.device_get(state.rng)).ravel())
    train_batches = source.batches("train", seed, position, _host())
    if shares := source.unequal_shares("train", seed, 0 if position is None else position[0],
                                       jax.process_count()):
      say(shares, flush=True)

    t = time.perf_counter()
    host_batch = next(train_batches)
    batch = device_batch(host_batch, s.batch_sharding)
    train_step = s.train_step.lower(state, batch).compile()
    say(f"compiled the train step in {time.perf_counter() - t:.1f}s", flush=True)

    tokens_per_step = config.global_batch_size * config.seq_len
    flops_per_step = model_lib.train_flops_per_token(s.model_cfg, config.seq_len) * tokens_per_step
    peak = config.peak_tflops_per_device or hardware.peak_tflops(devices[0].device_kind)
    watch = Watch.of_run(config, workdir, s.model_cfg, state.params,
                         source.vocab) if chief else None

    def train_step_and_next_batch(state, step):
      nonlocal host_batch, batch
      state, metrics = train_step(state, batch)
      host_batch = next(train_batches)  # made while the device runs the step
      batch = device_batch(host_batch, s.batch_sharding)
      return state, metrics

    def summarize(means, steps, seconds):
      tflops = steps * flops_per_step / seconds / 1e12 / len(devices)
      with np.errstate(over="ignore"):  # a diverging loss has an infinite perplexity
        perplexity = float(np.exp(means["loss"]))
      summary = {"loss": means["loss"], "perplexity": perplexity, **means,
                 "tokens_per_s": steps * tokens_per_step / seconds, "tflops_per_device": tflops}
      if peak:
        summary["mfu"] = tflops / peak
      return summary

    def evaluate_and_watch(state, done, progress):
      summary = evaluate(s, source, state.params, config, seed)
      if watch:
        watch.log(progress, done, state.params)
      return summary

    history = loop.run(loop.Trainer(
        train_step=train_step_and_next_batch, summarize=summarize, evaluate=evaluate_and_watch,
        finite_metrics=FINITE_METRICS, skip_limit=config.skip_nonfinite_steps,
        data_positions=lambda: _data_positions(host_batch)), state, config, workdir, ckpts)
    skipped = source.skipped()
    if skipped:
      say("data: skipped " + ", ".join(f"{n} ({why})" for why, n in skipped.items()))
    say(f"done: step {config.num_train_steps}, checkpoint in {ckpts.directory}")
  return history


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
