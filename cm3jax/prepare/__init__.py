"""The pipeline's stage libraries that make a run's inputs: image codes, text records, task shards, the text tokenizer, the memory bank and the neighbours."""
