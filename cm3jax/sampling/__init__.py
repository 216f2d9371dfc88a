"""Drawing from a trained token model: the KV-cache engine, the CM3 and SFT tasks, instruct guidance, the TensorBoard watch."""
