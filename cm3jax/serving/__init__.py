"""Serving a trained run over HTTP: the request batcher and the app of `cm3jax.serve`."""
