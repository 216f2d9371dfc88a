"""What several test modules share: the repository's configs shrunk for tests, parameters that
hide no bug, untrained checkpoints, fixtures built once for all test workers, running a command line as a user does, and a sampler that
records its requests."""

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys

import filelock
import jax
import jax.numpy as jnp
import numpy as np

from cm3jax.core.vocab import EOS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def built_once(tmp_path_factory, name: str, build) -> str:
  """The folder NAME of this test session, filled by `build(folder)` once. Under pytest-xdist the
  workers share it (the first to ask builds it while the others wait), so a fixture that trains
  or compiles for seconds does so once per session, not once per worker."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    folder = str(tmp_path_factory.mktemp(name))
    build(folder)
    return folder
  root = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
  folder, built = root / name, root / f"{name}.built"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not built.exists():
      shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half way
      folder.mkdir()
      build(str(folder))
      built.touch()
  return str(folder)


def load_config(filename: str):
  """The module of configs/FILENAME."""
  path = os.path.join(REPO, "configs", filename)
  spec = importlib.util.spec_from_file_location(filename[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def override(c, overrides: dict):
  """`c` with `overrides` (dotted names, as on the command line) applied."""
  for name, value in overrides.items():
    target = c
    *path, last = name.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def tiny_config(**overrides):
  """configs/tiny.py on the synthetic stream, shrunk for fast tests; `overrides` use dotted names."""
  c = load_config("tiny.py").get_config()
  c.data = "synthetic"
  c.seq_len = 32
  c.global_batch_size = 8
  c.num_train_steps = 6
  c.log_every = 1
  c.eval_every = 0
  c.eval_steps = 1
  c.checkpoint_every = 3
  c.async_checkpointing = False
  c.model.update(vocab_size=128, d_model=32, num_heads=2, mlp_dim=64, max_seq_len=32)
  return override(c, overrides)


def vqgan_config(data_dir, **overrides):
  """configs/vqgan_shapes.py on shapes/small, shrunk for fast tests."""
  c = load_config("vqgan_shapes.py").get_config()
  c.data, c.data_dir = "shapes/small", data_dir
  c.batch_size = 8
  c.num_train_steps = 6
  c.log_every = 2
  c.eval_every = 6
  c.eval_images = 16
  c.checkpoint_every = 3
  c.keep_checkpoints = 5
  c.async_checkpointing = False
  c.restart_every = 2
  c.vqgan.update(ch=8, z_channels=8, embed_dim=8, n_embed=64, norm_groups=4)
  return override(c, overrides)


def nontrivial(params, seed=1):
  """Replace every parameter by N(0, 0.1): the zero-initialised ones would hide bugs."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def save_untrained(workdir: str, config, architecture: dict, s, vocab=None,
                   randomized: bool = False) -> None:
  """Saves the initial state of trainer setup `s` through the trainer's checkpoints (with the
  token model's `vocab`), as the last step of `config`'s run: a finished workdir whose weights
  are untrained; `randomized`, all of them N(0, 0.1) (`nontrivial`)."""
  from cm3jax.core import checkpoint, sharding
  ckpts = checkpoint.Checkpoints(checkpoint.prepare_workdir(workdir), config, architecture, vocab)
  with sharding.use_mesh(s.mesh), contextlib.closing(ckpts):
    state = s.init_state(jax.random.PRNGKey(config.seed))
    if randomized:
      state = state.replace(params=jax.device_put(nontrivial(state.params),
                                                  jax.tree.map(lambda x: x.sharding, state.params)))
    ckpts.save(config.num_train_steps,
               state.replace(step=jnp.asarray(config.num_train_steps, state.step.dtype)))
    ckpts.wait()


def untrained_run(vqgan_workdir: str, workdir: str) -> str:
  """WORKDIR: a finished tiny CM3 run on shapes captions and the VQGAN of `vqgan_workdir`, its
  weights random (N(0, 0.1)): what cm3jax.load and the server load, in seconds."""
  from cm3jax.core import model as model_lib
  from cm3jax.core.vocab import Vocab
  from cm3jax.data import shapes
  from cm3jax.prepare import train_tokenizer
  from cm3jax.training import trainer
  from cm3jax.vqgan.tokenizer import ImageTokenizer
  captions = [shapes.scene("train", i).caption() for i in range(300)]
  vocab = Vocab(train_tokenizer.train(captions, 300), num_sentinels=16,
                num_image_codes=ImageTokenizer.load(vqgan_workdir).cfg.n_embed)
  config = tiny_config(**{"data": "cm3", "cm3.vqgan_workdir": vqgan_workdir, "seq_len": 128,
                          "model.vocab_size": vocab.size, "model.max_seq_len": 128})
  save_untrained(workdir, config, {"model": model_lib.ModelConfig.architecture()},
                 trainer.setup(config), vocab, randomized=True)
  return workdir


def tokenize_shapes(vqgan_workdir: str, data_dir: str, out: str) -> str:
  """OUT: code shards of shapes/small's train and validation splits (shards of 100 records)."""
  from cm3jax.prepare import tokenize_images
  from cm3jax.vqgan.tokenizer import ImageTokenizer
  tokenizer = ImageTokenizer.load(vqgan_workdir)
  for split in ("train", "validation"):
    tokenize_images.tokenize_split(tokenizer, "shapes/small", split, out, data_dir, shard_size=100)
  return out


def command_env() -> dict[str, str]:
  """The environment of a command the tests start: the tests' own, with this checkout on the
  path and the CPU backend at its default optimisation level (the commands train; see
  conftest)."""
  flags = [f for f in os.environ["XLA_FLAGS"].split()
           if not f.startswith("--xla_backend_optimization_level")]
  return dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=" ".join(flags))


def run_module(module: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repository's root, as the README runs it."""
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=command_env(),
                        capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, tool: str, message: str):
  """The command failed with status 1 and one line `TOOL: error: ...MESSAGE...`, no traceback."""
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith(f"{tool}: error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


def clip_config(data_dir, **overrides):
  """configs/clip_shapes.py on shapes/small, shrunk for fast tests."""
  c = load_config("clip_shapes.py").get_config()
  c.data, c.data_dir = "shapes/small", data_dir
  c.text_vocab_size = 300
  c.batch_size = 32
  c.num_train_steps = 6
  c.learning_rate = 3e-3
  c.warmup_steps = 5
  c.log_every = 2
  c.eval_every = 6
  c.eval_examples = 64
  c.checkpoint_every = 3
  c.keep_checkpoints = 5
  c.async_checkpointing = False
  c.clip.update(embed_dim=32, vision_width=32, vision_layers=1, vision_heads=2, vision_mlp_dim=64,
                text_width=32, text_layers=1, text_heads=2, text_mlp_dim=64)
  return override(c, overrides)


class RecordingSampler:
  """Stands in for a Sampler: records the requests, draws image code 0 or ends the text."""

  def __init__(self, vocab):
    self.vocab, self.requests = vocab, []

  def generate(self, requests, num_new, mode, sampling_config):
    self.requests.extend(requests)
    return np.full((len(requests), num_new), self.vocab.image_offset if mode == "image" else EOS,
                   np.int32)
