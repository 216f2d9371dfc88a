"""Train a CLIP retriever on the built-in shapes data (symmetric InfoNCE).

The library of `python -m cm3jax.train_retriever` (cm3jax/train_retriever.py)."""

import contextlib
import dataclasses
import os
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cm3jax import data
from cm3jax.config import ConfigError
from cm3jax.core import checkpoint, files, sharding
from cm3jax.data import shapes
from cm3jax.prepare import train_tokenizer
from cm3jax.retrieval import clip, retriever
from cm3jax.training import loop

ARCHITECTURE = tuple(f.name for f in dataclasses.fields(clip.ClipConfig) if f.name != "dtype")
RECALL_AT = (1, 5)
FINITE_METRICS = ("loss",)


@flax.struct.dataclass
class RetrieverState:
  step: jax.Array
  params: Any
  opt_state: Any


def load_split(config, split: str) -> dict[str, np.ndarray]:
  from cm3jax.data import shapes_tfds  # TensorFlow is needed by the data only.
  return shapes_tfds.load(config.data, config.data_dir, split)


def clip_config(config, vocab_size: int) -> clip.ClipConfig:
  """The config's clip section with the text vocabulary of the tokenizer (end-of-text last)."""
  return clip.ClipConfig.from_dict({**config.clip.to_dict(), "vocab_size": vocab_size,
                                    "eot_id": vocab_size - 1})


def scene_ids(captions) -> np.ndarray:
  """int [N]: equal for captions of one scene (as a caption fixes it), -1 for other text."""
  ids, out = {}, []
  for caption in captions:
    text = caption.decode("utf-8") if isinstance(caption, bytes) else caption
    scene = shapes.parse_caption(text)
    out.append(-1 if scene is None else ids.setdefault(shapes.described(scene), len(ids)))
  return np.array(out)


def recall(similarity_QxN: np.ndarray, query_scenes: np.ndarray, item_scenes: np.ndarray,
           ks=RECALL_AT) -> dict[int, float]:
  """Share of queries with an item of their scene among their k most similar items."""
  top = np.argsort(-similarity_QxN, axis=1, kind="stable")[:, :max(ks)]
  hits = item_scenes[top] == query_scenes[:, None]
  return {k: float(np.mean(hits[:, :k].any(1))) for k in ks}


def evaluate(r: retriever.Retriever, split: dict[str, np.ndarray], batch_size: int
             ) -> dict[str, float]:
  texts = [c.decode("utf-8") for c in split["caption"]]
  images, texts_emb = [], []
  for i in range(0, len(texts), batch_size):
    images.append(r.embed_images(split["image"][i:i + batch_size]))
    texts_emb.append(r.embed_texts(texts[i:i + batch_size]))
  image_NxE, text_NxE = np.concatenate(images), np.concatenate(texts_emb)
  scenes = scene_ids(texts)
  t2i = recall(text_NxE @ image_NxE.T, scenes, scenes)
  i2t = recall(image_NxE @ text_NxE.T, scenes, scenes)
  return {**{f"text_to_image_r@{k}": v for k, v in t2i.items()},
          **{f"image_to_text_r@{k}": v for k, v in i2t.items()}}


@dataclasses.dataclass(frozen=True)
class Setup:
  cfg: clip.ClipConfig
  mesh: jax.sharding.Mesh
  abstract_state: RetrieverState
  batch_sharding: Any
  init_state: Callable
  train_step: Callable  # (state, pixels, tokens) -> (state, metrics)


def setup(config, vocab_size: int) -> Setup:
  cfg = clip_config(config, vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  batch_devices = sharding.batch_devices(mesh)
  if config.batch_size % batch_devices:
    raise ConfigError(f"batch_size={config.batch_size} does not divide over the "
                      f"{batch_devices} batch devices of the mesh")
  model = clip.CLIP(cfg)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, config.learning_rate, max(config.warmup_steps, 1),
      max(config.num_train_steps, config.warmup_steps + 1), config.learning_rate * 0.01)
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=config.weight_decay)

  def init_state(rng):
    params = clip.init_params(cfg, rng)
    return RetrieverState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def train_step(state, pixels, tokens):
    def objective(params):
      image, text = model.apply({"params": params}, pixels, tokens)
      return clip.contrastive_loss(image, text, model.apply({"params": params},
                                                            method="temperature"))
    (loss, accuracy), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, "batch_accuracy": accuracy, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state.step),
               "temperature": jnp.exp(jnp.minimum(state.params["logit_scale"],
                                                  clip.LOGIT_SCALE_MAX))}
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics

  abstract_state = sharding.sharded_shapes(init_state, mesh, jax.random.PRNGKey(0))
  state_sharding = sharding.shardings_of(abstract_state)
  replicated = sharding.replicated(mesh)
  rows = sharding.batch_sharding(mesh)
  return Setup(
      cfg=cfg, mesh=mesh, abstract_state=abstract_state, batch_sharding=rows,
      init_state=jax.jit(lambda rng: nn.unbox(init_state(rng)), out_shardings=state_sharding),
      train_step=jax.jit(train_step, in_shardings=(state_sharding, rows, rows),
                         out_shardings=(state_sharding, replicated), donate_argnums=0))


def tokenizer(config, workdir: str, captions) -> bytes:
  """The sentencepiece model: config.tokenizer, else WORKDIR/tokenizer.model (trained on the
  train captions if missing). Either way a copy stays in the workdir for `retriever.load`."""
  path = os.path.join(workdir, retriever.TOKENIZER_FILE)
  source = config.tokenizer or path
  if files.exists(source):
    model = files.read_bytes(source)
  elif config.tokenizer:
    raise ConfigError(f"tokenizer={config.tokenizer}: no such file")
  else:
    model = train_tokenizer.train((c.decode("utf-8") for c in captions), config.text_vocab_size)
  if source != path or not files.exists(path):
    if jax.process_index() == 0:
      files.write_atomic(path, model)
  return model


def train(config, workdir: str) -> list[dict[str, float]]:
  """Trains to config.num_train_steps, resuming from `workdir`; returns the logged metrics."""
  if "clip" not in config:
    raise ConfigError("this config has no clip section: train_retriever takes configs/clip_*.py")
  with loop.workdir_held(workdir, "cm3jax.train_retriever") as workdir:
    return _train(config, workdir)


def _train(config, workdir: str) -> list[dict[str, float]]:
  train_split = load_split(config, "train")
  eval_split = {k: v[:config.eval_examples] for k, v in load_split(config, "validation").items()}
  tokenize = retriever.SentencePieceText(tokenizer(config, workdir, train_split["caption"]))
  s = setup(config, tokenize.vocab_size)
  texts = [c.decode("utf-8") for c in train_split["caption"]]
  tokens_NxC = tokenize(texts, s.cfg.context_length)
  pixels_NxSxSx3 = np.asarray(clip.normalize_pixels(s.cfg, train_split["image"]))
  saved_config = config.copy_and_resolve_references()  # with every field of the CLIP's config
  with saved_config.unlocked():
    saved_config.clip = ml_collections.ConfigDict(s.cfg.to_dict())
  ckpts = checkpoint.Checkpoints(workdir, saved_config, {"clip": dict.fromkeys(ARCHITECTURE)})
  with sharding.use_mesh(s.mesh), contextlib.closing(ckpts):
    state = loop.restored_or_new(
        ckpts, s.abstract_state, s.init_state, config.seed, "cm3jax.train_retriever",
        f"{len(texts)} pairs, text vocabulary {tokenize.vocab_size}", workdir)

    def train_step(state, step):
      rows = data.batch_indices(config.seed, step, config.batch_size, len(texts))
      return s.train_step(state, jax.device_put(pixels_NxSxSx3[rows], s.batch_sharding),
                          jax.device_put(tokens_NxC[rows], s.batch_sharding))

    def summarize(means, steps, seconds):
      return {**means, "pairs_per_s": steps * config.batch_size / seconds}

    def evaluate_recall(state, done, progress):
      r = retriever.Retriever(s.cfg, jax.device_get(state.params), tokenize, "this run")
      return evaluate(r, eval_split, config.batch_size)

    return loop.run(loop.Trainer(train_step=train_step, summarize=summarize,
                                 evaluate=evaluate_recall, finite_metrics=FINITE_METRICS),
                    state, config, workdir, ckpts)
