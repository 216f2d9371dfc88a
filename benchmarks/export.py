r"""Time and peak host memory of `python -m cm3jax.export` on a random-weight checkpoint.

  python -m benchmarks.export --config=configs/350m.py --dtype=float32

Writes a step-0 checkpoint of the config (random weights, a 320-piece vocabulary with 8,192 image
codes, a random shapes VQGAN) into a temporary directory, then runs the export command and
reports its wall time and peak resident memory (the export process's own ru_maxrss) against the
size of the weights. Each runs in a process of its own started from this small one: on Linux a
child's peak RSS counts its parent's memory at the fork, so the parent holds no checkpoint.
"""

import os
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

from cm3jax.config import load_config_file
from cm3jax.core import checkpoint, sharding
from cm3jax.core import model as model_lib
from cm3jax.core.vocab import Vocab
from cm3jax.data import shapes
from cm3jax.prepare import train_tokenizer
from cm3jax.training import train, train_vqgan, trainer

_CONFIG = flags.DEFINE_string("config", "configs/350m.py", "The token model's config.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Export dtype.")
_MAKE = flags.DEFINE_string("make_checkpoint", None, "Internal: only write the checkpoint here.")


def random_vqgan(workdir: str):
  config = load_config_file("configs/vqgan_shapes.py")
  s = train_vqgan.setup(config)
  ckpts = checkpoint.Checkpoints(workdir, config, {"vqgan": train_vqgan.ARCHITECTURE})
  with sharding.use_mesh(s.mesh):
    ckpts.save(config.num_train_steps, s.init_state(jax.random.PRNGKey(0)))
    ckpts.wait()
  ckpts.close()


def random_checkpoint(workdir: str, vqgan_workdir: str) -> int:
  config = load_config_file(_CONFIG.value)
  config.data = "cm3"
  config.cm3.vqgan_workdir = vqgan_workdir
  spm = train_tokenizer.train([shapes.scene("train", i).caption() for i in range(2000)], 320)
  s = trainer.setup(config)
  ckpts = train.checkpoints(workdir, config, Vocab(spm, 16, 8192))
  with sharding.use_mesh(s.mesh):
    state = s.init_state(jax.random.PRNGKey(0))
    count = model_lib.num_params(state.params)
    ckpts.save(0, state)
    ckpts.wait()
  ckpts.close()
  return count


# `python -m cm3jax.export ARGS`, then its own peak RSS (kB on Linux) as it exits.
EXPORT_REPORTING_PEAK = """
import resource, runpy, sys
sys.argv[0] = "cm3jax.export"
try:
  runpy.run_module("cm3jax.export", run_name="__main__")
finally:
  print("peak_rss_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main(_):
  if _MAKE.value:
    random_vqgan(os.path.join(_MAKE.value, "vqgan"))
    count = random_checkpoint(os.path.join(_MAKE.value, "run"), os.path.join(_MAKE.value, "vqgan"))
    with open(os.path.join(_MAKE.value, "count"), "w") as f:
      f.write(str(count))
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  with tempfile.TemporaryDirectory(dir=".") as tmp:
    subprocess.run([sys.executable, sys.argv[0], f"--config={_CONFIG.value}",
                    f"--make_checkpoint={tmp}"], check=True, env=env)
    count = int(open(os.path.join(tmp, "count")).read())
    t = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", EXPORT_REPORTING_PEAK, f"--workdir={tmp}/run",
                             f"--out={tmp}/out", f"--dtype={_DTYPE.value}"],
                            check=True, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    peak = int(result.stdout.split("peak_rss_kb ")[1].split()[0]) * 1024
    written = sum(os.path.getsize(os.path.join(root, f))
                  for root, _, files in os.walk(f"{tmp}/out") for f in files)
  weights = count * 4
  print(f"{os.cpu_count()} CPU cores; {_CONFIG.value}: {count / 1e9:.2f}B parameters, "
        f"{weights / 2**30:.2f} GiB as float32 (the optimiser state not counted)")
  print("| dtype | export s | written GiB | peak host memory GiB | peak / float32 weights |")
  print("|---|---|---|---|---|")
  print(f"| {_DTYPE.value} | {seconds:.1f} | {written / 2**30:.2f} | {peak / 2**30:.2f} | "
        f"{peak / weights:.2f} |")


if __name__ == "__main__":
  app.run(main)
