"""Rebuild trained models from their checkpoints (the config travels inside each checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch

from transformer import VQGANPrior
from utils.checkpoint import load_checkpoint, load_state_dict_checked
from vqgan import VQGAN


def vqgan_from_state(state: dict, source: str, device: torch.device | str = "cpu") -> VQGAN:
    """A VQGAN in eval mode from a stage-1 checkpoint dict (EMA weights when the run kept them)."""
    model = VQGAN(**state["model_config"])
    weights = state.get("ema") or state["model"]
    load_state_dict_checked(model, weights, source)
    return model.to(device).eval()


def load_vqgan(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQGAN, dict]:
    """Load a stage-1 checkpoint: (model, {"model": weights used, "model_config": kwargs})."""
    state = load_checkpoint(path, kind="vqgan")
    model = vqgan_from_state(state, str(path), device)
    return model, {"model": model.state_dict(), "model_config": state["model_config"], "config": state["config"]}


def load_prior(path: str | Path, device: torch.device | str = "cpu") -> tuple[VQGANPrior, dict]:
    """Load a stage-2 checkpoint (it carries its VQGAN): (prior in eval mode, checkpoint dict)."""
    state = load_checkpoint(path, kind="transformer")
    vqgan = VQGAN(**state["vqgan_config"])
    load_state_dict_checked(vqgan, state["vqgan"], f"{path} (stage-1 part)")
    prior = VQGANPrior(vqgan, **state["prior_config"])
    load_state_dict_checked(prior.gpt, state["model"], str(path))
    return prior.to(device).eval(), state
