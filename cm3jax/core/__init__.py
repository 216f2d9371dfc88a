"""What every layer builds on: the transformer, the vocabulary, the device mesh, checkpoints and provenance."""
