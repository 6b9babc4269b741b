"""LPIPS: distance properties, weight loading from files, strict key checks, clear missing-file errors."""

import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import vgg16

import vqgan.lpips as lpips_module
from vqgan.lpips import (
    LPIPS,
    LPIPSWeightsError,
    LPIPSWeightsMismatchError,
    load_heads,
    packaged_heads_path,
    vgg_cache_path,
)

FIXES = ("loss.lpips_vgg_path=", "loss.perceptual_weight=0")


@pytest.fixture(scope="module")
def model(lpips_files) -> LPIPS:
    return LPIPS(lpips_files.vgg, lpips_files.heads, download=False)


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    return x, y


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_zero_for_identical_positive_and_symmetric(model: LPIPS, images) -> None:
    x, y = images
    assert model(x, x).shape == (2,)
    assert torch.all(model(x, x).abs() < 1e-6)
    d_xy, d_yx = model(x, y), model(y, x)
    assert torch.all(d_xy > 0)
    torch.testing.assert_close(d_xy, d_yx)


def test_grayscale_is_repeated_to_rgb(model: LPIPS, images) -> None:
    x, y = images[0][:, :1], images[1][:, :1]
    torch.testing.assert_close(model(x, y), model(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)))


def test_rejects_bad_inputs(model: LPIPS, images) -> None:
    x, y = images
    with pytest.raises(ValueError, match="same shape"):
        model(x, y[:1])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        model(x[:, :2], y[:, :2])


def test_frozen_and_always_eval(model: LPIPS) -> None:
    assert all(not p.requires_grad for p in model.parameters())
    parent = nn.Sequential(model)
    parent.train()
    assert not model.training and not any(m.training for m in model.modules())


def test_gradient_reaches_the_input(model: LPIPS, images) -> None:
    x, y = images
    x = x.clone().requires_grad_(True)
    model(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_side_without_gradients_is_not_recorded(model: LPIPS, images) -> None:
    """Against real images only the reconstruction's half of the batch goes through the backward:
    no activation the graph saves has the doubled batch, and distance and gradient equal the batched pass."""
    x, y = images
    batch = x.shape[0]
    y_split = y.clone().requires_grad_(True)
    saved_batches = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 4:
            saved_batches.append(tensor.shape[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        distance = model(x, y_split)
    distance.sum().backward()
    assert batch in saved_batches and 2 * batch not in saved_batches

    x_batched, y_batched = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    reference = model(x_batched, y_batched)
    reference.sum().backward()
    torch.testing.assert_close(distance, reference)
    torch.testing.assert_close(y_split.grad, y_batched.grad)
    x_only = x.clone().requires_grad_(True)
    model(x_only, y).sum().backward()
    torch.testing.assert_close(x_only.grad, x_batched.grad)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_matches_the_reference_lpips_package(lpips_files, images) -> None:
    reference_package = pytest.importorskip("lpips")
    reference = reference_package.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    features = torch.load(lpips_files.vgg, weights_only=True)
    slices = [
        reference.net.slice1,
        reference.net.slice2,
        reference.net.slice3,
        reference.net.slice4,
        reference.net.slice5,
    ]
    for tap in slices:
        tap.load_state_dict({key: features[f"features.{key}"] for key in tap.state_dict()})
    ours = LPIPS(lpips_files.vgg, download=False)
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y).flatten(), rtol=1e-4, atol=1e-6)


def test_packaged_heads_load_strictly() -> None:
    path = packaged_heads_path()
    if path is None:
        pytest.skip("lpips package not installed")
    heads = load_heads(path)
    stored = torch.load(path, map_location="cpu", weights_only=True)
    assert len(heads) == 5
    for i, head in enumerate(heads):
        torch.testing.assert_close(head.weight, stored[f"lin{i}.model.1.weight"])
        assert (head.weight >= 0).all()


def test_output_depends_on_the_given_files(model: LPIPS, lpips_files, images, tmp_path: Path) -> None:
    x, y = images
    doubled = {key: 2 * value for key, value in torch.load(lpips_files.heads, weights_only=True).items()}
    torch.save(doubled, tmp_path / "heads2.pth")
    features = torch.load(lpips_files.vgg, weights_only=True)
    torch.save({key: value.flip(0) for key, value in features.items()}, tmp_path / "vgg2.pth")
    with torch.no_grad():
        base = model(x, y)
        torch.testing.assert_close(LPIPS(lpips_files.vgg, tmp_path / "heads2.pth")(x, y), 2 * base)
        assert not torch.allclose(LPIPS(tmp_path / "vgg2.pth", lpips_files.heads)(x, y), base)


def test_full_torchvision_state_dict_is_accepted(lpips_files, tmp_path: Path) -> None:
    with torch.device("meta"):
        classifier = {k: v for k, v in vgg16(weights=None).state_dict().items() if k.startswith("classifier.")}
    state = torch.load(lpips_files.vgg, weights_only=True) | classifier
    torch.save(state, tmp_path / "full.pth")
    LPIPS(tmp_path / "full.pth", lpips_files.heads)


def test_mismatched_vgg_keys_are_named(lpips_files, tmp_path: Path) -> None:
    state = torch.load(lpips_files.vgg, weights_only=True)
    state["features.99.weight"] = state.pop("features.28.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(LPIPSWeightsMismatchError) as err:
        LPIPS(tmp_path / "bad.pth", lpips_files.heads)
    assert "bad.pth" in str(err.value)
    assert "Missing keys: features.28.weight" in str(err.value)
    assert "Unexpected keys: features.99.weight" in str(err.value)


def test_mismatched_head_shapes_and_bad_files(lpips_files, tmp_path: Path) -> None:
    heads = torch.load(lpips_files.heads, weights_only=True)
    heads["lin0.model.1.weight"] = torch.zeros(1, 32, 1, 1)
    torch.save(heads, tmp_path / "heads.pth")
    with pytest.raises(LPIPSWeightsMismatchError, match=r"Wrong shapes: lin0.model.1.weight \(1, 32, 1, 1\)"):
        LPIPS(lpips_files.vgg, tmp_path / "heads.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(LPIPSWeightsMismatchError, match="expected a state_dict"):
        LPIPS(lpips_files.vgg, tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LPIPSWeightsMismatchError, match="junk.pth' is not a readable"):
        LPIPS(tmp_path / "junk.pth", lpips_files.heads)


def test_missing_explicit_files_explain_the_fixes(lpips_files, tmp_path: Path, hub_dir: Path) -> None:
    with pytest.raises(LPIPSWeightsError) as err:
        LPIPS(tmp_path / "nowhere" / "vgg16.pth", lpips_files.heads)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "nowhere" / "vgg16.pth") in message
    assert all(fix in message for fix in FIXES) and str(vgg_cache_path()) in message
    with pytest.raises(LPIPSWeightsError, match="loss.lpips_heads_path=") as err:
        LPIPS(lpips_files.vgg, tmp_path / "heads.pth")
    assert str(tmp_path / "heads.pth") in str(err.value) and "loss.perceptual_weight=0" in str(err.value)


def test_missing_cache_without_download(hub_dir: Path) -> None:
    with pytest.raises(LPIPSWeightsError) as err:
        LPIPS(download=False)
    message = str(err.value)
    cache = hub_dir / "checkpoints" / "vgg16-397923af.pth"
    assert str(cache) in message and "download disabled" in message
    assert all(fix in message for fix in FIXES)


def test_missing_lpips_package_heads(monkeypatch: pytest.MonkeyPatch, lpips_files) -> None:
    monkeypatch.setattr(lpips_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LPIPSWeightsError, match="package not installed") as err:
        LPIPS(lpips_files.vgg)
    assert "pip install lpips" in str(err.value)


def test_loads_backbone_from_the_torchvision_cache(lpips_files, hub_dir: Path, images) -> None:
    cache = vgg_cache_path()
    cache.parent.mkdir(parents=True)
    shutil.copy(lpips_files.vgg, cache)
    x, y = images
    with torch.no_grad():
        torch.testing.assert_close(
            LPIPS(heads_weights=lpips_files.heads, download=False)(x, y),
            LPIPS(lpips_files.vgg, lpips_files.heads)(x, y),
        )


def test_download_into_the_cache(lpips_files, hub_dir: Path, monkeypatch: pytest.MonkeyPatch, images) -> None:
    calls = []

    def fake_download(url: str, dst: str, hash_prefix: str, progress: bool) -> None:
        calls.append((url, dst, hash_prefix))
        shutil.copy(lpips_files.vgg, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    LPIPS(heads_weights=lpips_files.heads)
    assert calls == [(lpips_module.VGG_URL, str(vgg_cache_path()), "397923af")]


def test_failed_download_raises_the_clear_error(hub_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(LPIPSWeightsError, match="download failed") as err:
        LPIPS()
    assert all(fix in str(err.value) for fix in FIXES)
