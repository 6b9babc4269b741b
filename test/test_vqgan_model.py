"""Tests of the stage-1 networks: layers, encoder/decoder geometry and size, VQGAN API, discriminator."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vqgan

from utils.checkpoint import CheckpointError
from vqgan import VQGAN, Decoder, Discriminator, DiscriminatorConfig, Encoder, VectorQuantizer, VQGANConfig
from vqgan.layers import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm

F16 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=256, resolution=256)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_f16_parameter_counts_match_the_reference() -> None:
    with torch.device("meta"):
        encoder = Encoder(**F16, in_channels=3)
        decoder = Decoder(**F16, out_channels=3)
    assert count(encoder) == pytest.approx(29.3e6, rel=0.005)
    assert count(decoder) == pytest.approx(42.4e6, rel=0.005)


@pytest.mark.parametrize("channels", [16, 64, 48, 1])
def test_group_norm_falls_back_for_small_widths(channels: int) -> None:
    norm = group_norm(channels)
    assert norm.num_groups == {16: 16, 64: 32, 48: 16, 1: 1}[channels]
    assert norm(torch.randn(2, channels, 3, 3)).shape == (2, channels, 3, 3)


def test_resnet_block_shortcut() -> None:
    assert isinstance(ResnetBlock(8, 8).nin_shortcut, torch.nn.Identity)
    block = ResnetBlock(8, 16, dropout=0.1)
    assert isinstance(block.nin_shortcut, torch.nn.Conv2d) and block.nin_shortcut.kernel_size == (1, 1)
    assert block(torch.randn(2, 8, 5, 5)).shape == (2, 16, 5, 5)
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    x = torch.randn(1, 8, 3, 3)
    assert torch.allclose(block(x), block.nin_shortcut(x))


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    block = AttnBlock(8)
    x = torch.randn(2, 8, 3, 4)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)
    expected = x + block.proj_out((v @ weights.transpose(1, 2)).view(2, 8, 3, 4))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_resampling() -> None:
    torch.manual_seed(0)
    down, up = Downsample(4), Upsample(4)
    x = torch.randn(1, 4, 8, 6)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert torch.equal(down(x), expected) and expected.shape == (1, 4, 4, 3)
    assert up(x).shape == (1, 4, 16, 12)
    expected = F.conv2d(x.repeat_interleave(2, 2).repeat_interleave(2, 3), up.conv.weight, up.conv.bias, padding=1)
    assert torch.allclose(up(x), expected)


@pytest.mark.parametrize(
    "channels, resolution, ch_mult, attn, tokens",
    [
        (1, 28, (1, 2, 2), (7,), 7),
        (3, 28, (1, 2, 2), (14,), 7),
        (3, 32, (1, 2), (16,), 16),
        (1, 64, (1, 1, 2, 2), (8,), 8),
    ],
)
def test_shapes_for_several_resolutions(channels, resolution, ch_mult, attn, tokens) -> None:
    model = tiny_vqgan(in_channels=channels, resolution=resolution, ch_mult=ch_mult, attn_resolutions=attn).eval()
    assert model.latent_size == (tokens, tokens)
    assert model.downsample_factor == resolution // tokens
    x = torch.randn(2, channels, resolution, resolution)
    out = model(x)
    assert out.reconstruction.shape == x.shape
    assert out.indices.shape == (2, tokens, tokens) and out.indices.dtype == torch.long
    assert out.codebook_loss.dim() == 0


def test_attention_sits_at_the_requested_resolutions() -> None:
    encoder = Encoder(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=4, resolution=32)
    decoder = Decoder(ch=8, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), z_channels=4, resolution=32)
    assert [len(stage.attn) for stage in encoder.down] == [0, 0, 2]
    assert [len(stage.block) for stage in decoder.up] == [3, 3, 3]
    assert [len(stage.attn) for stage in decoder.up] == [3, 0, 0]


def test_non_square_inputs() -> None:
    model = tiny_vqgan().eval()
    assert model(torch.randn(1, 3, 16, 32)).reconstruction.shape == (1, 3, 16, 32)


def test_geometry_errors_name_sizes_and_fix() -> None:
    with pytest.raises(ValueError, match=r"resolution 30 .* factor 4 .* multiple of 4 \(e\.g\. 28 or 32\)"):
        tiny_vqgan(resolution=30, ch_mult=(1, 2, 2), attn_resolutions=())
    with pytest.raises(ValueError, match=r"sizes are \[28, 14, 7\]"):
        tiny_vqgan(resolution=28, ch_mult=(1, 2, 2), attn_resolutions=(8,))
    with pytest.raises(ValueError, match="at least one"):
        tiny_vqgan(ch_mult=())
    with pytest.raises(ValueError, match=r"input size 15x16 .* factor 2"):
        tiny_vqgan()(torch.randn(1, 3, 15, 16))


def test_straight_through_gradient_reaches_the_encoder() -> None:
    torch.manual_seed(0)
    model = tiny_vqgan()
    out = model(torch.randn(2, 3, 16, 16))
    wanted = [model.encoder.conv_in.weight, model.quant_conv.weight, model.quantizer.codebook]
    encoder_grad, quant_grad, code_grad = torch.autograd.grad(
        out.reconstruction.pow(2).mean(), wanted, retain_graph=True, allow_unused=True
    )
    assert encoder_grad.abs().sum() > 0 and quant_grad.abs().sum() > 0
    assert code_grad is None
    out.codebook_loss.backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [{}, dict(codebook_dim=2, l2_norm=True), dict(ema=True)])
def test_indices_round_trip_equals_forward(options) -> None:
    torch.manual_seed(0)
    model = tiny_vqgan(**options).eval()
    x = torch.randn(2, 3, 16, 16)
    indices = model.encode_to_indices(x)
    assert indices.dtype == torch.long and indices.shape == (2, *model.latent_size)
    out = model(x)
    assert torch.equal(indices, out.indices)
    assert torch.equal(model.decode_indices(indices), out.reconstruction)


def test_model_config_rebuilds_the_model_and_old_configs_are_refused_clearly() -> None:
    model = VQGAN(VQGANConfig(), in_channels=1, resolution=32)
    assert set(model.model_config) == {f.name for f in dataclasses.fields(VQGANConfig)} | {"in_channels",
                                                                                          "resolution", "num_labels"}
    rebuilt = VQGAN.from_model_config(model.model_config)
    rebuilt.load_state_dict(model.state_dict())
    assert model.codebook_size == VQGANConfig().codebook_size
    assert isinstance(model.quantizer, VectorQuantizer)
    assert model.last_layer_weight is model.decoder.conv_out.weight and model.last_layer_weight.shape[0] == 1
    state = {"model_config": {**model.model_config, "colour_space": "lab"}, "model": model.state_dict()}
    with pytest.raises(CheckpointError, match="old.pt.*model_config.*colour_space"):
        VQGAN.from_checkpoint(state, "old.pt")


def test_reconstruct_decodes_the_exported_indices_clamped() -> None:
    torch.manual_seed(0)
    model = tiny_vqgan().eval()
    x = torch.randn(2, 3, 16, 16)
    indices, reconstructions = model.reconstruct(x)
    assert torch.equal(indices, model.encode_to_indices(x))
    assert torch.equal(reconstructions, model.decode_indices(indices).clamp(-1, 1))


def test_codebook_runs_in_fp32_under_autocast() -> None:
    model = tiny_vqgan(codebook_dim=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        quantized = model.encode(torch.randn(1, 3, 16, 16))
        assert quantized.z_q.dtype == quantized.loss.dtype == torch.float32
        assert model.decode(quantized.z_q).dtype == torch.bfloat16


def test_discriminator_output_shape() -> None:
    disc = Discriminator(3, DiscriminatorConfig())
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    assert disc.output_size(256) == 30
    for norm in ("batch", "group", "none"):
        small = Discriminator(1, DiscriminatorConfig(ndf=8, n_layers=2, norm=norm))
        images = torch.randn(2, 1, 28, 28, requires_grad=True)
        logits = small(images)
        assert logits.shape == (2, 1, 5, 5)
        (grad,) = torch.autograd.grad(logits.sum(), images)
        assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="too small .* n_layers=3"):
        disc(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="norm must be"):
        Discriminator(3, DiscriminatorConfig(norm="layer"))
    with pytest.raises(ValueError, match="n_layers"):
        Discriminator(3, DiscriminatorConfig(n_layers=0))


@pytest.mark.parametrize(
    "norm, norm_type", [("batch", torch.nn.BatchNorm2d), ("group", torch.nn.GroupNorm), ("none", None)]
)
def test_discriminator_layers_and_init(norm: str, norm_type) -> None:
    torch.manual_seed(0)
    disc = Discriminator(3, DiscriminatorConfig(norm=norm))
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in disc.modules() if norm_type is not None and isinstance(m, norm_type)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1), (1, 1)]
    assert len(norms) == (3 if norm_type else 0)
    assert [c.bias is not None for c in convs] == [True] + [norm == "none"] * 3 + [True]
    weights = torch.cat([c.weight.flatten() for c in convs])
    assert abs(weights.mean().item()) < 1e-3 and weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(c.bias.abs().sum() == 0 for c in convs if c.bias is not None)
    if norms:
        scales = torch.cat([n.weight for n in norms])
        assert scales.mean().item() == pytest.approx(1.0, abs=3e-3)
        assert scales.std().item() == pytest.approx(0.02, rel=0.15)
        assert all(n.bias.abs().sum() == 0 for n in norms)


def test_last_layer_stays_out_of_compiled_graphs() -> None:
    """The adaptive GAN weight differentiates at the decoder's last layer alone; kept outside the compiled
    graph, that gradient does not run the compiled backward again."""
    model = tiny_vqgan().eval()
    explained = torch._dynamo.explain(model.decode)(torch.randn(1, 4, 8, 8))
    assert explained.graph_break_count >= 1
    assert explained.graphs and not any("conv_out" in graph.code for graph in explained.graphs)
