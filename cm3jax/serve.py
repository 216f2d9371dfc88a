r"""Serve a trained run over HTTP, with a demo page at / (docs/serving.md).

  python -m cm3jax.serve --workdir=workdirs/tiny
  python -m cm3jax.serve --workdir=workdirs/tiny_ra --memory=workdirs/tiny_ra/memory --port=8080

Needs requirements-serve.txt. Loads the run (`cm3jax.load`), compiles the shapes it serves
(text->image and captioning at each batch size), then listens on --host:--port (127.0.0.1:
this machine only; --host=0.0.0.0 to take requests from others). Requests that arrive within
--max_wait_ms of each other are served by one sampler call of up to --max_batch images; beyond
--max_queue waiting requests the server answers 503 with Retry-After. SIGTERM or Ctrl-C stops
taking requests and answers the ones it has before it exits.
"""

import socket

from absl import flags

from cm3jax import cli
from cm3jax import run as run_lib
from cm3jax.config import ConfigError


def _define_flags():
  flags.DEFINE_string("workdir", None, "Workdir of a cm3jax.train run.")
  flags.DEFINE_string("memory", "", "A memory bank to retrieve from; default: the run's own, "
                      "where it has one.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
  flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed).")
  flags.DEFINE_integer("max_batch", 8, "Most images (or images to caption) in one sampler call.")
  flags.DEFINE_float("max_wait_ms", 5.0, "How long a request waits for others to join its "
                     "batch.")
  flags.DEFINE_integer("max_queue", 64, "Most requests waiting; more get 503.")
  flags.DEFINE_integer("max_body_kb", 4096, "Largest request body.")
  flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: weight-only int8 decoding.")
  flags.DEFINE_bool("warm_up", True, "Compile the served shapes before listening.")


def main(FLAGS):
  import uvicorn

  from cm3jax.serving import app as app_lib
  if not FLAGS.workdir:
    raise ConfigError("--workdir is required")
  limits = app_lib.Limits(max_batch=FLAGS.max_batch, max_wait_ms=FLAGS.max_wait_ms,
                          max_queue=FLAGS.max_queue, max_body_bytes=FLAGS.max_body_kb << 10)
  run = run_lib.load(FLAGS.workdir, FLAGS.memory, quantize=FLAGS.quantize)
  service = app_lib.Service(run, limits)
  if FLAGS.warm_up:
    print(f"compiled {'; '.join(service.warm_up())}", flush=True)
  listening = socket.create_server((FLAGS.host, FLAGS.port))
  port = listening.getsockname()[1]
  print(f"serving {FLAGS.workdir} at step {run.step} on http://{FLAGS.host}:{port}", flush=True)
  uvicorn.Server(uvicorn.Config(app_lib.make_app(service), log_level="warning",
                                timeout_graceful_shutdown=None)).run(sockets=[listening])


if __name__ == "__main__":
  cli.run("serve", _define_flags, main)
