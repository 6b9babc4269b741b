"""Glue shared by the scripts: rebuilding models from checkpoints and tokenising datasets."""
