"""The CUDA paths on one GPU: bf16 autocast, compiled steps, fused AdamW, channels_last, NCCL, no host sync.

Skipped without CUDA. ``python -m benchmarks.gpu_check`` runs this file (``pytest -m cuda``) together with
short training runs and the CUDA speed figures.

Tolerances: compiled against eager and channels_last against the default layout are compared in fp32 with
TF32 off; the generated kernels sum in other orders, so values agree to a relative 1e-4 after one step and
1e-2 after three (Adam turns tiny gradient differences into differences of up to the learning rate; on a
CPU the compiled step is within 1e-3 after three steps).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import TINY_DISC, tiny_vqgan
from tiny_training import REPO, STAGE1, read_rows, script_env, write_config
from torch.nn.parallel import DistributedDataParallel as DDP

from transformer import VQGANPrior
from transformer.prior import PriorConfig
from transformer.training import stage2_step
from utils.logging import TrainingLog, as_floats
from utils.loop import BadStepTracker
from utils.training import ModelEMA, NonFiniteCheck, compile_module, make_adam
from vqgan import Discriminator, LossConfig, VQGANLoss
from vqgan.quantizer import QuantizerConfig, VectorQuantizer
from vqgan.training import stage1_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
LOSS_KEYS = ("rec_loss", "codebook_loss", "g_loss", "d_weight", "total", "d_loss", "logits_real", "logits_fake")


@pytest.fixture
def exact_fp32() -> Iterator[None]:
    """fp32 matmuls and convolutions without TF32 for the duration of a test."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class Stage1:
    """Tiny stage-1 models on the GPU (GAN from ``disc_start``, LeCam), AdamW fused or not, from seed 0."""

    def __init__(self, *, fused: bool = True, channels_last: bool = False, disc_start: int = 0,
                 dead_code_steps: int = 0, ema: bool = False) -> None:
        torch.manual_seed(0)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = tiny_vqgan(ema=True, dead_code_steps=dead_code_steps).to(CUDA, memory_format=self.memory_format)
        self.disc = Discriminator(3, TINY_DISC).to(CUDA, memory_format=self.memory_format)
        self.loss = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_start=disc_start, lecam_weight=0.1)).to(CUDA)
        self.opt_ae = self._adam(self.model, fused)
        self.opt_disc = self._adam(self.disc, fused)
        self.ema = ModelEMA(self.model, 0.9) if ema else None

    @staticmethod
    def _adam(module: torch.nn.Module, fused: bool) -> torch.optim.AdamW:
        if fused:
            return make_adam(module.parameters(), 1e-3, (0.5, 0.9), 0.01, CUDA)
        return torch.optim.AdamW(module.parameters(), lr=1e-3, betas=(0.5, 0.9), weight_decay=0.01)

    def step(self, images: list[torch.Tensor], step: int, **options) -> tuple[dict, NonFiniteCheck]:
        batches = [x.to(CUDA, memory_format=self.memory_format) for x in images]
        return stage1_step(self.model, self.disc, self.loss, self.opt_ae, self.opt_disc, batches, step,
                           grad_clip=1.0, ema=self.ema, **options)


def images(count: int, batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(batch, 3, 16, 16, generator=generator) * 2 - 1 for _ in range(count)]


def assert_close_logs(a: dict, b: dict, rel: float) -> None:
    a, b = as_floats(a), as_floats(b)
    for key in LOSS_KEYS:
        if key in a:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), f"{key}: {a[key]} vs {b[key]}"


def assert_close_grads(a: torch.nn.Module, b: torch.nn.Module, rel: float) -> None:
    """Gradients agree relative to the largest gradient norm (some are rounding noise around zero)."""
    grads_a = {n: p.grad for n, p in a.named_parameters() if p.grad is not None}
    grads_b = {n: p.grad for n, p in b.named_parameters() if p.grad is not None}
    assert grads_a.keys() == grads_b.keys() and grads_a
    scale = max(g.norm().item() for g in grads_b.values())
    for name in grads_a:
        error = (grads_a[name] - grads_b[name]).norm().item()
        assert error <= rel * scale, f"{name}: |difference| {error:.3g}, largest |gradient| {scale:.3g}"


def test_quantizer_runs_in_fp32_under_bf16_autocast_and_picks_the_fp32_codes() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=64, embed_dim=8, codebook_dim=4, l2_norm=True))
    quantizer = quantizer.to(CUDA).eval()
    z = torch.randn(4, 8, 8, 8, device=CUDA).bfloat16()  # what quant_conv hands over under autocast
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = quantizer(z)
    exact = quantizer(z.float())
    assert mixed.z_q.dtype == mixed.loss.dtype == torch.float32
    assert torch.equal(mixed.indices, exact.indices)
    torch.testing.assert_close(mixed.z_q, exact.z_q)

    model = tiny_vqgan().to(CUDA).eval()
    x = images(1)[0].to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        latents = model.quant_conv(model.encoder(x))
        indices = model.encode_to_indices(x)
    assert latents.dtype == torch.bfloat16
    assert torch.equal(indices, model.quantizer.nearest_indices(latents.float()))


def test_compiled_stage1_step_gives_the_eager_losses(exact_fp32: None) -> None:
    eager, compiled = Stage1(disc_start=1), Stage1(disc_start=1)
    train_model, train_disc = compile_module(compiled.model), compile_module(compiled.disc)
    for step, batch in enumerate(images(3)):
        expected, _ = eager.step([batch], step)
        logs, check = compiled.step([batch], step, train_model=train_model, train_disc=train_disc)
        assert check.cause() is None
        assert_close_logs(logs, expected, rel=1e-4 if step == 0 else 1e-2)
        if step == 0:
            assert_close_grads(compiled.model, eager.model, rel=1e-4)


def test_fused_adamw_and_channels_last_give_the_plain_step(exact_fp32: None) -> None:
    plain, fast = Stage1(fused=False), Stage1(fused=True, channels_last=True)
    batch = images(1)
    assert_close_logs(fast.step(batch, 0)[0], plain.step(batch, 0)[0], rel=1e-4)
    assert_close_grads(fast.model, plain.model, rel=1e-4)
    assert_close_grads(fast.disc, plain.disc, rel=1e-4)
    assert fast.model.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    # The update itself: fused and plain AdamW from the same weights and gradients.
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(6, 4)).to(CUDA)
    twin = copy.deepcopy(module)
    optimizers = Stage1._adam(module, fused=True), Stage1._adam(twin, fused=False)
    for _ in range(3):
        for p, q in zip(module.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    for p, q in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_one_process_nccl_ddp_step(tmp_path: Path) -> None:
    """stage1_step through DDP wrappers with the quantizer all-reducing over a one-rank NCCL group."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        setup = Stage1(dead_code_steps=1)
        train_model = DDP(setup.model, device_ids=[CUDA.index or 0], broadcast_buffers=False)
        train_disc = DDP(setup.disc, device_ids=[CUDA.index or 0])
        for step, batch in enumerate(images(3)):
            logs, check = setup.step([batch[:2], batch[2:]], step, train_model=train_model, train_disc=train_disc)
        assert check.cause() is None and math.isfinite(float(logs["rec_loss"]))
        assert int(setup.model.quantizer.usage_steps) == 3
    finally:
        dist.destroy_process_group()


def test_train_vqgan_under_torchrun_on_cuda(tmp_path: Path) -> None:
    config = write_config(tmp_path, "tiny", STAGE1)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(REPO / "train_vqgan.py"), "--config", str(config), "--run-dir", str(run), "train.device=cuda",
               "train.compile=false"]
    result = subprocess.run(command, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "cuda:0" in result.stdout
    rows = read_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(math.isfinite(float(r["rec_loss"])) and float(r["bad_steps"]) == 0 for r in rows)


def test_stage1_steps_between_log_steps_do_not_synchronise(tmp_path: Path) -> None:
    """bf16, channels_last, fused AdamW, weight EMA, GAN + LeCam, dead-code restarts, two micro-batches, and a
    non-finite step: nothing waits for the GPU until the log step reads the values."""
    setup = Stage1(channels_last=True, dead_code_steps=1, ema=True)
    batches = [[x.to(CUDA)[:2], x.to(CUDA)[2:]] for x in images(6)]
    batches[4] = [torch.full_like(x, math.nan) for x in batches[4]]
    tracker = BadStepTracker(max_bad=3, last_checkpoint=tmp_path / "last.pt")
    with TrainingLog(tmp_path, ["rec_loss", "usage", "bad_steps"], start_step=0, max_steps=6, log_every=6,
                     items_per_step=4, desc="test", postfix_keys=(), is_main=True, bad_steps=tracker) as log:
        for step in range(2):  # warm-up: optimizer state, cuDNN plans
            log.step(step + 1, *setup.step(batches[step], step, amp_dtype=torch.bfloat16), lr=1e-3)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(2, 5):
                log.step(step + 1, *setup.step(batches[step], step, amp_dtype=torch.bfloat16), lr=1e-3)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert tracker.total == 0  # not read yet
        logs, check = setup.step(batches[5], 5, amp_dtype=torch.bfloat16)
        log.step(6, logs, check, lr=1e-3)
    assert tracker.total == 1 and tracker.consecutive == 0
    assert all(math.isfinite(v) for v in as_floats(logs).values())


def test_stage2_steps_do_not_synchronise() -> None:
    torch.manual_seed(0)
    config = PriorConfig(n_layer=2, n_head=2, n_embd=32, condition="class", condition_dropout=0.1, pkeep=0.9)
    prior = VQGANPrior(tiny_vqgan(), config, num_classes=10).to(CUDA).train()
    optimizer = make_adam(prior.param_groups(0.01), 1e-3, (0.9, 0.95), 0.0, CUDA)
    ema = ModelEMA(prior.gpt, 0.9)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(16, (4, 64), generator=generator).to(CUDA),
                torch.randint(10, (4,), generator=generator).to(CUDA)) for _ in range(5)]
    for batch in batches[:2]:
        stage2_step(prior, optimizer, [batch], grad_clip=1.0, amp_dtype=torch.bfloat16, ema=ema)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            logs, check = stage2_step(prior, optimizer, [batch], grad_clip=1.0, amp_dtype=torch.bfloat16, ema=ema)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert check.cause() is None
    assert all(math.isfinite(v) for v in as_floats(logs).values())
