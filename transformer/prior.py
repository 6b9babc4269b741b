"""The stage-2 prior: a GPT over the code indices of a frozen VQGAN.

Token layout for a codebook of ``K`` codes: ids ``0 .. K-1`` are codes. Special tokens start at
``K`` so they never collide with a code:

* unconditional model: one start token ``K``;
* class-conditional model: class ``c`` is token ``K + c`` and the null ("no class") token, used for
  class dropout and classifier-free guidance, is ``K + num_classes``.

A sequence is ``[prefix token] + the first h*w - 1 codes`` in raster order, and the targets are
the ``h*w`` codes, so the GPT (``block_size = h*w``) predicts only codes (``out_vocab_size = K``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from transformer.gpt import GPT
from transformer.sampling import SamplingConfig, sample_tokens
from utils.checkpoint import CheckpointError, load_state_dict_checked
from utils.config import option

Labels = int | Sequence[int] | torch.Tensor


@dataclass
class PriorConfig:
    """The ``transformer`` config section: the GPT and how the prior trains it."""

    n_layer: int = option(8, "transformer blocks")
    n_head: int = option(8, "attention heads")
    n_embd: int = option(512, "embedding width")
    dropout: float = option(0.0, "dropout in attention and MLP")
    positions: Literal["learned", "rotary"] = option("learned", "position encoding")
    class_conditional: bool = option(True, "condition on the dataset's class labels")
    class_dropout: float = option(0.1, "probability of dropping the class (enables classifier-free guidance)")
    pkeep: float = option(1.0, "probability of keeping each input token (the rest become random codes)")


class VQGANPrior(nn.Module):
    """A frozen VQGAN plus a GPT over its indices.

    Args:
        vqgan: module with ``encode_to_indices(images) -> LongTensor[B, h, w]``,
            ``decode_indices(indices) -> images`` and attributes ``codebook_size`` and
            ``latent_size`` (h, w). It is frozen and stays in eval mode.
        config: the GPT (see :class:`transformer.gpt.GPT`), class conditioning, class dropout (the
            training probability of replacing the class token by the null token) and ``pkeep`` (the
            training probability of keeping each input code; the rest become uniformly random codes,
            the targets stay clean).
        num_classes: number of classes of a class-conditional model.
        codebook_size, latent_size: optional; checked against the VQGAN, so that
            :meth:`from_prior_config` rebuilds a saved prior only around the VQGAN it was trained on.
    """

    def __init__(self, vqgan: nn.Module, config: PriorConfig, num_classes: int = 0, *,
                 codebook_size: int | None = None, latent_size: Sequence[int] | None = None) -> None:
        super().__init__()
        class_conditional, class_dropout, pkeep = config.class_conditional, config.class_dropout, config.pkeep
        size = vqgan.latent_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if codebook_size is not None and codebook_size != vqgan.codebook_size:
            raise ValueError(f"the prior was built for {codebook_size} codes but the VQGAN has {vqgan.codebook_size}; "
                             "load the stage-1 checkpoint this prior was trained on.")
        if latent_size is not None and tuple(latent_size) != (h, w):
            raise ValueError(f"the prior was built for {tuple(latent_size)} latents but the VQGAN gives {(h, w)}; "
                             "load the stage-1 checkpoint (and image size) this prior was trained on.")
        if class_conditional and num_classes < 1:
            raise ValueError("a class-conditional prior needs num_classes >= 1; set it from the dataset "
                             "or set class_conditional=False.")
        self.vqgan = vqgan.eval().requires_grad_(False)
        self.codebook_size = int(vqgan.codebook_size)
        self.latent_size = (h, w)
        self.class_conditional = class_conditional
        self.num_classes = num_classes
        self.class_dropout = class_dropout
        self.pkeep = pkeep
        # The start token of an unconditional prior; the no-class token of a class-conditional one.
        self.null_token = self.codebook_size + (num_classes if class_conditional else 0)
        self.options = config
        self.gpt = GPT(vocab_size=self.null_token + 1, block_size=h * w, n_layer=config.n_layer,
                       n_head=config.n_head, n_embd=config.n_embd, dropout=config.dropout, positions=config.positions,
                       out_vocab_size=self.codebook_size)

    @property
    def prior_config(self) -> dict[str, Any]:
        """Plain values that rebuild this prior around the same VQGAN: what checkpoints store as ``prior_config``."""
        return {**asdict(self.options), "num_classes": self.num_classes, "codebook_size": self.codebook_size,
                "latent_size": list(self.latent_size)}

    @classmethod
    def from_prior_config(cls, vqgan: nn.Module, prior_config: dict[str, Any]) -> VQGANPrior:
        """The prior :attr:`prior_config` describes, around ``vqgan`` (GPT weights freshly initialised)."""
        options = dict(prior_config)
        extra = {key: options.pop(key) for key in ("num_classes", "codebook_size", "latent_size")}
        return cls(vqgan, PriorConfig(**options), **extra)

    @classmethod
    def from_checkpoint(cls, vqgan: nn.Module, state: dict[str, Any], source: str) -> VQGANPrior:
        """The trained prior of a stage-2 checkpoint dict around ``vqgan``, in eval mode (EMA weights when kept)."""
        try:
            prior = cls.from_prior_config(vqgan, state["prior_config"])
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
        """Raise ValueError (with the fix) for labels this prior cannot take. Reads the ids on the host:
        sampling and the scripts call it on labels a user gives, never the training step."""
        self._check_conditioning(labels)
        if labels is not None and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            bad = labels[(labels < 0) | (labels >= self.num_classes)][0].item()
            raise ValueError(f"class id {bad} is out of range: this prior has {self.num_classes} classes, "
                             f"use ids 0..{self.num_classes - 1}.")

    def _check_conditioning(self, labels: torch.Tensor | None) -> None:
        """Labels given exactly when the prior is class-conditional (nothing read on the host)."""
        if not self.class_conditional:
            if labels is not None:
                raise ValueError("this prior is unconditional (class_conditional=False) and takes no class; "
                                 "drop the class, or train a class-conditional prior.")
            return
        if labels is None:
            raise ValueError(f"this prior is class-conditional; pass a class id in 0..{self.num_classes - 1} "
                             "for every sequence.")

    def prefix_tokens(self, labels: torch.Tensor | None, batch_size: int,
                      device: torch.device | None = None) -> torch.Tensor:
        """The first input token [B, 1]: the class token ``K + label`` or the start token ``K``."""
        self._check_conditioning(labels)
        if labels is None:
            return torch.full((batch_size, 1), self.null_token, dtype=torch.long, device=device)
        return (labels.long() + self.codebook_size).view(batch_size, 1).to(device)

    def corrupt(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Keep each code with probability ``pkeep``; replace the rest by uniformly random codes."""
        if self.pkeep >= 1.0:
            return indices
        keep = torch.rand(indices.shape, generator=generator, device=indices.device) < self.pkeep
        noise = torch.randint(self.codebook_size, indices.shape, generator=generator, device=indices.device)
        return torch.where(keep, indices, noise)

    def make_inputs(self, indices: torch.Tensor,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """GPT inputs [B, h*w] and targets [B, h*w] for codes ``indices`` [B, h*w] (or [B, h, w]).

        In training mode the class token is dropped to the null token with probability
        ``class_dropout`` and the input codes are corrupted (see :meth:`corrupt`).
        """
        indices = indices.flatten(1)
        if indices.shape[1] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} codes per sequence (latent size {self.latent_size}), "
                             f"got {indices.shape[1]}.")
        prefix = self.prefix_tokens(labels, indices.shape[0], indices.device)
        codes = indices
        if self.training:
            if self.class_conditional and self.class_dropout > 0:
                drop = torch.rand(prefix.shape, device=prefix.device) < self.class_dropout
                prefix = prefix.masked_fill(drop, self.null_token)
            codes = self.corrupt(indices)
        return torch.cat([prefix, codes[:, :-1]], dim=1), indices

    def forward(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-code cross-entropy of ``indices`` [B, h*w] given ``labels`` [B] (if conditional)."""
        inputs, targets = self.make_inputs(indices, labels)
        return self.gpt(inputs, targets)[1]

    def _sample_labels(self, num: int, labels: Labels | None, cfg_scale: float,
                       generator: torch.Generator | None) -> torch.Tensor | None:
        if not self.class_conditional:
            if labels is not None:
                self.check_labels(torch.as_tensor(labels))
            if cfg_scale != 1.0:
                raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional prior; use cfg_scale=1 "
                                 "with this unconditional one.")
            return None
        if labels is None:
            device = generator.device if generator is not None else None
            return torch.randint(self.num_classes, (num,), generator=generator, device=device).cpu()
        labels = torch.as_tensor(labels, dtype=torch.long).cpu()
        if labels.dim() == 0:
            labels = labels.expand(num)
        if labels.shape != (num,):
            raise ValueError(f"got {labels.numel()} class ids for {num} samples; pass one id, or one per sample.")
        self.check_labels(labels)
        return labels

    @torch.no_grad()
    def sample(self, num: int, labels: Labels | None = None, *, temperature: float = SamplingConfig.temperature,
               top_k: int | None = SamplingConfig.top_k, top_p: float | None = SamplingConfig.top_p,
               cfg_scale: float = SamplingConfig.cfg_scale, compile: bool = SamplingConfig.compile,
               generator: torch.Generator | None = None,
               batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``num`` code grids and decode them: (indices [N, h, w], images [N, C, H, W]).

        ``labels`` (class-conditional priors only): one class id for all samples, or one per
        sample; ``None`` draws classes uniformly with ``generator``. ``cfg_scale`` mixes the
        conditional and null-token predictions (classifier-free guidance); ``compile`` decodes with
        the compiled one-token step (see :func:`transformer.sampling.sample_tokens`). Samples are drawn
        ``batch_size`` (default: all) at a time.
        """
        labels = self._sample_labels(num, labels, cfg_scale, generator)
        device = self.gpt.tok_emb.weight.device
        batch_size = batch_size or num
        all_indices, all_images = [], []
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            chunk = None if labels is None else labels[start:start + b]
            prefix = self.prefix_tokens(chunk, b, device)
            uncond = torch.full_like(prefix, self.null_token)
            tokens = sample_tokens(self.gpt, prefix, self.seq_len, temperature=temperature, top_k=top_k, top_p=top_p,
                                   cfg_scale=cfg_scale, compile=compile, uncond_prefix=uncond,
                                   generator=generator)
            indices = tokens.view(b, *self.latent_size)
            all_indices.append(indices)
            all_images.append(self.vqgan.decode_indices(indices))
        return torch.cat(all_indices), torch.cat(all_images)
