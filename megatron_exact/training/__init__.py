"""Training: the EXACT trainer, its arguments, checkpointing and logging."""
