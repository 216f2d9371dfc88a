"""What every cm3jax command line shares: no stray arguments, quiet libraries, one-line errors."""

import functools
import sys

from absl import app, flags, logging

from cm3jax.config import ConfigError


def command(name: str):
  """Makes `body(FLAGS)` an absl main for `python -m cm3jax.NAME`: a ConfigError exits with
  `cm3jax.NAME: error: ...` and status 1 instead of a traceback."""
  def wrap(body):
    @functools.wraps(body)
    def main(argv):
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
      logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO.
      try:
        body(flags.FLAGS)
      except ConfigError as e:
        sys.exit(f"cm3jax.{name}: error: {e}")
    return main
  return wrap
