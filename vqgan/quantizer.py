"""Vector quantiser: nearest-code lookup with a straight-through gradient, plus options that keep codebooks alive.

Options: cosine lookup (``l2_norm``), a low-dimensional lookup space (``codebook_dim``), EMA codebook
updates (``ema``), re-seeding of dead codes from encoder outputs (``dead_code_steps``), and rolling
usage statistics over the last ``usage_window`` optimizer steps. All statistics live in registered
buffers, so they are saved in and restored from ``state_dict``.

A training forward only accumulates this step's code counts; :meth:`VectorQuantizer.end_step`, called
once per optimizer step after its backward passes (the stage-1 step does), moves them into the usage
window and restarts dead codes. With gradient accumulation the window and ``dead_code_steps``
therefore count optimizer steps, not micro-batches. Nothing in a training forward or in ``end_step``
reads a value on the host, so a training step never waits for the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from utils.config import option


class QuantizerOutput(NamedTuple):
    """Result of :meth:`VectorQuantizer.forward`.

    ``z_q`` is float32 [B, embed_dim, H, W] whatever the input dtype; ``loss`` is the scalar
    codebook + commitment loss; ``indices`` is long [B, H, W].
    """

    z_q: torch.Tensor
    loss: torch.Tensor
    indices: torch.Tensor


@dataclass
class QuantizerConfig:
    """The codebook options of the ``model`` config section (:class:`vqgan.model.VQGANConfig` extends it)."""

    codebook_size: int = option(512, "number of codes in the codebook")
    embed_dim: int = option(64, "dimension of a code vector (1x1 convs map z_channels to it and back)")
    codebook_dim: Optional[int] = option(None, "if set, look codes up in this lower dimension (factorised codes)")
    l2_norm: bool = option(False, "cosine-similarity lookup on l2-normalised vectors")
    beta: float = option(0.25, "commitment weight on the encoder term ||z - sg(z_q)||^2")
    ema: bool = option(False, "update codes by exponential moving averages instead of gradients")
    ema_decay: float = option(0.99, "decay of the EMA codebook update")
    ema_eps: float = option(1e-5, "Laplace smoothing of EMA cluster sizes")
    dead_code_steps: int = option(0, "re-seed codes unused for this many optimizer steps from recent encoder "
                                  "outputs (0 = off)")
    usage_window: int = option(100, "optimizer steps of indices kept for the codebook-usage statistic")
    quantizer: Literal["nearest", "gumbel"] = option(
        "nearest", "nearest: the nearest code (trainable); gumbel: the most likely code of a learned 1x1 projection "
                   "to logits over the codebook, as in taming's vqgan_gumbel_f8 (for imported models; not trainable)")


def code_statistics(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fraction of codes used at least once and ``exp(entropy)`` of a histogram of code counts, as
    float64 0-d tensors on the histogram's device (nothing is read on the host).

    ``counts`` has one entry per code. An empty histogram gives ``(0, 0)``.
    """
    counts = counts.detach().double().flatten()
    total = counts.sum()
    used = counts > 0
    probs = counts / total
    # Unused codes are masked, not selected: selecting would wait for the device to count them.
    terms = torch.where(used, probs * probs.log(), 0.0)
    return used.double().mean(), torch.where(total > 0, (-terms.sum()).exp(), 0.0)


def usage_and_perplexity(counts: torch.Tensor) -> tuple[float, float]:
    """:func:`code_statistics` as Python floats."""
    usage, perplexity = code_statistics(counts)
    return float(usage), float(perplexity)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class VectorQuantizer(nn.Module):
    """Map each spatial vector of ``z`` [B, embed_dim, H, W] to its nearest of ``codebook_size`` codes.

    Loss: ``beta * ||z - sg(z_q)||^2 + ||sg(z) - z_q||^2`` (means over elements); beta weighs the
    commitment term that trains the encoder. With ``ema=True`` the second term is dropped and the
    codes follow exponential moving averages of the vectors assigned to them.

    When ``codebook_dim`` is set, ``z`` is projected to that dimension by a 1x1 conv for the lookup
    and the chosen code is projected back by another; codes are stored in the low dimension and
    the loss is measured there. With ``l2_norm`` both vectors and codes are unit-normalised in the
    lookup space, so the nearest code is the one of highest cosine similarity.

    EMA updates, dead-code restarts and usage statistics happen in training mode only. Under
    ``torch.distributed`` code counts and EMA sums are summed over ranks and re-seeded codes are
    taken from rank 0, so all ranks keep identical codebooks.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        codebook_size, embed_dim, codebook_dim = config.codebook_size, config.embed_dim, config.codebook_dim
        ema, ema_decay, usage_window = config.ema, config.ema_decay, config.usage_window
        if codebook_size < 1 or embed_dim < 1:
            raise ValueError(f"codebook_size ({codebook_size}) and embed_dim ({embed_dim}) must be positive.")
        if codebook_dim is not None and codebook_dim < 1:
            raise ValueError(f"codebook_dim must be positive or None (no projection), got {codebook_dim}.")
        if usage_window < 1:
            raise ValueError(f"usage_window must be at least 1 step, got {usage_window}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay}; 0.99 is a common choice.")
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.lookup_dim = codebook_dim if codebook_dim is not None else embed_dim
        self.l2_norm = config.l2_norm
        self.beta = config.beta
        self.ema = ema
        self.ema_decay = ema_decay
        self.ema_eps = config.ema_eps
        self.dead_code_steps = config.dead_code_steps
        self.usage_window = usage_window

        if codebook_dim is None:
            self.project_in: nn.Module = nn.Identity()
            self.project_out: nn.Module = nn.Identity()
        else:
            self.project_in = nn.Conv2d(embed_dim, codebook_dim, kernel_size=1)
            self.project_out = nn.Conv2d(codebook_dim, embed_dim, kernel_size=1)

        codes = torch.empty(codebook_size, self.lookup_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("codebook", codes)
            # Cluster sizes start at one and sums at the codes, so codes = sums / sizes from the start.
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_embed_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        self.register_buffer("usage_counts", torch.zeros(usage_window, codebook_size, dtype=torch.int32))
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_since_used", torch.zeros(codebook_size, dtype=torch.long))
        # This optimizer step's counts and latest encoder outputs, until end_step() takes them.
        self.register_buffer("step_counts", torch.zeros(codebook_size, dtype=torch.long), persistent=False)
        self.recent_vectors: torch.Tensor | None = None

    def _codes(self) -> torch.Tensor:
        codes = self.codebook.float()
        return F.normalize(codes, dim=-1) if self.l2_norm else codes

    def _to_lookup_space(self, z: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim, H, W] (any dtype) -> float32 [B, H, W, lookup_dim], normalised when ``l2_norm``."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(
                f"expected latents of shape [B, {self.embed_dim}, H, W] (embed_dim={self.embed_dim}), got "
                f"{tuple(z.shape)}. Check that quant_conv maps z_channels to embed_dim."
            )
        z = self.project_in(z.float()).permute(0, 2, 3, 1)
        return F.normalize(z, dim=-1) if self.l2_norm else z

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared L2; cosine when normalised) for each row of ``flat``."""
        with torch.no_grad():
            codes = self._codes()
            if self.l2_norm:
                return (flat @ codes.t()).argmax(dim=1)
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codes.t() + codes.pow(2).sum(1)
            return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Snap encoder outputs [B, D, h, w] to their nearest codes (straight-through in training).

        Returns z_q (same shape), the codebook + commitment loss and indices [B, h, w]. In training
        mode it updates EMA codes and adds this batch's code counts to the step's statistics.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_lookup = self._to_lookup_space(z)
            flat = z_lookup.reshape(-1, self.lookup_dim)
            indices = self._nearest(flat)
            quantized = F.embedding(indices, self._codes()).view_as(z_lookup)

            loss = self.beta * F.mse_loss(z_lookup, quantized.detach())
            if not self.ema:
                loss = loss + F.mse_loss(z_lookup.detach(), quantized)
            # Straight-through: the value is exactly the code, the gradient goes to z unchanged.
            z_st = quantized.detach() + (z_lookup - z_lookup.detach())
            z_q = self.project_out(z_st.permute(0, 3, 1, 2))

            if self.training:
                self._record(flat.detach(), indices)
        return QuantizerOutput(z_q, loss, indices.view(z_lookup.shape[:-1]))

    @torch.no_grad()
    def _record(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """Training-forward bookkeeping: EMA codes, and this batch's counts and vectors for :meth:`end_step`."""
        # index_add_ rather than bincount, which reads the largest index on the host on CUDA.
        counts = torch.zeros(self.codebook_size, dtype=torch.long, device=indices.device)
        counts.index_add_(0, indices, torch.ones_like(indices))
        if self.ema:
            self._ema_update(flat, indices, _all_reduce_sum(counts.clone()))
        self.step_counts += counts
        self.recent_vectors = flat

    @torch.no_grad()
    def end_step(self) -> None:
        """Close one optimizer step: its code counts (summed over micro-batches and ranks) enter the
        usage window, and codes unused for ``dead_code_steps`` steps are re-seeded from the latest
        encoder outputs. Call it once per optimizer step, after the step's backward passes and before
        ``optimizer.step()`` (restarted codes then take the update as they always did).
        """
        counts = _all_reduce_sum(self.step_counts.clone())
        self.step_counts.zero_()
        row = torch.arange(self.usage_window, device=counts.device) == self.usage_steps % self.usage_window
        self.usage_counts.copy_(torch.where(row.unsqueeze(1), counts.to(self.usage_counts.dtype), self.usage_counts))
        self.usage_steps += 1
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        if self.dead_code_steps > 0 and self.recent_vectors is not None:
            self._restart_dead_codes(self.recent_vectors)
        self.recent_vectors = None

    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """cluster_size and embed_sum follow EMAs of assignment counts and sums; codes = sum / smoothed size.

        Sizes are Laplace-smoothed, ``(n_k + eps) / (n + K * eps) * n``, so that no code divides by zero.
        """
        embed_sum = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat)
        embed_sum = _all_reduce_sum(embed_sum)
        decay = self.ema_decay
        self.ema_cluster_size.mul_(decay).add_(counts.float(), alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(embed_sum, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.ema_eps) / (total + self.codebook_size * self.ema_eps) * total
        self.codebook.copy_(self.ema_embed_sum / smoothed.unsqueeze(1))

    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Re-seed codes unused for ``dead_code_steps`` steps with random vectors of this batch.

        A vector is drawn for every code and kept only where the code is dead, so the number of dead
        codes is never read on the host and the random draws are the same on every device.
        """
        dead = self.steps_since_used >= self.dead_code_steps
        picks = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        seeds = flat.index_select(0, picks).to(self.codebook.dtype)
        if _distributed():
            dist.broadcast(seeds, src=0)
        self.codebook.data.copy_(torch.where(dead.unsqueeze(1), seeds, self.codebook.data))
        if self.ema:
            self.ema_embed_sum.copy_(torch.where(dead.unsqueeze(1), seeds, self.ema_embed_sum))
        self.steps_since_used.masked_fill_(dead, 0)
        if self.ema:
            self.ema_cluster_size.masked_fill_(dead, 1.0)

    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices [B, H, W] for latents [B, embed_dim, H, W], without touching any statistics."""
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            z_lookup = self._to_lookup_space(z)
            return self._nearest(z_lookup.reshape(-1, self.lookup_dim)).view(z_lookup.shape[:-1])

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Quantised latents float32 [B, embed_dim, H, W] for code indices [B, H, W] (lookup + up-projection)."""
        if indices.dtype not in (torch.long, torch.int32) or indices.dim() != 3:
            raise ValueError(
                f"expected integer indices of shape [B, H, W], got {indices.dtype} {tuple(indices.shape)}."
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}) for a codebook of {self.codebook_size} codes, "
                f"got values in [{int(indices.min())}, {int(indices.max())}]."
            )
        with torch.autocast(device_type=indices.device.type, enabled=False):
            quantized = F.embedding(indices.long(), self._codes())
            return self.project_out(quantized.permute(0, 3, 1, 2))

    def window_counts(self) -> torch.Tensor:
        """Per-code hit counts summed over the last ``usage_window`` optimizer steps (rows of the window
        not yet written are zero, so the whole window is summed)."""
        return self.usage_counts.sum(0, dtype=torch.long)

    def window_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook usage and perplexity over the last ``usage_window`` optimizer steps, as 0-d tensors
        on the codebook's device (see :func:`code_statistics`)."""
        return code_statistics(self.window_counts())

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self.codebook_size}, embed_dim={self.embed_dim}, lookup_dim={self.lookup_dim}, "
            f"l2_norm={self.l2_norm}, beta={self.beta}, ema={self.ema}, dead_code_steps={self.dead_code_steps}"
        )


class GumbelQuantizer(nn.Module):
    """Taming's Gumbel-softmax quantizer (``GumbelQuantize``) at inference: a 1x1 convolution ``proj`` maps each
    latent vector [embed_dim] to logits over the ``codebook_size`` codes, and the vector becomes its most likely code.

    Taming adds Gumbel noise to the logits even in eval mode, so its encodings are random; this one takes the
    argmax of the logits, deterministically. Decoding given codes is the same in both: a lookup of
    ``codebook`` [codebook_size, embed_dim]. It exists for models imported from taming-transformers; training it
    is refused (:class:`vqgan.config.Stage1Config` refuses ``model.quantizer=gumbel``), so it has no training loss
    and no codebook statistics.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        if config.codebook_size < 1 or config.embed_dim < 1:
            raise ValueError(f"codebook_size ({config.codebook_size}) and embed_dim ({config.embed_dim}) must be "
                             f"positive.")
        if config.codebook_dim is not None or config.l2_norm or config.ema:
            raise ValueError("the gumbel quantizer has none of the codebook_dim, l2_norm and ema options; leave them "
                             "at their defaults (null, false, false).")
        self.codebook_size = config.codebook_size
        self.embed_dim = config.embed_dim
        self.proj = nn.Conv2d(config.embed_dim, config.codebook_size, kernel_size=1)
        self.codebook = nn.Parameter(torch.randn(config.codebook_size, config.embed_dim))

    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code indices [B, H, W] for latents [B, embed_dim, H, W]: the most likely code of each vector (the name is
        the quantizer interface :class:`vqgan.model.VQGAN` calls)."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected latents of shape [B, {self.embed_dim}, H, W] (embed_dim={self.embed_dim}), "
                             f"got {tuple(z.shape)}.")
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            return self.proj(z.float()).argmax(dim=1)

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Quantised latents float32 [B, embed_dim, H, W] for code indices [B, H, W]."""
        if indices.dtype not in (torch.long, torch.int32) or indices.dim() != 3:
            raise ValueError(f"expected integer indices of shape [B, H, W], got {indices.dtype} "
                             f"{tuple(indices.shape)}.")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size}) for a codebook of {self.codebook_size} "
                             f"codes, got values in [{int(indices.min())}, {int(indices.max())}].")
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return F.embedding(indices.long(), self.codebook.float()).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """The most likely codes of latents [B, embed_dim, h, w]: (their vectors, a zero loss, indices [B, h, w]).
        Raises in training mode: this quantizer is not trained here."""
        if self.training:
            raise RuntimeError("the gumbel quantizer is for models imported from taming-transformers; training it is "
                               "not supported. Call .eval() to encode with it, or train a model.quantizer=nearest.")
        indices = self.nearest_indices(z)
        return QuantizerOutput(self.embed_indices(indices), z.new_zeros((), dtype=torch.float32), indices)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, embed_dim={self.embed_dim}, argmax of proj (no Gumbel noise)"
