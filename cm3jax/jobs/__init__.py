"""What runs every layer end to end: the pipeline of stages."""
