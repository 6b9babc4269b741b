"""Datasets and loaders: builtin shapes, idx files, torchvision sets offline, image folders, loaders."""

import gzip
import signal
import socket
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from dataloader import (
    BadImageError,
    DataError,
    DatasetFormatError,
    DatasetNotFoundError,
    build_dataset,
    build_loader,
    infinite_batches,
    num_classes_of,
    standard,
)
from dataloader import loader as loader_module
from dataloader.builtin import SHAPES, ShapesDataset
from dataloader.folder import FolderDataset, to_8bit
from dataloader.idx import read_idx
from dataloader.standard import ArrayDataset
from dataloader.transforms import match_channels
from utils.config import DataConfig


def value(byte: float) -> float:
    """An 8-bit pixel value as the datasets return it."""
    return byte / 127.5 - 1.0


# ---------------------------------------------------------------- builtin


def test_builtin_is_deterministic_per_index():
    a, b = ShapesDataset(50, 32, seed=3), ShapesDataset(50, 32, seed=3)
    for i in (0, 7, 49):
        assert torch.equal(a[i][0], b[i][0])
    assert torch.equal(a[-1][0], a[49][0])
    assert not torch.equal(a[0][0], a[10][0])
    assert not torch.equal(a[0][0], ShapesDataset(50, 32, seed=4)[0][0])
    with pytest.raises(IndexError):
        a[50]


def test_builtin_train_and_test_splits_are_disjoint():
    cfg = DataConfig(name="builtin", num_samples=60, eval_samples=20, image_size=16)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (60, 20)
    train_images = torch.stack([train[i][0] for i in range(60)])
    for i in range(20):
        assert not (train_images == test[i][0]).flatten(1).all(1).any()
    assert len(build_dataset(DataConfig(name="builtin", num_samples=60, eval_samples=0), "test")) == 6


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_builtin_shapes_ranges_and_labels(size, channels):
    cfg = DataConfig(name="builtin", image_size=size, channels=channels, num_samples=24, num_classes=12)
    ds = build_dataset(cfg)
    assert num_classes_of(ds) == 12 and len(ds) == 24 and "24 images" in repr(ds)
    for i in range(0, 24, 5):
        image, label = ds[i]
        assert image.shape == (channels, size, size) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.1
        assert isinstance(label, int) and label == i % 12


def test_builtin_scene_does_not_depend_on_resolution():
    small, large = ShapesDataset(4, 16)[1][0], ShapesDataset(4, 64)[1][0]
    pooled = torch.nn.functional.avg_pool2d(large[None], 4)[0]
    assert (pooled - small).abs().mean() < 0.05


def test_scattered_scenes_are_the_pictures_they_always_were():
    """The README's segmentation and landscape figures were drawn from these scenes: they must not change."""
    scenes = ShapesDataset(20, 16, 3, 10, seed=0, segmentation=True)
    for index, pixel_sum, covered in ((0, 321.635953, 54), (5, -339.683419, 336), (13, 390.768432, 100)):
        image, mask, _ = scenes[index]
        assert float(image.double().sum()) == pytest.approx(pixel_sum, abs=1e-4)
        assert int(mask.sum()) == covered  # the label (index mod 10, plus 1) on every covered pixel


def test_centred_scenes_hold_one_shape_near_the_centre_on_a_flat_palette_background():
    scenes = ShapesDataset(40, 32, 3, 10, seed=0, segmentation=True, scene="centred")
    for index in range(40):
        image, mask, label = scenes[index]
        covered = mask[0] > 0
        assert set(mask.unique().tolist()) == {0, label + 1}
        rows, columns = torch.nonzero(covered, as_tuple=True)
        middle = torch.stack([rows.min() + rows.max(), columns.min() + columns.max()]).float() / 2 / 31
        assert (middle - 0.5).abs().max() < 0.15  # jitter 0.08, plus the tilt and the shape's own asymmetry
        assert 0.08 < covered.float().mean() < 0.6
        background = image[:, ~covered]
        assert (background.std(dim=1) < 0.25).all()  # a ramp, no texture
    assert not torch.equal(ShapesDataset(4, 16, scene="centred")[1][0], ShapesDataset(4, 16)[1][0])


def test_centred_checkers_keep_their_cells_at_the_token_grid_of_a_4x_downsampling_vqgan():
    """Averaged over the 4x4 pixels of one token, a checker must still show its two colours: finer cells blur
    into a plain square, which no tokenizer at that grid can tell apart from one."""
    scenes = ShapesDataset(200, 32, 3, 10, seed=0, segmentation=True, scene="centred")
    contrast = []
    for index in range(SHAPES.index("checker"), 200, 10):
        image, mask, _ = scenes[index]
        pooled = torch.nn.functional.avg_pool2d(image[None], 4)[0]
        inside = torch.nn.functional.avg_pool2d((mask > 0).float()[None], 4)[0, 0] == 1
        contrast.append(pooled[:, inside].std(dim=1).mean())
    assert torch.stack(contrast).mean() > 0.12  # 0.17 with cells of half a radius; 0.07 with the scattered ones


def test_builtin_is_fast_enough():
    ds = ShapesDataset(200, 32)
    start = time.perf_counter()
    for i in range(200):
        ds[i]
    assert time.perf_counter() - start < 5.0


def test_builtin_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        ShapesDataset(10, 32, num_classes=len(SHAPES) + 1)
    with pytest.raises(ValueError, match="channels"):
        ShapesDataset(10, 32, channels=2)
    with pytest.raises(ValueError, match="length"):
        ShapesDataset(0, 32)
    with pytest.raises(ValueError, match="data.scene must be one of scattered, centred"):
        ShapesDataset(10, 32, scene="crowded")


def test_build_dataset_rejects_bad_config():
    with pytest.raises(ValueError, match="split"):
        build_dataset(DataConfig(), "valid")
    with pytest.raises(ValueError, match="data.channels"):
        build_dataset(DataConfig(channels=4))
    with pytest.raises(ValueError, match="data.image_size"):
        build_dataset(DataConfig(image_size=0))
    with pytest.raises(ValueError, match="data.name"):
        build_dataset(DataConfig(name="imagenet"))


# ---------------------------------------------------------------- idx files (MNIST / Fashion-MNIST)


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def write_idx_set(folder: Path, counts=(12, 6), compress: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, count in zip(("train", "t10k"), counts):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = 0, 255
        labels = (np.arange(count) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(array)
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written[split] = (images, labels)
    return written


def test_fashion_mnist_from_idx_gz_files(tmp_path):
    written = write_idx_set(tmp_path)
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=28, channels=1, download=False,
                     eval_samples=4)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (12, 4) and num_classes_of(train) == 10
    image, label = train[5]
    assert image.shape == (1, 28, 28) and label == 5
    assert torch.allclose(image[0], torch.from_numpy(written["train"][0][5]).float() / 127.5 - 1)
    assert test[3][1] == 3
    assert len(build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), eval_samples=0), "test")) == 6
    rgb = build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=32, channels=3), "train")[0][0]
    assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2])
    assert rgb[0, 0, 0] < -0.5 and rgb.min() >= -1 and rgb.max() <= 1
    flipping = build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=28, channels=1,
                                        random_flip=True), "train")
    assert flipping.augment and "Fashion-MNIST train" in repr(flipping)
    torch.manual_seed(0)
    plain = train[5][0]
    draws = [flipping[5][0] for _ in range(16)]
    assert all(torch.equal(d, plain) or torch.equal(d, plain.flip(-1)) for d in draws)
    assert any(torch.equal(d, plain.flip(-1)) for d in draws)


def test_mnist_from_torchvision_layout_unpacked(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", compress=False)
    ds = build_dataset(DataConfig(name="mnist", root=str(tmp_path), image_size=16, channels=1), "test")
    assert len(ds) == 6 and ds[0][0].shape == (1, 16, 16)


def test_idx_wrong_magic_number(tmp_path):
    write_idx_set(tmp_path)
    bad = bytearray(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()))
    bad[0:4] = b"\x12\x34\x56\x78"
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(DatasetFormatError, match="magic number 0x12345678") as err:
        build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path)), "train")
    assert "train-images-idx3-ubyte.gz" in str(err.value)


def test_idx_truncated_swapped_and_damaged_files(tmp_path):
    path = tmp_path / "x"
    data = idx_bytes(np.zeros((3, 4, 4), np.uint8))
    path.write_bytes(data[:-5])
    with pytest.raises(DatasetFormatError, match="truncated"):
        read_idx(path)
    path.write_bytes(data[:10])
    with pytest.raises(DatasetFormatError, match="header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetFormatError, match="too short"):
        read_idx(path)
    path.write_bytes(data)
    with pytest.raises(DatasetFormatError, match="expected 1 dimensions"):
        read_idx(path, ndim=1)
    assert read_idx(path, ndim=3).shape == (3, 4, 4)
    path.write_bytes(gzip.compress(data)[:-12])
    with pytest.raises(DatasetFormatError, match="damaged gzip"):
        read_idx(path)
    path.write_bytes(idx_bytes(np.arange(6, dtype=np.int16).reshape(2, 3), code=0x0B)[:12] + np.arange(
        6, dtype=">i2").tobytes())
    assert read_idx(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_idx_images_and_labels_must_agree(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DatasetFormatError, match="one label each"):
        build_dataset(DataConfig(name="mnist", root=str(tmp_path)), "train")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(12, 11, np.uint8))))
    with pytest.raises(DatasetFormatError, match="outside 0..9"):
        build_dataset(DataConfig(name="mnist", root=str(tmp_path)), "train")


def test_real_fashion_mnist_when_installed():
    root = Path("/usr/share/datasets/fashion-mnist")
    if not (root / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    ds = build_dataset(DataConfig(name="fashion_mnist", root=str(root), eval_samples=0), "test")
    assert len(ds) == 10000 and ds[0][1] == 9 and ds[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------- torchvision sets offline


def test_missing_fashion_mnist_names_folder_and_files(tmp_path):
    cfg = DataConfig(name="fashion_mnist", root=str(tmp_path / "data"), download=False)
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(cfg)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, DataError)
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert "t10k-labels-idx1-ubyte.gz" in message and "data.download: true" in message
    assert "dataset-fashion-mnist" in message


def test_missing_cifar10_names_folder_and_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data_batch_1" in message
    assert "test_batch" in message and "cifar-10-python.tar.gz" in message


def test_is_online_probe(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        assert standard.is_online([f"http://127.0.0.1:{port}/"], timeout=2.0)
    finally:
        server.close()
    assert not standard.is_online([f"http://127.0.0.1:{port}/"], timeout=2.0)
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    assert standard.is_online(["https://unreachable.invalid/"])


def test_download_offline_fails_fast(tmp_path):
    if standard.is_online(list(standard.tv_datasets.MNIST.mirrors), timeout=2.0):
        pytest.skip("online: the test must not download MNIST")
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError, match="download failed"):
        build_dataset(DataConfig(name="mnist", root=str(tmp_path), download=True))
    assert time.perf_counter() - start < 15


def test_download_success_and_failure_paths(tmp_path, monkeypatch):
    class FashionMNIST:
        mirrors = ["http://mirror.invalid/"]

        def __init__(self, root, train, download):
            write_idx_set(Path(root) / "FashionMNIST" / "raw")

    class MNIST:
        mirrors = ["http://mirror.invalid/"]

        def __init__(self, root, train, download):
            raise RuntimeError("server said no")

    class Lazy(MNIST):
        def __init__(self, root, train, download):
            pass

    monkeypatch.setitem(standard._IDX_SETS, "fashion_mnist", ("Fashion-MNIST", FashionMNIST))
    monkeypatch.setitem(standard._IDX_SETS, "mnist", ("MNIST", MNIST))
    monkeypatch.setattr(standard, "is_online", lambda urls, timeout=5.0: True)
    assert len(build_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), download=True))) == 12
    with pytest.raises(DatasetNotFoundError, match="RuntimeError: server said no"):
        build_dataset(DataConfig(name="mnist", root=str(tmp_path / "elsewhere"), download=True))
    monkeypatch.setitem(standard._IDX_SETS, "mnist", ("MNIST", Lazy))
    with pytest.raises(DatasetNotFoundError, match="without leaving the files"):
        build_dataset(DataConfig(name="mnist", root=str(tmp_path / "elsewhere"), download=True))


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    class FakeCifar:
        base_folder, url, filename = "cifar-10-batches-py", "https://example.invalid/c.tar.gz", "c.tar.gz"
        train_list, test_list, meta = [["data_batch_1", ""]], [["test_batch", ""]], {"filename": "batches.meta"}

        def __init__(self, root, train, download):
            marker = Path(root) / self.base_folder
            if download:
                marker.mkdir(parents=True)
            if not marker.is_dir():
                raise RuntimeError("Dataset not found or corrupted.")
            self.data = np.full((8 if train else 5, 32, 32, 3), (255, 0, 0), np.uint8)
            self.targets = list(range(8 if train else 5))

    monkeypatch.setattr(standard.tv_datasets, "CIFAR10", FakeCifar)
    monkeypatch.setattr(standard, "is_online", lambda urls, timeout=5.0: False)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=True, channels=1, image_size=16, eval_samples=3)
    with pytest.raises(DatasetNotFoundError, match="automatic download failed \\(no connection"):
        build_dataset(cfg)
    monkeypatch.setattr(standard, "is_online", lambda urls, timeout=5.0: True)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test), num_classes_of(test)) == (8, 3, 10)
    image, label = train[7]
    assert image.shape == (1, 16, 16) and label == 7
    assert torch.allclose(image, torch.full_like(image, 0.299 * 2 - 1), atol=1e-5)


# ---------------------------------------------------------------- image folders


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def solid(colour, size=(20, 20), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def folder_cfg(root: Path, **kwargs) -> DataConfig:
    return DataConfig(name="folder", root=str(root), image_size=kwargs.pop("image_size", 16), **kwargs)


def test_folder_with_class_subfolders(tmp_path):
    save(tmp_path / "dog" / "b.jpg", solid((0, 0, 255)))
    save(tmp_path / "cat" / "a.png", solid((255, 0, 0)))
    save(tmp_path / "dog" / "deeper" / "c.webp", solid((0, 255, 0)))
    save(tmp_path / "cat" / ".hidden.png", solid((0, 0, 0)))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset(folder_cfg(tmp_path, class_labels=True), "train")
    assert len(ds) == 3 and ds.class_names == ["cat", "dog"] and num_classes_of(ds) == 2
    assert [ds[i][1] for i in range(3)] == [0, 1, 1]
    image = ds[0][0]
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert len(build_dataset(folder_cfg(tmp_path, class_labels=True), "test")) == 3
    unlabeled = build_dataset(folder_cfg(tmp_path), "train")
    assert num_classes_of(unlabeled) == 0 and unlabeled[2][1] == 0 and "3 images" in repr(unlabeled)


def test_folder_train_and_test_subfolders(tmp_path):
    for split, count in (("train", 4), ("val", 6)):
        for i in range(count):
            save(tmp_path / split / ("a" if i % 2 else "b") / f"{i}.png", solid((i * 20, 0, 0)))
    train = build_dataset(folder_cfg(tmp_path, class_labels=True), "train")
    test = build_dataset(folder_cfg(tmp_path, class_labels=True, eval_samples=3), "test")
    assert len(train) == 4 and all(p.is_relative_to(tmp_path / "train") for p in train.paths)
    assert len(test) == 3 and all(p.is_relative_to(tmp_path / "val") for p in test.paths)
    assert [test[i][1] for i in range(3)] == [0, 1, 1]
    assert len(build_dataset(folder_cfg(tmp_path, eval_samples=0), "test")) == 6


def test_folder_held_out_split(tmp_path):
    for i in range(25):
        save(tmp_path / f"{i:02d}.png", solid((i, i, i), (8, 8)))
    train = build_dataset(folder_cfg(tmp_path, eval_samples=100), "train")
    test = build_dataset(folder_cfg(tmp_path, eval_samples=100), "test")
    assert (len(train), len(test)) == (23, 2) and not set(train.paths) & set(test.paths)
    assert test.paths == build_dataset(folder_cfg(tmp_path, eval_samples=100), "test").paths
    assert len(build_dataset(folder_cfg(tmp_path, eval_samples=1), "test")) == 1
    assert len(build_dataset(folder_cfg(tmp_path, eval_samples=0), "test")) == 2
    save(tmp_path / "lonely" / "train" / "only.png", solid((0, 0, 0), (8, 8)))
    assert len(build_dataset(folder_cfg(tmp_path / "lonely"), "test")) == 1


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images found") as err:
        build_dataset(folder_cfg(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(err.value) and ".png" in str(err.value) and ".webp" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        build_dataset(folder_cfg(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(err.value) and ".jpg" in str(err.value)


def test_class_labels_need_subfolders(tmp_path):
    save(tmp_path / "top.png", solid((1, 2, 3)))
    with pytest.raises(DatasetFormatError, match="top.png"):
        build_dataset(folder_cfg(tmp_path, class_labels=True))


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    save(tmp_path / "good.png", solid((10, 20, 30)))
    (tmp_path / "junk.jpg").write_bytes(b"this is not a jpeg")
    full = save(tmp_path / "cut.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    full.write_bytes(full.read_bytes()[:400])
    ds = build_dataset(folder_cfg(tmp_path))
    names = [p.name for p in ds.paths]
    for name in ("junk.jpg", "cut.png"):
        with pytest.raises(BadImageError, match="skip_bad_images") as err:
            ds[names.index(name)]
        assert str(tmp_path / name) in str(err.value)


def test_skip_bad_images_warns_and_counts(tmp_path):
    (tmp_path / "a.png").write_bytes(b"broken")
    save(tmp_path / "b.png", solid((0, 255, 0)))
    ds = build_dataset(folder_cfg(tmp_path, skip_bad_images=True))
    with pytest.warns(UserWarning, match=r"#1 .*a\.png"):
        image, _ = ds[0]
    assert torch.allclose(image[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]
    (tmp_path / "b.png").write_bytes(b"broken too")
    with pytest.warns(UserWarning), pytest.raises(BadImageError, match="none of the 2 images"):
        ds[1]


def test_mixed_modes_are_converted(tmp_path):
    save(tmp_path / "1_gray.png", solid(100, mode="L"))
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[:, 10:, 3] = 255, 255
    save(tmp_path / "2_rgba.png", Image.fromarray(rgba, "RGBA"))
    deep = np.full((20, 20), 128 * 257, np.uint16)
    deep[:, 10:] = 65535
    save(tmp_path / "3_deep.png", Image.fromarray(deep))
    palette = solid(1, mode="P")
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    save(tmp_path / "4_palette.png", palette)
    save(tmp_path / "5_cmyk.jpg", solid((0, 0, 0, 0), mode="CMYK"))
    assert Image.open(tmp_path / "3_deep.png").mode == "I;16"
    ds = build_dataset(folder_cfg(tmp_path, image_size=20))
    gray, rgba_image, deep_image, pal, cmyk = (ds[i][0] for i in range(5))
    assert torch.allclose(gray, torch.full((3, 20, 20), value(100)), atol=1e-6)
    assert torch.allclose(rgba_image[:, 5, 2], torch.ones(3))
    assert torch.allclose(rgba_image[:, 5, 17], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(deep_image[:, 5, 2], torch.full((3,), value(128)), atol=1e-6)
    assert torch.allclose(deep_image[:, 5, 17], torch.ones(3))
    assert torch.allclose(pal, torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 20, 20))
    assert (cmyk > 0.95).all()
    one = build_dataset(folder_cfg(tmp_path, image_size=20, channels=1))
    assert one[1][0].shape == (1, 20, 20) and torch.isclose(one[1][0][0, 5, 17], torch.tensor(value(76)), atol=1e-6)
    assert torch.isclose(one[2][0][0, 5, 2], torch.tensor(value(128)), atol=1e-6)


def test_eight_bit_conversion_of_integer_images():
    assert np.asarray(to_8bit(Image.fromarray(np.full((2, 2), 200, np.int32)), 1)).max() == 200
    assert np.asarray(to_8bit(Image.fromarray(np.full((2, 2), 65535, np.int32)), 3)).min() == 255
    assert to_8bit(solid((1, 2, 3)), 1).mode == "L"


def test_constructors_check_their_arguments():
    with pytest.raises(ValueError, match="labels"):
        FolderDataset([Path("a.png")], [], [], 8, 3)
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(np.zeros((2, 4, 4), np.uint8), np.zeros(3), 4, 1, 10)
    assert "2 images" in repr(ArrayDataset(np.zeros((2, 4, 4), np.uint8), np.zeros(2), 4, 1, 10))
    with pytest.raises(ValueError, match="2-channel"):
        match_channels(torch.zeros(2, 4, 4), 3)


def test_small_and_wide_images_are_resized_and_cropped(tmp_path):
    save(tmp_path / "a_small.png", solid((200, 100, 50), (6, 5)))
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 20:] = 255
    save(tmp_path / "b_wide.png", Image.fromarray(wide))
    save(tmp_path / "c_big.jpg", solid((10, 200, 30), (400, 200)))
    ds = build_dataset(folder_cfg(tmp_path, image_size=16))
    assert torch.allclose(ds[2][0][:, 8, 8], torch.tensor([value(10), value(200), value(30)]), atol=0.05)
    small = ds[0][0]
    assert small.shape == (3, 16, 16)
    assert torch.allclose(small, torch.tensor([value(200), value(100), value(50)])[:, None, None].expand(3, 16, 16),
                          atol=1e-5)
    image = ds[1][0]
    assert image.shape == (3, 16, 16)
    assert (image[:, :, :6] == -1).all() and (image[:, :, 10:] == 1).all()


def test_random_flip_only_in_train(tmp_path):
    half = np.zeros((16, 16, 3), np.uint8)
    half[:, 8:] = 255
    save(tmp_path / "half.png", Image.fromarray(half))
    cfg = folder_cfg(tmp_path, random_flip=True)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert train.augment and not test.augment
    assert not build_dataset(cfg, "train", augment=False).augment
    torch.manual_seed(0)
    seen = {train[0][0][0, 0, 0].item() for _ in range(20)}
    assert seen == {-1.0, 1.0}
    assert {test[0][0][0, 0, 0].item() for _ in range(10)} == {-1.0}
    shapes = build_dataset(DataConfig(random_flip=True, num_samples=4, image_size=16), "train")
    plain = ShapesDataset(4, 16)[1][0]
    draws = [shapes[1][0] for _ in range(20)]
    assert all(torch.equal(d, plain) or torch.equal(d, plain.flip(-1)) for d in draws)
    assert any(torch.equal(d, plain.flip(-1)) for d in draws) and any(torch.equal(d, plain) for d in draws)


# ---------------------------------------------------------------- loaders


def labels_of(batches) -> list[list[int]]:
    return [batch[1].tolist() for batch in batches]


def test_build_loader_and_infinite_batches():
    ds = ShapesDataset(10, 8)
    loader = build_loader(ds, 4, shuffle=True, seed=1)
    assert len(loader) == 2 and loader.drop_last and not loader.pin_memory and loader.num_workers == 0
    stream = infinite_batches(loader)
    batches = [next(stream) for _ in range(8)]
    assert all(b[0].shape == (4, 3, 8, 8) for b in batches)
    epochs = [sorted(sum(labels_of(batches[i:i + 2]), [])) for i in range(0, 8, 2)]
    assert all(len(set(e)) == 8 for e in epochs)
    assert len({tuple(sum(labels_of(batches[i:i + 2]), [])) for i in range(0, 8, 2)}) > 1
    again = infinite_batches(build_loader(ds, 4, shuffle=True, seed=1))
    assert labels_of(next(again) for _ in range(8)) == labels_of(batches)
    resumed = infinite_batches(build_loader(ds, 4, shuffle=True, seed=1), start_step=3)
    assert labels_of(next(resumed) for _ in range(5)) == labels_of(batches[3:])
    ordered = build_loader(ds, 5, shuffle=False, drop_last=False)
    assert labels_of(ordered) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_infinite_batches_with_a_plain_loader():
    ds = Subset(ShapesDataset(6, 8, num_classes=6), range(6))
    assert num_classes_of(ds) == 6
    stream = infinite_batches(DataLoader(ds, batch_size=2), start_step=4)
    assert labels_of(next(stream) for _ in range(3)) == [[2, 3], [4, 5], [0, 1]]
    with pytest.raises(ValueError, match="no batches"):
        next(infinite_batches(DataLoader(ds, batch_size=8, drop_last=True)))


def test_loader_options(monkeypatch):
    ds = ShapesDataset(10, 8)
    with pytest.warns(UserWarning, match="fewer than one batch"):
        small = build_loader(ds, 16, drop_last=True)
    assert len(small) == 1
    workers = build_loader(ds, 4, num_workers=1, device_type="cuda")
    assert workers.persistent_workers and workers.pin_memory and workers.worker_init_fn is not None
    with pytest.raises(RuntimeError, match="torchrun"):
        build_loader(ds, 4, distributed=True)
    monkeypatch.setattr(loader_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(loader_module.dist, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(loader_module.dist, "get_rank", lambda rank=rank: rank)
        shard = build_loader(ds, 5, distributed=True, seed=3)
        assert isinstance(shard.sampler, loader_module.ResumableSampler) and len(shard) == 1
        shards.append(sum(labels_of(shard), []))
    assert sorted(shards[0] + shards[1]) == sorted(i % 10 for i in range(10))


def test_worker_seeding_and_loading_in_a_worker():
    np.random.seed(0)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        loader_module._init_worker(0)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    torch_seed = torch.initial_seed() % 2**32
    assert np.random.get_state()[1][0] == np.random.RandomState(torch_seed).get_state()[1][0]
    loader = build_loader(ShapesDataset(4, 8), 2, num_workers=1, seed=0)
    assert labels_of(loader) == labels_of(build_loader(ShapesDataset(4, 8), 2, num_workers=0, seed=0))
