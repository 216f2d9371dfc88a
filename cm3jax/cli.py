"""What every cm3jax command line shares: one flags parser, quiet libraries, one-line errors.

Each command module ends with `cli.run("NAME", _define_flags, main)`: a bad flag, a config file
that does not load, an override of a field the config lacks, a stray argument and every
ConfigError exit with status 1 and one line, `cm3jax.NAME: error: ...`, instead of a traceback.
"""

import functools
import sys
from typing import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from cm3jax.config import ConfigError
from cm3jax.training import faults


def run(name: str, define_flags: Callable[[], None], body: Callable):
  """Defines the command's flags and runs `body(FLAGS)` as `python -m cm3jax.NAME`."""
  define_flags()
  app.run(functools.partial(_main, name, body), flags_parser=functools.partial(_parse, name))


def define_run_flags(workdir_help: str):
  """The flags of a command that runs a config: --config (a configs/*.py file; its fields are
  overridden with --config.FIELD=VALUE), --workdir and --multihost."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() first (TPU pods, multi-node GPUs).")
  flags.mark_flag_as_required("config")


def _main(name: str, body: Callable, argv):
  if len(argv) > 1:
    _fail(name, f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it touches at INFO.
  if "multihost" in flags.FLAGS and flags.FLAGS.multihost:
    jax.distributed.initialize()
  try:
    body(flags.FLAGS)
  except faults.Preempted as e:
    print(f"cm3jax.{name}: {e}", flush=True)
    sys.exit(0)
  except (ConfigError, faults.NonFinite) as e:
    _fail(name, str(e))


def _parse(name: str, argv):
  try:
    argv = flags.FLAGS(argv)
    config = flags.FLAGS.config if "config" in flags.FLAGS else None
    if hasattr(config, "to_dict"):
      config.to_dict()  # config_flags defers a config file's load error to first use.
    return argv
  except flags.Error as e:
    _fail(name, str(e))
  except (AttributeError, KeyError) as e:  # an override names a field the config lacks
    field = str(e).strip("\"'")
    _fail(name, f"the config has no field {field!r} (see cm3jax/config.py)")
  except (OSError, TypeError, ValueError) as e:
    _fail(name, f"bad --config: {str(e).strip().splitlines()[-1].strip()}")


def _fail(name: str, message: str):
  sys.exit(f"cm3jax.{name}: error: {message}")
