"""Shared infrastructure: config, checkpoints, logging, plots, metrics, the training loop and DDP helpers."""
