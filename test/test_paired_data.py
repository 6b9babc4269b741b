"""Condition maps: builtin label maps, paired folders (segmentation, depth), derived lowres and coord maps,
the condition-tokenizer view, their config checks, and the condition folders generate.py samples from."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dataloader import BadImageError, DatasetFormatError, DatasetNotFoundError, build_dataset, num_classes_of
from dataloader.builtin import ShapesDataset
from dataloader.folder import folder_fingerprint
from dataloader.inputs import condition_folder
from dataloader.transforms import LUMA, coord_map, lowres_condition
from utils.config import ConfigError, DataConfig, condition_channels, input_channels, validate_data

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def halves(size=(12, 12)) -> Image.Image:
    """Red left half, blue right half."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:, : size[0] // 2] = RED
    pixels[:, size[0] // 2 :] = BLUE
    return Image.fromarray(pixels)


def label_map(values: np.ndarray) -> Image.Image:
    return Image.fromarray(values.astype(np.uint8), mode="L")


def half_labels(size=(12, 12), left=1, right=0) -> Image.Image:
    values = np.full((size[1], size[0]), right, np.uint8)
    values[:, : size[0] // 2] = left
    return label_map(values)


def write_pair(root: Path, name: str, image: Image.Image, condition: Image.Image) -> None:
    save(root / "images" / f"{name}.png", image)
    save(root / "conditions" / f"{name}.png", condition)


def paired_cfg(root: Path, **kwargs) -> DataConfig:
    options = dict(name="folder", root=str(root), image_size=8, condition="segmentation", num_labels=3) | kwargs
    return DataConfig(**options)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(4 / ((a - b) ** 2).mean()))


# ---------------------------------------------------------------- derived conditions


def test_lowres_condition_shape_range_and_content():
    image = ShapesDataset(4, 32)[1][0]
    factor = 4
    condition = lowres_condition(image, factor)
    assert condition.shape == image.shape and condition.dtype == torch.float32
    assert condition.min() >= -1 and condition.max() <= 1

    def down(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x[None], size=(8, 8), mode="bicubic", antialias=True, align_corners=False)[0]

    assert psnr(down(condition), down(image)) > 30  # the low-resolution content is kept
    assert psnr(condition, image) < psnr(down(condition), down(image))  # the detail is gone
    with pytest.raises(ValueError, match="divisible"):
        lowres_condition(image, 5)


def test_coord_map_is_the_raster_position():
    coords = coord_map(3, 4)
    assert coords.shape == (1, 3, 4) and coords.dtype == torch.float32
    assert torch.allclose(coords.flatten(), torch.arange(12) / 12)
    assert coords[0, 2, 1] == pytest.approx((2 * 4 + 1) / 12)
    assert 0 <= coord_map(64, 64).min() and coord_map(64, 64).max() < 1


def test_derived_conditions_for_any_dataset():
    cfg = DataConfig(num_samples=6, image_size=16, condition="lowres", lowres_factor=2, random_flip=True)
    torch.manual_seed(0)
    for _ in range(4):
        image, condition, label = build_dataset(cfg)[3]
        assert torch.equal(condition, lowres_condition(image, 2)) and label == 3  # derived after the flip
    coord = DataConfig(num_samples=6, image_size=16, condition="coord", random_flip=True)
    for _ in range(4):
        image, condition, _ = build_dataset(coord)[1]
        assert torch.equal(condition, coord_map(16, 16))  # never flipped
    only = build_dataset(DataConfig(num_samples=6, image_size=16, condition="lowres", content="conditions"))
    condition, label = only[2]
    assert condition.shape == (3, 16, 16) and label == 2
    assert num_classes_of(only) == 10 and "lowres" in repr(only)


# ---------------------------------------------------------------- builtin label maps


def test_builtin_label_maps_follow_the_shapes():
    plain = ShapesDataset(24, 32, num_classes=12)
    labelled = ShapesDataset(24, 32, num_classes=12, segmentation=True)
    for i in range(24):
        image, mask, label = labelled[i]
        assert torch.equal(image, plain[i][0]) and label == plain[i][1]
        assert mask.shape == (1, 32, 32) and mask.dtype == torch.long
        assert set(mask.unique().tolist()) == {0, label + 1}
        luma = image.permute(1, 2, 0) @ torch.tensor(LUMA)
        on, off = luma[mask[0] > 0].median(), luma[mask[0] == 0].median()
        assert abs(on - off) > 0.5  # background and objects lie on opposite sides of the brightness range
        object_side = (luma > (on + off) / 2) == (on > off)
        assert (object_side == (mask[0] > 0)).float().mean() > 0.97, f"item {i}"


def test_builtin_label_maps_flip_with_the_image():
    labelled = ShapesDataset(4, 16, segmentation=True, augment=True)
    image, mask, _ = ShapesDataset(4, 16, segmentation=True)[1]
    torch.manual_seed(0)
    draws = [labelled[1] for _ in range(20)]
    for drawn_image, drawn_mask, _ in draws:
        flipped = not torch.equal(drawn_image, image)
        assert torch.equal(drawn_image, image.flip(-1) if flipped else image)
        assert torch.equal(drawn_mask, mask.flip(-1) if flipped else mask)
    assert len({bool(torch.equal(d[0], image)) for d in draws}) == 2


def test_builtin_segmentation_through_build_dataset():
    cfg = DataConfig(num_samples=5, image_size=16, num_classes=4, condition="segmentation", num_labels=5)
    dataset = build_dataset(cfg)
    image, mask, label = dataset[2]
    assert image.shape == (3, 16, 16) and mask.max() == label + 1 == 3 and num_classes_of(dataset) == 4
    mask_only, label = build_dataset(DataConfig(**(vars(cfg) | {"content": "conditions"})))[2]
    assert torch.equal(mask_only, mask) and label == 2


# ---------------------------------------------------------------- paired folders


def test_paired_segmentation(tmp_path):
    write_pair(tmp_path, "a", halves(), half_labels(left=1))
    save(tmp_path / "images" / "sub" / "b.jpeg", halves((16, 12)))  # any extension, in subfolders too
    save(tmp_path / "conditions" / "sub" / "b.png", half_labels((16, 12), left=2, right=1))
    dataset = build_dataset(paired_cfg(tmp_path), "train")
    assert len(dataset) == 2 and num_classes_of(dataset) == 0 and "segmentation" in repr(dataset)
    image, mask, label = dataset[0]
    assert image.shape == (3, 8, 8) and mask.shape == (1, 8, 8) and mask.dtype == torch.long and label == 0
    assert (mask[0, :, :4] == 1).all() and (mask[0, :, 4:] == 0).all()
    assert torch.allclose(image[:, 2, 1], torch.tensor([1.0, -1.0, -1.0]))
    _, mask, _ = dataset[1]
    assert set(mask.unique().tolist()) == {1, 2}


def test_nearest_resizing_keeps_only_valid_labels(tmp_path):
    stripes = np.zeros((13, 17), np.uint8)
    stripes[:, ::2] = 4  # neighbours 0 and 4: any blend would make 1..3
    write_pair(tmp_path, "a", Image.new("RGB", (17, 13)), label_map(stripes))
    _, mask, _ = build_dataset(paired_cfg(tmp_path, num_labels=5, image_size=8))[0]
    assert set(mask.unique().tolist()) == {0, 4}


def test_palette_maps_give_their_indices(tmp_path):
    palette = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255, 9, 9, 9] + [0] * 759)
    write_pair(tmp_path, "a", Image.new("RGB", (2, 2)), palette)
    _, mask, _ = build_dataset(paired_cfg(tmp_path, image_size=2))[0]
    assert mask[0].tolist() == [[0, 1], [2, 1]]


def test_paired_depth_8_and_16_bit(tmp_path):
    eight = np.zeros((8, 8), np.uint8)
    eight[:, 4:] = 255
    sixteen = np.full((8, 8), 0, np.uint16)
    sixteen[:, 4:] = 65535
    sixteen[:, :4] = 32768
    write_pair(tmp_path, "a", Image.new("RGB", (8, 8)), Image.fromarray(eight, mode="L"))
    write_pair(tmp_path, "b", Image.new("RGB", (8, 8)), Image.fromarray(sixteen))
    with Image.open(tmp_path / "conditions" / "b.png") as written:
        assert written.mode.startswith("I;16")
    dataset = build_dataset(paired_cfg(tmp_path, condition="depth", image_size=8))
    _, depth, _ = dataset[0]
    assert depth.dtype == torch.float32 and depth.shape == (1, 8, 8)
    assert (depth[0, :, :4] == -1).all() and (depth[0, :, 4:] == 1).all()
    _, depth, _ = dataset[1]
    assert torch.allclose(depth[0, :, :4], torch.tensor(32768 / 65535 * 2 - 1)) and (depth[0, :, 4:] == 1).all()
    _, small, _ = build_dataset(paired_cfg(tmp_path, condition="depth", image_size=4))[1]
    assert small.min() >= -1 and small.max() <= 1 and small.shape == (1, 4, 4)


def test_image_and_map_flip_together(tmp_path):
    write_pair(tmp_path, "a", halves((8, 8)), half_labels((8, 8), left=1))
    dataset = build_dataset(paired_cfg(tmp_path, random_flip=True), "train")
    assert dataset.augment
    torch.manual_seed(0)
    seen = set()
    for _ in range(20):
        image, mask, _ = dataset[0]
        red = image[0] > 0
        assert torch.equal(red, mask[0] == 1)
        seen.add(bool(red[0, 0]))
    assert seen == {True, False}


def test_paired_splits(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            write_pair(tmp_path / split, f"{i}", halves((8, 8)), half_labels((8, 8)))
    train, test = build_dataset(paired_cfg(tmp_path), "train"), build_dataset(paired_cfg(tmp_path), "test")
    assert len(train) == 3 and all(p.is_relative_to(tmp_path / "train" / "images") for p in train.paths)
    assert len(test) == 2 and all(p.is_relative_to(tmp_path / "val" / "conditions") for p in test.conditions)
    held = tmp_path / "held"
    for i in range(20):
        write_pair(held, f"{i:02d}", halves((8, 8)), half_labels((8, 8)))
    train, test = build_dataset(paired_cfg(held), "train"), build_dataset(paired_cfg(held), "test")
    assert (len(train), len(test)) == (18, 2) and not set(train.paths) & set(test.paths)
    assert [p.stem for p in test.paths] == [p.stem for p in test.conditions]


def test_missing_folders_name_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_dataset(paired_cfg(tmp_path / "nowhere"))
    save(tmp_path / "images" / "a.png", halves())
    with pytest.raises(DatasetNotFoundError, match="no conditions/ folder") as err:
        build_dataset(paired_cfg(tmp_path))
    assert str(tmp_path) in str(err.value) and "NAME.png" in str(err.value)
    other = tmp_path / "other"
    save(other / "conditions" / "a.png", half_labels())
    with pytest.raises(DatasetNotFoundError, match="no images/ folder"):
        build_dataset(paired_cfg(other))


def test_unpaired_files_are_listed(tmp_path):
    for i in range(8):
        save(tmp_path / "images" / f"{i}.png", halves())
    for i in (0, 1, 9):
        save(tmp_path / "conditions" / f"{i}.png", half_labels())
    with pytest.raises(DatasetFormatError) as err:
        build_dataset(paired_cfg(tmp_path))
    message = str(err.value)
    assert "6 image(s)" in message and "2.png, 3.png, 4.png, 5.png, 6.png and 1 more" in message
    assert "1 condition map(s)" in message and "9.png" in message and str(tmp_path / "conditions") in message
    twin = tmp_path / "twin"
    write_pair(twin, "a", halves(), half_labels())
    save(twin / "images" / "a.jpg", halves())
    with pytest.raises(DatasetFormatError, match="differ only in their extension"):
        build_dataset(paired_cfg(twin))


def test_bad_maps_name_the_file(tmp_path):
    write_pair(tmp_path, "a_range", halves(), half_labels(left=7))
    write_pair(tmp_path, "b_size", halves(), half_labels((10, 12)))
    write_pair(tmp_path, "c_rgb", halves(), halves())
    write_pair(tmp_path, "d_ok", halves(), half_labels())
    save(tmp_path / "conditions" / "e_broken.png", half_labels())
    (tmp_path / "conditions" / "e_broken.png").write_bytes(b"not a png")
    save(tmp_path / "images" / "e_broken.png", halves())
    dataset = build_dataset(paired_cfg(tmp_path), "test")
    names = [p.stem for p in dataset.paths]
    with pytest.raises(DatasetFormatError, match="holds label 7, but data.num_labels is 3") as err:
        dataset[names.index("a_range")]
    assert str(tmp_path / "conditions" / "a_range.png") in str(err.value) and "data.num_labels" in str(err.value)
    with pytest.raises(DatasetFormatError, match="is 12x12 but its condition map") as err:
        dataset[names.index("b_size")]
    assert "10x12" in str(err.value) and "b_size.png" in str(err.value)
    with pytest.raises(DatasetFormatError, match="8-bit grayscale PNG") as err:
        dataset[names.index("c_rgb")]
    assert str(tmp_path / "conditions" / "c_rgb.png") in str(err.value)
    with pytest.raises(BadImageError, match="e_broken.png"):
        dataset[names.index("e_broken")]
    depth = build_dataset(paired_cfg(tmp_path, condition="depth"), "test")
    with pytest.raises(DatasetFormatError, match="depth map must be single-channel"):
        depth[names.index("c_rgb")]


def test_skip_bad_images_skips_the_pair(tmp_path):
    write_pair(tmp_path, "a", halves(), half_labels())
    (tmp_path / "conditions" / "a.png").write_bytes(b"broken")
    write_pair(tmp_path, "b", halves(), half_labels(left=2))
    dataset = build_dataset(paired_cfg(tmp_path, skip_bad_images=True))
    with pytest.warns(UserWarning, match="a.png"):
        _, mask, _ = dataset[0]
    assert mask.max() == 2


def test_folder_conditions_choose_the_loader(tmp_path):
    write_pair(tmp_path, "a", halves(), half_labels())
    with pytest.raises(DatasetFormatError, match="would read as images"):
        build_dataset(paired_cfg(tmp_path, condition="lowres"))
    with pytest.raises(DatasetFormatError, match="would read as images"):
        build_dataset(paired_cfg(tmp_path, condition="none"))
    plain = tmp_path / "plain"
    save(plain / "images" / "a.png", halves((16, 16)))
    image, condition, label = build_dataset(paired_cfg(plain, condition="lowres", lowres_factor=2))[0]
    assert torch.equal(condition, lowres_condition(image, 2)) and label == 0


def test_fingerprint_covers_the_condition_maps(tmp_path):
    write_pair(tmp_path, "a", halves(), half_labels())
    before = folder_fingerprint(tmp_path)
    save(tmp_path / "conditions" / "a.png", half_labels(left=2, right=2))
    assert folder_fingerprint(tmp_path) != before


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(("options", "message"), [
    ({"condition": "lowres", "image_size": 30, "lowres_factor": 4}, "data.lowres_factor must be a divisor"),
    ({"lowres_factor": 0}, "data.lowres_factor must be positive"),
    ({"content": "conditions"}, "data.condition is none"),
    ({"condition": "segmentation", "name": "folder", "num_labels": 1}, "data.num_labels must be at least 2"),
    ({"condition": "segmentation", "num_labels": 5}, "num_classes \\+ 1 = 11"),
    ({"condition": "segmentation", "name": "mnist", "num_labels": 11}, "data.name=mnist does not have"),
    ({"condition": "depth"}, "data.name=builtin does not have"),
    ({"num_labels": -1}, "data.num_labels must be 0 or more"),
])
def test_condition_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        validate_data(DataConfig(**options))


def test_condition_and_input_channels():
    seg = DataConfig(condition="segmentation", num_labels=11)
    assert condition_channels(seg) == 11 and input_channels(seg) == 3
    assert input_channels(DataConfig(**(vars(seg) | {"content": "conditions"}))) == 11
    assert condition_channels(DataConfig(name="folder", condition="depth")) == 1
    assert condition_channels(DataConfig(condition="lowres", channels=1)) == 1
    assert condition_channels(DataConfig(condition="coord")) == 1 and condition_channels(DataConfig()) == 0
    for options in ({"condition": "lowres"}, {"condition": "coord"}):
        validate_data(DataConfig(name="cifar10", **options))


# ---------------------------------------------------------------- condition folders for sampling


def test_condition_folder_with_images_beside(tmp_path):
    write_pair(tmp_path, "a", halves(), half_labels(left=2))
    save(tmp_path / "conditions" / "deep" / "b.png", half_labels((6, 6)))
    conditions = condition_folder(tmp_path, "segmentation", 8, 3, num_labels=3)
    assert conditions.stems == ["a", "deep/b"] and len(conditions) == 2
    assert "1 with their images" in conditions.description
    mask, image, has_image = conditions[0]
    assert has_image and mask.dtype == torch.long and mask.max() == 2 and image[0, 0, 0] == 1
    mask, image, has_image = conditions[1]
    assert not has_image and torch.equal(image, torch.zeros(3, 8, 8)) and mask.shape == (1, 8, 8)
    save(tmp_path / "conditions" / "c.png", half_labels(left=5))
    conditions = condition_folder(tmp_path, "segmentation", 8, 3, num_labels=3)
    with pytest.raises(DatasetFormatError, match="holds label 5"):
        conditions[conditions.stems.index("c")]


def test_condition_folder_of_maps_only(tmp_path):
    save(tmp_path / "x.png", Image.fromarray(np.full((5, 5), 65535, np.uint16)))
    depth, image, has_image = condition_folder(tmp_path, "depth", 4, 1)[0]
    assert (depth == 1).all() and depth.shape == (1, 4, 4) and image.shape == (1, 4, 4) and not has_image


def test_condition_folder_lowres(tmp_path):
    save(tmp_path / "small.png", Image.new("RGB", (5, 7), (255, 0, 0)))
    condition, _, has_image = condition_folder(tmp_path, "lowres", 16, 3, lowres_factor=4)[0]
    assert condition.shape == (3, 16, 16) and not has_image
    assert torch.allclose(condition, torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16), atol=1e-5)
    derived = tmp_path / "derived"
    save(derived / "images" / "a.png", halves((16, 16)))
    conditions = condition_folder(derived, "lowres", 16, 3, lowres_factor=2)
    condition, image, has_image = conditions[0]
    assert has_image and torch.equal(condition, lowres_condition(image, 2)) and "derived" in conditions.description


def test_condition_folder_errors(tmp_path):
    with pytest.raises(DatasetFormatError, match="computed .* sample without --condition"):
        condition_folder(tmp_path, "coord", 8, 3)
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        condition_folder(tmp_path / "nowhere", "segmentation", 8, 3, num_labels=3)
    assert str(tmp_path / "nowhere") in str(err.value)
    (tmp_path / "conditions").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no condition maps found") as err:
        condition_folder(tmp_path, "depth", 8, 3)
    assert str(tmp_path / "conditions") in str(err.value)
