"""Glue shared by the scripts: building models, loading checkpoints, tokenising, evaluating, pictures."""
