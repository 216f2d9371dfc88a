"""Checkpoints of other frameworks: OPT export and import, CM3 fairseq checkpoints, the torch key layout."""
