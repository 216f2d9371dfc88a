"""cm3jax: CM3Leon in JAX. `cm3jax.load(workdir)` gives a trained run (cm3jax/run.py); the
commands are `python -m cm3jax.NAME`. The run module is imported on first use, so
`import cm3jax` stays light."""

__all__ = ["load", "Run", "RequestError"]


def __getattr__(name: str):
  if name in __all__:
    from cm3jax import run
    return getattr(run, name)
  raise AttributeError(f"module 'cm3jax' has no attribute {name!r}")
