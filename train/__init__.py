"""Training: data pipeline, optimizer, train steps, loop, checkpoints (pre-training issue)."""
