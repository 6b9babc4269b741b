"""The stage-2 prior: a GPT over the code indices of a frozen VQGAN, after the tokens of a condition.

Token layout, for an image codebook of ``K`` codes and a condition (:mod:`transformer.conditions`) of
``L`` tokens from a vocabulary of ``M``:

* ids ``0 .. K-1`` are image codes;
* ids ``K .. K+M-1`` are condition tokens: condition token ``t`` is id ``K + t`` (class ``c`` is ``K + c``;
  code ``t`` of a condition tokenizer is ``K + t``);
* id ``K + M`` is the null condition: the start token of an unconditional prior (``M`` = 0, so the start
  token is ``K``), and what replaces every condition token when the condition is dropped in training
  (``condition_dropout``) and in the unconditional half of classifier-free guidance.

A sequence is ``[L condition tokens] + the first h*w - 1 codes`` in raster order, and the GPT
(``block_size = L + h*w - 1``) predicts only codes (``out_vocab_size = K``): the loss covers the h*w image
codes, predicted from positions ``L-1 ..``, never the condition's tokens.

Taming's ``Net2NetTransformer`` builds the same sequence (``cat(c_indices, z_indices)[:, :-1]``, the
logits from position ``L-1`` on), but its condition and image tokens share one embedding table with no
offset: condition token ``t`` and image code ``t`` are the same row. Here condition token ``t`` is row
``K + t``, so a taming embedding table maps to rows ``0 .. K-1`` (codes) and ``K .. K+M-1`` (its rows
``0 .. M-1`` again), and the null token's row is new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from transformer.conditions import MAP_KINDS, Condition, ConditionKind, build_condition
from transformer.gpt import GPT
from transformer.sampling import SamplingConfig
from transformer.window import Progress, sample_windowed
from utils.checkpoint import CheckpointError, load_state_dict_checked
from utils.config import option
from vqgan.tiled_decode import decode_grid

Labels = int | Sequence[int] | torch.Tensor


@dataclass
class PriorConfig:
    """The ``transformer`` config section: the GPT and how the prior trains it."""

    n_layer: int = option(8, "transformer blocks")
    n_head: int = option(8, "attention heads")
    n_embd: int = option(512, "embedding width")
    dropout: float = option(0.0, "dropout in attention and MLP")
    positions: Literal["learned", "rotary"] = option("learned", "position encoding")
    condition: ConditionKind = option(
        "class", "what the sequence starts with: none (a start token), class (the dataset's class labels), "
                 "segmentation, depth or lowres (a condition map, tokenized by --cond-vqgan), coord (pixel positions)")
    condition_dropout: float = option(
        0.1, "probability of dropping the condition in training (enables classifier-free guidance)")
    pkeep: float = option(1.0, "probability of keeping each input code (the rest become random codes)")
    coord_levels: int = option(256, "condition coord: quantization levels of the positions")


# Keys of prior configs written before conditions other than the class existed.
_RENAMED = {"class_dropout": "condition_dropout"}


def _upgrade(prior_config: dict[str, Any]) -> dict[str, Any]:
    """A stored prior config in today's keys (``class_conditional: true`` is ``condition: class``)."""
    options = {_RENAMED.get(key, key): value for key, value in prior_config.items()}
    if "class_conditional" in options:
        options["condition"] = "class" if options.pop("class_conditional") else "none"
    return options


class VQGANPrior(nn.Module):
    """A frozen VQGAN plus a GPT over its indices, conditioned as ``config.condition`` says.

    Args:
        vqgan: module with ``encode_to_indices(images) -> LongTensor[B, h, w]``,
            ``decode_indices(indices) -> images`` and attributes ``codebook_size`` and
            ``latent_size`` (h, w). It is frozen and stays in eval mode.
        config: the GPT (see :class:`transformer.gpt.GPT`), the condition, condition dropout (the
            training probability of replacing the condition by the null token) and ``pkeep`` (the
            training probability of keeping each input code; the rest become uniformly random codes,
            the targets stay clean).
        num_classes: number of classes of a class-conditional model.
        cond_vqgan: the frozen stage-1 model that tokenizes condition maps (segmentation, depth, lowres).
        codebook_size, latent_size: optional; checked against the VQGAN, so that
            :meth:`from_prior_config` rebuilds a saved prior only around the VQGAN it was trained on.
    """

    def __init__(self, vqgan: nn.Module, config: PriorConfig, num_classes: int = 0, *,
                 cond_vqgan: nn.Module | None = None, codebook_size: int | None = None,
                 latent_size: Sequence[int] | None = None) -> None:
        super().__init__()
        size = vqgan.latent_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if codebook_size is not None and codebook_size != vqgan.codebook_size:
            raise ValueError(f"the prior was built for {codebook_size} codes but the VQGAN has {vqgan.codebook_size}; "
                             "load the stage-1 checkpoint this prior was trained on.")
        if latent_size is not None and tuple(latent_size) != (h, w):
            raise ValueError(f"the prior was built for {tuple(latent_size)} latents but the VQGAN gives {(h, w)}; "
                             "load the stage-1 checkpoint (and image size) this prior was trained on.")
        if cond_vqgan is not None and config.condition not in MAP_KINDS:
            raise ValueError(f"a condition tokenizer was given, but transformer.condition={config.condition} takes "
                             f"none; use it with {', '.join(MAP_KINDS)}.")
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.codebook_size = int(vqgan.codebook_size)
        self.latent_size = (h, w)
        self.num_classes = num_classes if config.condition == "class" else 0
        self.condition: Condition = build_condition(
            config.condition, num_classes=num_classes, tokenizer=cond_vqgan, coord_levels=config.coord_levels,
            latent_size=(h, w), factor=getattr(vqgan, "downsample_factor", 1))
        self.condition_dropout = config.condition_dropout
        self.pkeep = config.pkeep
        self.null_token = self.codebook_size + self.condition.vocab_size
        self.options = config
        self.gpt = GPT(vocab_size=self.null_token + 1, block_size=self.prefix_len + h * w - 1, n_layer=config.n_layer,
                       n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, positions=config.positions,
                       out_vocab_size=self.codebook_size)

    @property
    def conditional(self) -> bool:
        return self.condition.kind != "none"

    @property
    def class_conditional(self) -> bool:
        return self.condition.kind == "class"

    @property
    def prefix_len(self) -> int:
        """Tokens before the first code: the condition's (one start token when unconditional)."""
        return self.condition.num_tokens

    @property
    def cond_vqgan(self) -> nn.Module | None:
        """The stage-1 model that tokenizes condition maps, if this prior has one."""
        return getattr(self.condition, "tokenizer", None)

    @property
    def prior_config(self) -> dict[str, Any]:
        """Plain values that rebuild this prior around the same VQGAN: what checkpoints store as ``prior_config``."""
        return {**asdict(self.options), "num_classes": self.num_classes, "codebook_size": self.codebook_size,
                "latent_size": list(self.latent_size)}

    @classmethod
    def from_prior_config(cls, vqgan: nn.Module, prior_config: dict[str, Any],
                          cond_vqgan: nn.Module | None = None) -> VQGANPrior:
        """The prior :attr:`prior_config` describes, around ``vqgan`` (GPT weights freshly initialised)."""
        options = _upgrade(prior_config)
        extra = {key: options.pop(key) for key in ("num_classes", "codebook_size", "latent_size")}
        return cls(vqgan, PriorConfig(**options), cond_vqgan=cond_vqgan, **extra)

    @classmethod
    def from_checkpoint(cls, vqgan: nn.Module, state: dict[str, Any], source: str,
                        cond_vqgan: nn.Module | None = None) -> VQGANPrior:
        """The trained prior of a stage-2 checkpoint dict around ``vqgan`` (and the condition tokenizer
        ``cond_vqgan``), in eval mode (EMA weights when kept)."""
        try:
            prior = cls.from_prior_config(vqgan, state["prior_config"], cond_vqgan)
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{source}: its prior_config cannot be built by this version of the code "
                                  f"({err}). Was it written by another version or another program?") from err
        load_state_dict_checked(prior.gpt, state.get("ema") or state["model"], source)
        return prior.eval()

    @property
    def seq_len(self) -> int:
        return self.latent_size[0] * self.latent_size[1]

    def train(self, mode: bool = True) -> VQGANPrior:
        super().train(mode)
        self.vqgan.eval()
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups of the GPT (the VQGAN is frozen)."""
        return self.gpt.param_groups(weight_decay)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> raster-order code indices [B, h*w]."""
        return self.vqgan.encode_to_indices(images).flatten(1)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h*w] or [B, h, w] -> images."""
        return self.vqgan.decode_indices(indices.reshape(-1, *self.latent_size))

    def check_labels(self, labels: torch.Tensor | None) -> None:
        """Raise ValueError (with the fix) for class ids this prior cannot take. Reads the ids on the host:
        sampling and the scripts call it on labels a user gives, never the training step."""
        if not self.class_conditional:
            if labels is not None:
                what = "unconditional" if not self.conditional else f"conditioned on {self.condition.kind} maps"
                raise ValueError(f"this prior is {what}, not on a class, and takes no class; drop the class, or "
                                 "train a class-conditional prior.")
            return
        if labels is None:
            raise ValueError(f"this prior is class-conditional; pass a class id in 0..{self.num_classes - 1} "
                             "for every sequence.")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"class id {bad} is out of range: this prior has {self.num_classes} classes, "
                             f"use ids 0..{self.num_classes - 1}.")

    def condition_tokens(self, condition: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """The condition's token ids [B, L] (``0 .. M-1``, before the offset ``K``) for its inputs: class ids [B]
        or condition maps [B, C, H, W]; None for an unconditional prior."""
        return self.condition.tokens(condition, batch_size)

    def prefix_tokens(self, cond_tokens: torch.Tensor | None, batch_size: int,
                      device: torch.device | None = None) -> torch.Tensor:
        """The tokens before the codes [B, L]: ``K +`` the condition's tokens, or the null (start) token."""
        if cond_tokens is None:
            if self.class_conditional:
                raise ValueError(f"this prior is class-conditional; pass a class id in 0..{self.num_classes - 1} for "
                                 f"every sequence.")
            if self.conditional:
                raise ValueError(f"this prior is conditioned on {self.condition.kind}; pass the condition of every "
                                 f"sequence.")
            return torch.full((batch_size, 1), self.null_token, dtype=torch.long, device=device)
        if not self.conditional:
            raise ValueError("this prior is unconditional (transformer.condition=none) and takes no condition; "
                             "drop it, or train a conditional prior.")
        return (cond_tokens.long() + self.codebook_size).view(batch_size, self.prefix_len).to(device)

    def corrupt(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Keep each code with probability ``pkeep``; replace the rest by uniformly random codes."""
        if self.pkeep >= 1.0:
            return indices
        keep = torch.rand(indices.shape, generator=generator, device=indices.device) < self.pkeep
        noise = torch.randint(self.codebook_size, indices.shape, generator=generator, device=indices.device)
        return torch.where(keep, indices, noise)

    def make_inputs(self, indices: torch.Tensor,
                    cond_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GPT inputs [B, L + h*w - 1] and targets (-100, not scored, at the first ``L - 1`` positions) for codes
        ``indices`` [B, h*w] (or [B, h, w]) after the condition's tokens ``cond_tokens`` [B, L] (class ids [B]).

        In training mode the condition is dropped to the null token with probability
        ``condition_dropout`` and the input codes are corrupted (see :meth:`corrupt`).
        """
        indices = indices.flatten(1)
        if indices.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} codes per sequence (latent size {self.latent_size}), "
                             f"got {indices.shape[1]}.")
        batch = indices.shape[0]
        prefix = self.prefix_tokens(cond_tokens, batch, indices.device)
        codes = indices
        if self.training:
            if self.conditional and self.condition_dropout > 0:
                drop = torch.rand((batch, 1), device=prefix.device) < self.condition_dropout
                prefix = prefix.masked_fill(drop, self.null_token)
            codes = self.corrupt(indices)
        unscored = indices.new_full((batch, self.prefix_len - 1), -100)
        return torch.cat([prefix, codes[:, :-1]], dim=1), torch.cat([unscored, indices], dim=1)

    def forward(self, indices: torch.Tensor, cond_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-code cross-entropy of ``indices`` [B, h*w] after the condition's tokens [B, L] (class ids [B])."""
        inputs, targets = self.make_inputs(indices, cond_tokens)
        return self.gpt(inputs, targets)[1]

    def _sample_conditions(self, num: int, condition: Labels | torch.Tensor | None, cfg_scale: float,
                           generator: torch.Generator | None) -> torch.Tensor | None:
        """The condition inputs of ``num`` samples: class ids (drawn uniformly when None) or condition maps."""
        if not self.conditional:
            if condition is not None:
                self.condition_tokens(torch.as_tensor(condition), num)
            if cfg_scale != 1.0:
                raise ValueError(f"cfg_scale={cfg_scale} needs a conditional prior; use cfg_scale=1 "
                                 "with this unconditional one.")
            return None
        if not self.class_conditional:
            if condition is None or not isinstance(condition, torch.Tensor) or condition.shape[0] != num:
                raise ValueError(f"this prior is conditioned on {self.condition.kind}; pass {num} condition maps "
                                 f"[{num}, C, H, W], one per sample.")
            return condition
        if condition is None:
            device = generator.device if generator is not None else None
            return torch.randint(self.num_classes, (num,), generator=generator, device=device).cpu()
        labels = torch.as_tensor(condition, dtype=torch.long).cpu()
        if labels.dim() == 0:
            labels = labels.expand(num)
        if labels.shape != (num,):
            raise ValueError(f"got {labels.numel()} class ids for {num} samples; pass one id, or one per sample.")
        self.check_labels(labels)
        return labels

    def _sampling_prefix(self, condition: torch.Tensor | None, batch: int, grid: tuple[int, int],
                         device: torch.device) -> torch.Tensor:
        """What :func:`transformer.window.sample_windowed` starts every window with: the prefix [B, L], or the
        tokens [B, H, W] of condition maps given at the size of a ``grid`` larger than the training grid."""
        cond_tokens = self.condition_tokens(condition, batch)
        if grid == self.latent_size or not self.condition.spatial:
            return self.prefix_tokens(cond_tokens, batch, device)
        height, width = grid
        if self.prefix_len != self.seq_len:
            raise ValueError(f"this prior's {self.condition.kind} condition has {self.prefix_len} tokens for "
                             f"{self.seq_len} codes; sampling beyond the training size crops the condition's tokens "
                             f"with the codes, so it needs a condition tokenizer with the image VQGAN's downsampling.")
        if cond_tokens.shape[1] != height * width:
            factor = getattr(self.vqgan, "downsample_factor", 1)
            raise ValueError(f"the condition maps give {cond_tokens.shape[1]} tokens for a {height}x{width} grid of "
                             f"codes; give them at the size of the samples ({height * factor}x{width * factor}).")
        return (cond_tokens.long() + self.codebook_size).view(batch, height, width).to(device)

    def check_grid(self, grid: Sequence[int]) -> tuple[int, int]:
        """``grid`` (rows, columns of codes) as a tuple, after checking the training window fits in it."""
        height, width = (int(size) for size in grid)
        if height < self.latent_size[0] or width < self.latent_size[1]:
            raise ValueError(f"a grid of {height}x{width} codes is smaller than this prior's training grid "
                             f"{self.latent_size[0]}x{self.latent_size[1]}, its sliding window; sample at least that.")
        return height, width

    @torch.no_grad()
    def sample(self, num: int, condition: Labels | torch.Tensor | None = None, *, given: torch.Tensor | None = None,
               grid: Sequence[int] | None = None, temperature: float = SamplingConfig.temperature,
               top_k: int | None = SamplingConfig.top_k, top_p: float | None = SamplingConfig.top_p,
               cfg_scale: float = SamplingConfig.cfg_scale, compile: bool = SamplingConfig.compile,
               window_caches: int = SamplingConfig.window_caches, generator: torch.Generator | None = None,
               batch_size: int | None = None, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``num`` code grids and decode them: (indices [N, H, W], images [N, C, H*f, W*f]).

        ``grid``: the (rows, columns) of codes to sample, at least the training grid (the default); a larger
        grid is sampled with the training grid as a sliding window (:mod:`transformer.window`).
        ``condition``: for a class-conditional prior one class id for all samples, or one per sample
        (``None`` draws classes uniformly with ``generator``); for a map condition one map per sample
        [N, C, H, W], at the size of the samples; for coordinates one coordinate map per sample. ``given``
        [N, k] (completion): the first ``k`` codes of every sample in raster order, kept as they are; the rest
        is sampled. ``cfg_scale`` mixes the conditional and null-condition predictions (classifier-free
        guidance); ``compile`` decodes with the compiled one-token step (see
        :func:`transformer.sampling.sample_tokens`); ``window_caches`` see :func:`transformer.window.sample_windowed`.
        Samples are drawn ``batch_size`` (default: all) at a time. ``progress(codes, filled)`` is called after every
        sampled code with the batch's codes so far [b, H, W], of which the first ``filled`` in raster order are final.
        """
        grid = self.latent_size if grid is None else self.check_grid(grid)
        total = grid[0] * grid[1]
        conditions = self._sample_conditions(num, condition, cfg_scale, generator)
        kept = 0 if given is None else given.shape[1]
        if given is not None and (given.shape[0] != num or not 0 <= kept < total):
            raise ValueError(f"given must hold the first k < {total} codes of each of the {num} samples, "
                             f"got shape {tuple(given.shape)}.")
        device = self.gpt.tok_emb.weight.device
        batch_size = batch_size or num
        all_indices, all_images = [], []
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            chunk = None if conditions is None else conditions[start:start + b].to(device)
            prefix = self._sampling_prefix(chunk, b, grid, device)
            uncond = torch.full((b, self.prefix_len), self.null_token, dtype=torch.long, device=device)
            codes = None if given is None else given[start:start + b].to(device).long()
            tokens = sample_windowed(self.gpt, prefix, grid, self.latent_size, given=codes, uncond_prefix=uncond,
                                     temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                     compile=compile, generator=generator, window_caches=window_caches,
                                     progress=None if progress is None else grid_progress(progress, grid))
            indices = tokens.view(b, *grid)
            all_indices.append(indices)
            all_images.append(decode_grid(self.vqgan, indices, self.latent_size))
        return torch.cat(all_indices), torch.cat(all_images)


def grid_progress(progress: Progress, grid: tuple[int, int]) -> Progress:
    """``progress`` called with the codes as grids [B, H, W] rather than raster sequences [B, H*W]."""
    return lambda codes, filled: progress(codes.view(-1, *grid), filled)
