"""The training steps read nothing on the host between log steps, on every device, and undo a non-finite step
on the device: a skipped step changes nothing (weights, optimizer state, codebook, BatchNorm and LeCam buffers,
the weight EMA).

On the CPU a host read costs nothing, so the proof here is that no Python-level read happens at all:
``.item()``, ``.tolist()``, ``float()``, ``int()`` and ``bool()`` of a tensor raise during the steps.
test_cuda.py proves the same on a GPU with ``torch.cuda.set_sync_debug_mode("error")``, which also
catches reads inside PyTorch's own operators.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_DISC, tiny_vqgan
from torch import nn

from transformer import VQGANPrior
from transformer.prior import PriorConfig
from transformer.training import stage2_step
from utils.logging import TrainingLog, as_floats, read_metrics
from utils.loop import BadStepTracker, TrainingStopped
from utils.training import ModelEMA, NonFiniteCheck, TensorSnapshot, optimizer_step
from vqgan import Discriminator, LossConfig, VQGANLoss
from vqgan.quantizer import code_statistics
from vqgan.training import stage1_step

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every Python-level read of a tensor's value raises inside the block."""
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            def refuse(*args, name=name, **kwargs):
                raise AssertionError(f"Tensor.{name} read a value on the host inside a training step")
            patch.setattr(torch.Tensor, name, refuse)
        yield


def adam(module: nn.Module, fused: bool = True) -> torch.optim.AdamW:
    return torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.5, 0.9), fused=fused)


class Stage1:
    """Tiny stage-1 models (EMA codes, LeCam, weight EMA, GAN from step 0) with AdamW, from seed 0."""

    def __init__(self, dead_code_steps: int, fused: bool = True) -> None:
        torch.manual_seed(0)
        self.model = tiny_vqgan(ema=True, dead_code_steps=dead_code_steps).train()
        self.disc = Discriminator(3, TINY_DISC).train()
        self.loss = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_start=0, lecam_weight=0.1)).train()
        self.opt_ae, self.opt_disc = adam(self.model, fused), adam(self.disc, fused)
        self.ema = ModelEMA(self.model, 0.9)

    def step(self, images: torch.Tensor, step: int) -> tuple[dict[str, torch.Tensor], NonFiniteCheck]:
        return stage1_step(self.model, self.disc, self.loss, self.opt_ae, self.opt_disc, [images[:2], images[2:]],
                           step, grad_clip=1.0, ema=self.ema)

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor a step may change: weights, buffers, optimizer moments and steps, the EMA, LeCam."""
        state = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        state |= {f"disc.{k}": v for k, v in self.disc.state_dict().items()}
        state |= {f"loss.{k}": v for k, v in self.loss.state_dict().items()}
        state |= {f"ema.{k}": v for k, v in self.ema.state_dict().items()}
        for name, opt in (("opt_ae", self.opt_ae), ("opt_disc", self.opt_disc)):
            for i, param_state in enumerate(opt.state.values()):
                state |= {f"{name}.{i}.{k}": v for k, v in param_state.items()}
        return {k: v.detach().clone() for k, v in state.items()}


def batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1 for _ in range(count)]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_stage1_step_reads_nothing_on_the_host_and_logs_0d_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    setup = Stage1(dead_code_steps=1)
    before = setup.state()
    for step, images in enumerate(batches(2)):
        with no_host_reads(monkeypatch):
            logs, check = setup.step(images, step)
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())
        assert check.cause() is None and all(math.isfinite(v) for v in as_floats(logs).values())
    assert not torch.equal(before["model.decoder.conv_out.weight"], setup.model.decoder.conv_out.weight)


@pytest.mark.parametrize("fused", [True, False], ids=["fused AdamW", "multi-tensor AdamW"])
def test_stage1_step_undoes_a_nonfinite_step_on_the_device(monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
    setup = Stage1(dead_code_steps=1, fused=fused)  # dead-code restarts too (drawn for every code, kept where dead)
    # The multi-tensor AdamW reads its own step count (a CPU tensor) in every step, skipped or not.
    guard = (lambda: no_host_reads(monkeypatch)) if fused else contextlib.nullcontext
    good = batches(2)
    setup.step(good[0], 0)
    before = setup.state()
    with guard():
        _, check = setup.step(torch.full_like(good[1], math.nan), 1)
    assert check.cause() == "rec_loss"
    assert_same_state(before, setup.state())
    with guard():
        logs, check = setup.step(good[1], 1)
    assert check.cause() is None and math.isfinite(float(logs["rec_loss"]))
    assert not torch.equal(before["model.decoder.conv_out.weight"], setup.model.decoder.conv_out.weight)


def test_a_run_with_skipped_steps_equals_the_run_without_them() -> None:
    """Skipped first and middle steps leave no trace: not in the weights, nor in Adam's moments and step count
    (a skipped first step leaves the optimizer state as a fresh one starts)."""
    good, nan = batches(2), torch.full((4, 3, 16, 16), math.nan)
    plain, skipping = Stage1(dead_code_steps=0), Stage1(dead_code_steps=0)
    for step, images in enumerate(good):
        plain.step(images, step)
    skipped = [skipping.step(images, step)[1].cause() for step, images in enumerate([nan, good[0], nan,
                                                                                                 good[1]])]
    assert skipped == ["rec_loss", None, "rec_loss", None]
    assert_same_state(plain.state(), skipping.state())


class NaNLoss(nn.Module):
    """The prior's loss times NaN: a step whose loss and gradients are not finite."""

    def __init__(self, prior: VQGANPrior) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, indices: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.prior(indices, labels) * math.nan


def test_stage2_step_without_host_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    prior = VQGANPrior(tiny_vqgan(), PriorConfig(n_layer=1, n_head=2, n_embd=16, condition="none")).train()
    opt, ema = adam(prior.gpt), ModelEMA(prior.gpt, 0.9)
    indices = torch.randint(16, (2, 64), generator=torch.Generator().manual_seed(0))
    with no_host_reads(monkeypatch):
        logs, check = stage2_step(prior, opt, [(indices, None)], grad_clip=1.0, ema=ema)
    assert check.cause() is None
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values())
    assert all(math.isfinite(v) for v in as_floats(logs).values())

    def state() -> list[torch.Tensor]:
        return [v.clone() for v in [*prior.gpt.state_dict().values(), *ema.state_dict().values(),
                                    *(v for param_state in opt.state.values() for v in param_state.values())]]

    before = state()
    with no_host_reads(monkeypatch):
        _, check = stage2_step(prior, opt, [(indices, None)], grad_clip=1.0, ema=ema, train_prior=NaNLoss(prior))
    assert check.cause() == "loss"
    assert all(torch.equal(a, b) for a, b in zip(before, state()))


def test_skipping_helpers_act_only_where_the_flag_is_set() -> None:
    bad, good = torch.tensor(True), torch.tensor(False)
    check = NonFiniteCheck({"a": torch.tensor(1.0), "b": torch.tensor(math.inf), "c": torch.tensor(math.nan)})
    assert check.cause() == "b" and bool(check.found)
    assert NonFiniteCheck({"a": torch.tensor(1.0)}).cause() is None

    buffer = torch.zeros(3)
    snapshot = TensorSnapshot([buffer])
    buffer.add_(1)
    snapshot.restore(where=good)
    assert buffer.tolist() == [1.0] * 3
    snapshot.restore(where=bad)
    assert buffer.tolist() == [0.0] * 3

    plain = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=0.1)
    plain(torch.ones(1, 2)).sum().backward()
    weight = plain.weight.detach().clone()
    optimizer_step(optimizer, bad)  # a first step: the state it created is zeroed, as a fresh one starts
    assert torch.equal(plain.weight, weight)
    assert all(not t.any() for state in optimizer.state.values() for t in state.values())
    optimizer_step(optimizer, good)
    assert not torch.equal(plain.weight, weight)
    assert all(float(state["step"]) == 1 for state in optimizer.state.values())

    ema = ModelEMA(plain, 0.5)
    start = ema.module.weight.detach().clone()
    plain.weight.data.add_(1)
    ema.update(plain, bad)
    assert torch.equal(ema.module.weight, start)
    ema.update(plain, good)
    assert torch.allclose(ema.module.weight, start + 0.5)


def test_code_statistics_read_nothing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = [torch.tensor([5, 0, 3, 0, 0, 1]), torch.zeros(4, dtype=torch.long), torch.tensor([2, 2])]
    with no_host_reads(monkeypatch):
        statistics = [code_statistics(c) for c in counts]
    probs = torch.tensor([5, 3, 1], dtype=torch.float64) / 9
    expected = [(0.5, float((-(probs * probs.log()).sum()).exp())), (0.0, 0.0), (1.0, 2.0)]
    for (usage, perplexity), values in zip(statistics, expected):
        assert (float(usage), float(perplexity)) == pytest.approx(values, rel=1e-12)


def checks(*values: float) -> list[NonFiniteCheck]:
    return [NonFiniteCheck({"loss": torch.tensor(value)}) for value in values]


def test_training_log_accounts_for_device_checks_at_log_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys) -> None:
    tracker = BadStepTracker(max_bad=3, last_checkpoint=tmp_path / "last.pt")
    with TrainingLog(tmp_path, ["lr", "loss", "items_per_s", "bad_steps"], start_step=0, max_steps=8, log_every=4,
                     items_per_step=4, desc="test", postfix_keys=("loss",), is_main=True, bad_steps=tracker) as log:
        for step, check in enumerate(checks(1.0, math.nan, 3.0, 4.0, 5.0, math.nan, math.nan, 8.0), start=1):
            if step % 4:
                with no_host_reads(monkeypatch):
                    log.step(step, {"loss": torch.tensor(float(step))}, check, lr=0.1)
                assert tracker.total == (1 if step > 4 else 0)  # learnt only at log steps
            else:
                log.step(step, {"loss": torch.tensor(float(step))}, check, lr=0.1)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows["step"] == [4, 8] and rows["loss"] == [4.0, 8.0] and rows["bad_steps"] == [1.0, 3.0]
    assert "step 2: non-finite loss" in capsys.readouterr().out


def test_consecutive_bad_device_checks_stop_training_at_the_next_log_step(tmp_path: Path) -> None:
    tracker = BadStepTracker(max_bad=2, last_checkpoint=tmp_path / "last.pt")
    with TrainingLog(tmp_path, ["loss", "bad_steps"], start_step=0, max_steps=10, log_every=5, items_per_step=1,
                     desc="test", postfix_keys=(), is_main=True, bad_steps=tracker) as log:
        for step, check in enumerate(checks(1.0, math.nan, math.nan, 4.0), start=1):
            log.step(step, {"loss": torch.tensor(1.0)}, check, lr=0.1)
        with pytest.raises(TrainingStopped, match=r"2 consecutive steps \(2-3\) had a non-finite loss"):
            log.step(5, {"loss": torch.tensor(1.0)}, checks(1.0)[0], lr=0.1)
