"""What a prior's sequence starts with: the condition, as tokens of its own vocabulary.

Every kind of condition turns its input into ``num_tokens`` ids in ``0 .. vocab_size - 1``
(:meth:`Condition.tokens`); :class:`transformer.prior.VQGANPrior` places them before the image's codes.

* ``none``: no input; the sequence starts with one start token (``num_tokens`` 1, ``vocab_size`` 0).
* ``class``: class ids [B], one token each.
* ``segmentation``, ``depth``, ``lowres``: a condition map [B, C, H, W] (label maps [B, 1, H, W] for
  segmentation), tokenized by a frozen stage-1 model (:class:`vqgan.VQGAN`, a segmentation tokenizer for
  label maps), whose codes in raster order are the tokens (taming's ``cond_stage_model``). The image
  tokenizer itself can serve where the map has the image's shape (a low-res copy upsampled back).
* ``coord``: a coordinate map [B, 1, H, W] holding each pixel's raster position in the full image in
  [0, 1) (taming's ``CoordStage``): averaged over each token's pixels, scaled by ``levels`` and rounded
  (ids ``0 .. levels``), so a window cropped from a larger image knows where it sits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ConditionKind = Literal["none", "class", "segmentation", "depth", "lowres", "coord"]
MAP_KINDS = ("segmentation", "depth", "lowres")  # tokenized by a stage-1 model


class Condition(nn.Module, ABC):
    """Base of the condition kinds: ``num_tokens`` tokens per sequence from a vocabulary of ``vocab_size``."""

    kind: ConditionKind
    num_tokens: int
    vocab_size: int
    spatial = False  # tokens laid out as a grid over the image, cropped with the codes by a sliding window

    @abstractmethod
    def tokens(self, condition: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Token ids [B, num_tokens] in ``0 .. vocab_size - 1`` for the condition inputs (None: no tokens)."""


class NoCondition(Condition):
    """An unconditional prior: only the start token precedes the codes."""

    kind = "none"
    num_tokens = 1
    vocab_size = 0

    def tokens(self, condition: torch.Tensor | None, batch_size: int) -> None:
        if condition is not None:
            raise ValueError("this prior is unconditional (transformer.condition=none) and takes no condition; "
                             "drop it, or train a conditional prior.")
        return None


class ClassCondition(Condition):
    """One token per sequence: the class id."""

    kind = "class"
    num_tokens = 1

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError("a class-conditional prior needs num_classes >= 1; set it from the dataset or use "
                             "another condition (transformer.condition=none).")
        self.vocab_size = num_classes

    def tokens(self, condition: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if condition is None:
            raise ValueError(f"this prior is class-conditional; pass a class id in 0..{self.vocab_size - 1} "
                             "for every sequence.")
        return condition.long().view(batch_size, 1)


class MapCondition(Condition):
    """A condition map tokenized by a frozen stage-1 model: its codes in raster order."""

    spatial = True

    def __init__(self, kind: ConditionKind, tokenizer: nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        h, w = tokenizer.latent_size
        self.num_tokens = h * w
        self.vocab_size = int(tokenizer.codebook_size)

    def train(self, mode: bool = True) -> MapCondition:
        super().train(mode)
        self.tokenizer.eval()
        return self

    @torch.no_grad()
    def tokens(self, condition: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if condition is None:
            raise ValueError(f"this prior is conditioned on {self.kind} maps; pass one map per sequence.")
        return self.tokenizer.encode_to_indices(condition).flatten(1)


class CoordCondition(Condition):
    """Raster positions averaged over each token's ``factor`` x ``factor`` pixels, times ``levels``, rounded to
    the nearest id in ``0 .. levels`` (taming's ``CoordStage`` rule, so its coordinate priors convert)."""

    kind = "coord"
    spatial = True

    def __init__(self, levels: int, latent_size: tuple[int, int], factor: int) -> None:
        super().__init__()
        self.levels = levels
        self.vocab_size = levels + 1
        self.latent_size = latent_size
        self.factor = factor
        self.num_tokens = latent_size[0] * latent_size[1]

    @torch.no_grad()
    def tokens(self, condition: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if condition is None:
            raise ValueError("this prior is conditioned on coordinates; pass a coordinate map per sequence.")
        cells = F.avg_pool2d(condition.float(), self.factor).clamp(0.0, 1.0)
        return (cells * self.levels).round().long().flatten(1)


def build_condition(kind: ConditionKind, *, num_classes: int = 0, tokenizer: nn.Module | None = None,
                    coord_levels: int = 0, latent_size: tuple[int, int] = (1, 1), factor: int = 1) -> Condition:
    """The condition of ``kind``: ``num_classes`` for class, the stage-1 ``tokenizer`` for map kinds, the number of
    ``coord_levels`` and the image's token grid (``latent_size``, ``factor`` pixels per token) for coord."""
    if kind == "none":
        return NoCondition()
    if kind == "class":
        return ClassCondition(num_classes)
    if kind in MAP_KINDS:
        if tokenizer is None:
            raise ValueError(f"a {kind}-conditional prior needs the stage-1 model that tokenizes its {kind} maps "
                             f"(train_transformer.py --cond-vqgan COND.pt).")
        return MapCondition(kind, tokenizer)
    if kind == "coord":
        return CoordCondition(coord_levels, latent_size, factor)
    raise ValueError(f"unknown condition {kind!r}; choose one of none, class, {', '.join(MAP_KINDS)}, coord.")
