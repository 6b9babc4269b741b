"""Fast paths give the same results as their straightforward versions; the benchmark script runs.

Covered here: the discriminator step on the reused reconstruction (no second autoencoder forward),
the fused adaptive-weight backward on a real VQGAN with LPIPS and a PatchGAN, the training step
(:func:`vqgan.training.stage1_step`) against the textbook step the benchmark times it against, and
KV-cache sampling under guidance and filtering (plain cache-vs-recompute sampling is in
test_sampling.py).
"""

import copy
import json
import os

import pytest
import torch
from conftest import tiny_models

from benchmarks import run as bench_run
from benchmarks.reference import reference_generator_backward
from benchmarks.runtime import reference
from benchmarks.stage1 import build_setup, straightforward_step, training_step
from benchmarks.taming_compare import top_k_top_p_filtering
from benchmarks.timing import convolution_share
from transformer import GPT, filter_logits, sample_tokens
from utils.config import load_config
from utils.logging import as_floats
from vqgan.config import Stage1Config
from vqgan.training import stage1_step

TINY_OVERRIDES = ["data.image_size=16", "model.ch=8", "model.ch_mult=[1,2]", "model.attn_resolutions=[8]",
                  "model.z_channels=4", "model.embed_dim=4", "model.codebook_size=16", "model.codebook_dim=null",
                  "model.dead_code_steps=0", "disc.ndf=8", "disc.n_layers=2"]


def images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal up to float rounding, measured against the largest gradient norm of the module.

    (Biases of convolutions followed by a per-channel GroupNorm have gradients that are zero
    analytically, so their rounding noise cannot be compared with their own size.)
    """
    assert a.keys() == b.keys() and a
    scale = max(g.norm().item() for g in b.values())
    for name in a:
        error = (a[name] - b[name]).norm().item()
        assert error <= 1e-5 * scale, f"{name}: |difference| {error:.3g}, largest |gradient| {scale:.3g}"


def test_discriminator_step_on_the_reused_reconstruction_equals_a_second_forward() -> None:
    model, disc, loss = tiny_models(lecam_weight=0.1)
    x = images()
    # The quantizer's EMA / dead-code / usage buffers change during a training-mode forward, so the
    # second forward of the straightforward step is taken from the state the first one started in.
    before_step = copy.deepcopy(model)
    out = model(x)
    loss.generator_backward(x, out.reconstruction, out.codebook_loss, disc, model.last_layer_weight, step=0)
    second = before_step(x).reconstruction
    assert torch.equal(second, out.reconstruction)

    disc_second, loss_second = copy.deepcopy(disc), copy.deepcopy(loss)
    reused_loss, reused_logs = loss.discriminator_loss(x, out.reconstruction.detach(), disc)
    reused_loss.backward()
    second_loss, second_logs = loss_second.discriminator_loss(x, second.detach(), disc_second)
    second_loss.backward()
    assert as_floats(reused_logs) == as_floats(second_logs)
    assert_same_grads(grads(disc), grads(disc_second))
    for a, b in zip(disc.buffers(), disc_second.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [{}, {"disc_loss": "vanilla", "rec_loss": "l2", "adaptive_weight_max": 0.5}])
def test_fused_adaptive_weight_backward_matches_reference_on_a_real_vqgan(lpips_files, options: dict) -> None:
    model, disc, loss = tiny_models(lpips_files, **options)
    reference_model = copy.deepcopy(model)
    x = images()
    logs = {}
    out = model(x)
    logs["fused"] = as_floats(loss.generator_backward(x, out.reconstruction, out.codebook_loss, disc,
                                                      model.last_layer_weight, step=0))
    out = reference_model(x)
    logs["reference"] = reference_generator_backward(loss, x, out.reconstruction, out.codebook_loss, disc,
                                                     reference_model.last_layer_weight, step=0)
    assert_same_grads(grads(model), grads(reference_model))
    assert logs["fused"] == pytest.approx(logs["reference"], rel=1e-5)
    assert logs["fused"]["p_loss"] > 0 and logs["fused"]["d_weight"] > 0
    assert all(p.grad is None for p in disc.parameters())


def tiny_stage1_config(lpips_files) -> Stage1Config:
    return load_config(Stage1Config, "configs/quickstart.yaml", TINY_OVERRIDES + [
        "loss.perceptual_weight=1.0", "loss.disc_start=0", f"loss.lpips_vgg_path={lpips_files.vgg}",
        f"loss.lpips_heads_path={lpips_files.heads}"])


def test_training_step_equals_the_textbook_step_the_benchmark_times(lpips_files) -> None:
    cfg = tiny_stage1_config(lpips_files)
    fast = build_setup(cfg, 2, reference(torch.device("cpu")))
    slow = build_setup(cfg, 2, reference(torch.device("cpu")))
    fast_logs = as_floats(training_step(fast, 0))
    slow_logs = as_floats(straightforward_step(slow, 0))
    assert all(isinstance(v, float) for v in slow_logs.values())
    assert {k: v for k, v in fast_logs.items() if k in slow_logs} == pytest.approx(slow_logs, rel=1e-5)
    assert fast_logs["gan_factor"] > 0 and fast_logs["p_loss"] > 0
    assert_same_grads(grads(fast.model), grads(slow.model))
    assert_same_grads(grads(fast.disc), grads(slow.disc))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_kv_cache_sampling_equals_recompute_with_guidance_and_filters(positions: str) -> None:
    torch.manual_seed(0)
    gpt = GPT(20, 24, n_layer=2, n_head=2, n_embd=32, dropout=0.0, positions=positions)
    cond = torch.randint(20, (3, 2), generator=torch.Generator().manual_seed(2))
    uncond = torch.full_like(cond, 19)
    options = dict(temperature=0.8, top_k=10, top_p=0.9, cfg_scale=2.5, uncond_prefix=uncond)
    cached, recomputed = (sample_tokens(gpt, cond, 22, generator=torch.Generator().manual_seed(3), use_cache=use_cache,
                                        **options) for use_cache in (True, False))
    assert torch.equal(cached, recomputed)


def test_benchmark_script_writes_the_expected_json(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(bench_run, "reference_available", lambda: False)
    threads = torch.get_num_threads()
    try:
        report = bench_run.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "speed-up" in captured.out and "taming-transformers skipped" in captured.err
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == json.loads(json.dumps(report))
    assert set(written) == {"meta", "results", "targets"}
    assert written["meta"]["mode"] == "tiny" and written["meta"]["threads"] == 1
    keys = {result["key"] for result in written["results"]}
    sections = {key.split("/")[0] for key in keys}
    assert sections == {"stage1_train", "stage1_compiled", "encode", "decode", "stage2_train", "sampling"}
    assert sum(key.startswith("stage1_train/") for key in keys) == 4
    for result in written["results"]:
        for figures in result["variants"].values():
            assert figures["per_s"] > 0 and figures["peak_mb"] > 0 and len(figures["seconds"]) >= 1
        if result["key"].startswith("stage1_train/"):
            assert set(result["variants"]) == {"optimized", "straightforward"} and result["speedup"] > 0
            assert all(v["gflop_per_item"] > 0 for v in result["variants"].values())
    sampling = next(r for r in written["results"] if r["key"].startswith("sampling/"))
    assert set(sampling["variants"]) == {"KV cache", "recompute"} and sampling["same_tokens"] is True
    compiled = next(r for r in written["results"] if r["key"].startswith("stage1_compiled/"))
    assert set(compiled["variants"]) == {"compiled", "eager"} and compiled["compile_s"] > 0
    assert [t["need"] for t in written["targets"]] == [1.25, 10.0, 1.0]
    assert not any(t["at_target_size"] for t in written["targets"])


def test_reference_stand_in_filters_like_filter_logits() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4))
    for top_k, top_p in ((5, 1.0), (50, 0.8), (10, 0.6), (1, 1.0)):
        expected = filter_logits(logits, top_k=top_k, top_p=top_p if top_p < 1 else None).isfinite()
        assert torch.equal(top_k_top_p_filtering(logits, top_k=top_k, top_p=top_p).isfinite(), expected)


def test_side_by_side_with_the_reference_runs(tmp_path, capsys) -> None:
    pytest.importorskip("taming", reason="the reference implementation is not installed")
    threads = torch.get_num_threads()
    try:
        report = bench_run.main(["--device", "cpu", "--tiny", "--threads", "1", "--out", str(tmp_path / "r.json")])
    finally:
        torch.set_num_threads(threads)
    results = {r["key"]: r for r in report["results"] if r["key"].startswith("vs_taming/")}
    assert {key.split("/")[1] for key in results} == {"stage1", "sampling", "stage2_train"}
    for result in results.values():
        assert set(result["variants"]) == {"this repository", "taming"} and result["speedup"] > 0
    assert report["meta"]["vs_taming"]["sampling_ceiling_tok_per_s"] > 0
    assert sum("over taming" in t["name"] for t in report["targets"]) == 4
    assert any("convolution ceiling" in t["name"] and "its convolutions take" in t["name"] for t in report["targets"])
    for side in results["vs_taming/stage1/fashion_mnist_small/fp32"]["convolutions"].values():
        assert 0 < side["convolution_time_share"] <= 1 and side["convolution_gflop_per_s"] > 0


def test_convolution_share_counts_the_convolutions_of_a_call() -> None:
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    share = convolution_share(lambda: torch.relu(conv(x)).sum().backward())
    assert share["convolution_gflop"] * 1e9 == 3 * 2 * (2 * 8 * 16 * 16) * 4 * 9  # forward, input and weight grads
    assert 0 < share["convolution_time_share"] < 1 and share["convolution_gflop_per_s"] > 0


def test_stage1_step_through_torch_compile_gives_the_eager_losses() -> None:
    """The models wrapped as ``train.compile=true`` wraps them; the ``aot_eager`` backend traces them with
    dynamo and AOTAutograd as inductor would, without generating code, so this runs quickly on a CPU."""
    batches = [images(4) for _ in range(2)]
    logs = {}
    for compiled in (False, True):
        model, disc, loss = tiny_models()
        opt_ae, opt_disc = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (model, disc))
        wrap = (lambda m: torch.compile(m, backend="aot_eager")) if compiled else (lambda m: m)
        train_model, train_disc = wrap(model), wrap(disc)
        logs[compiled] = [as_floats(stage1_step(model, disc, loss, opt_ae, opt_disc, [x], step, grad_clip=1.0,
                                                train_model=train_model, train_disc=train_disc)[0])
                          for step, x in enumerate(batches)]
    for eager, compiled in zip(logs[False], logs[True]):
        assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-6)  # decompositions round differently


def test_compile_benchmark_uses_an_empty_compile_cache_and_restores_the_setting(monkeypatch) -> None:
    from benchmarks.stage1 import fresh_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    with fresh_compile_cache():
        inside = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert inside != "/somewhere/else" and os.listdir(inside) == []
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else" and not os.path.exists(inside)
