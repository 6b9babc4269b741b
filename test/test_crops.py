"""data.crop_size: random crops in training and centre crops in evaluation, one crop for an image and its condition
map, coordinates of the whole image; stage 1 on crops, and a prior trained on windows of whole images' code grids
that samples the whole images' size."""

from pathlib import Path

import pytest
import torch
from tiny_training import STAGE1, STAGE2, write_config
from tiny_training import script_fails as fails

import generate
import train_transformer
import train_vqgan
from dataloader import build_dataset
from dataloader.crops import Crops
from dataloader.inputs import at_size
from dataloader.transforms import coord_map
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, DataConfig, validate_data


class Ramps(torch.utils.data.Dataset):
    """Items (image, condition, label): the image's pixels count up in raster order, the condition is the image * 2."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple:
        image = torch.arange(64, dtype=torch.float32).view(1, 8, 8) + 100 * index
        return image, image * 2, index


def test_crops_cut_the_image_and_its_condition_at_one_place():
    torch.manual_seed(0)
    crops = Crops(Ramps(), 3, random=True)
    corners = set()
    for _ in range(40):
        image, condition, label = crops[1]
        assert image.shape == (1, 3, 3) and torch.equal(condition, image * 2) and label == 1
        top, left = divmod(int(image[0, 0, 0]) - 100, 8)
        assert torch.equal(image, Ramps()[1][0][:, top:top + 3, left:left + 3])
        corners.add((top, left))
    assert len(corners) > 10 and all(0 <= top <= 5 and 0 <= left <= 5 for top, left in corners)
    image, _, _ = Crops(Ramps(), 4, random=False)[0]
    assert torch.equal(image, Ramps()[0][0][:, 2:6, 2:6])  # the centre


def test_build_dataset_crops_train_at_random_and_test_in_the_centre():
    data = DataConfig(num_samples=4, eval_samples=2, image_size=16, crop_size=8, condition="segmentation",
                      num_labels=11)
    whole = build_dataset(DataConfig(num_samples=4, eval_samples=2, image_size=16, condition="segmentation",
                                     num_labels=11), "test")
    image, mask, _ = build_dataset(data, "test")[0]
    assert image.shape == (3, 8, 8) and mask.shape == (1, 8, 8)
    assert torch.equal(image, whole[0][0][:, 4:12, 4:12]) and torch.equal(mask, whole[0][1][:, 4:12, 4:12])
    torch.manual_seed(0)
    train = build_dataset(data, "train")
    assert len({train[0][0].sum().item() for _ in range(10)}) > 1  # a new crop every time


def test_coordinates_are_positions_in_the_whole_image():
    data = DataConfig(num_samples=2, eval_samples=1, image_size=12, crop_size=4, condition="coord")
    _, coords, _ = build_dataset(data, "test")[0]
    assert torch.equal(coords, coord_map(12, 12)[:, 4:8, 4:8])


def test_crop_size_is_checked():
    with pytest.raises(ConfigError, match=r"data.crop_size.*from 1 to data.image_size \(16\)"):
        validate_data(DataConfig(image_size=16, crop_size=32))
    validate_data(DataConfig(image_size=16, crop_size=16))


def test_inputs_at_the_training_size_are_centre_crops_and_other_sizes_whole_images():
    data = DataConfig(image_size=64, crop_size=32)
    assert (at_size(data, 32, 1).image_size, at_size(data, 32, 1).crop_size) == (64, 32)
    assert (at_size(data, 128, 3).image_size, at_size(data, 128, 3).crop_size) == (128, None)


WHOLE, CROP = 24, 16  # pixels; tiny VQGANs have factor 2


def test_stage1_and_a_prior_train_on_crops_and_sample_whole_images(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    stage1 = write_config(tmp_path, "stage1", {**STAGE1, "data": {**STAGE1["data"], "image_size": WHOLE,
                                                                  "crop_size": CROP}})
    train_vqgan.main(["--config", str(stage1), "--run-dir", "vqgan", "train.max_steps=2"])
    vqgan = tmp_path / "vqgan" / "checkpoints" / "last.pt"
    assert load_checkpoint(vqgan)["model_config"]["resolution"] == CROP
    data = {**STAGE2["data"], "image_size": WHOLE, "crop_size": CROP}
    stage2 = write_config(tmp_path, "stage2", {**STAGE2, "data": data})
    train_transformer.main(["--config", str(stage2), "--vqgan", str(vqgan), "--run-dir", "prior",
                            "--token-cache", "cache", "train.max_steps=2"])
    tokens = torch.load(next((tmp_path / "cache").glob("*.pt")), weights_only=True)
    assert tokens["indices"].shape[1] == (WHOLE // 2) ** 2  # whole images, cropped in codes while training
    prior = tmp_path / "prior" / "checkpoints" / "last.pt"
    generate.main(["sample", "--checkpoint", str(prior), "--size", str(WHOLE), "--num", "2", "--out", "big"])
    assert (tmp_path / "big" / "000001.png").is_file()

    whole = write_config(tmp_path, "whole", {**STAGE2, "data": {**STAGE2["data"], "image_size": WHOLE}})
    err = fails(capsys, train_transformer.main, "--config", whole, "--vqgan", vqgan, "--run-dir", "x")
    assert f"data.image_size={WHOLE} but the stage-1 checkpoint" in err and f"trained on {CROP}px images" in err
    odd = write_config(tmp_path, "odd", {**STAGE2, "data": {**data, "image_size": WHOLE + 1}})
    err = fails(capsys, train_transformer.main, "--config", odd, "--vqgan", vqgan, "--run-dir", "y")
    assert "not a multiple of the VQGAN's downsampling factor 2" in err


def test_prior_windows_crop_the_condition_tokens_with_the_codes():
    class Tokenizer:
        downsample_factor, latent_size = 2, (2, 2)

    cfg = train_transformer.Stage2Config(data=DataConfig(image_size=8, crop_size=4))
    codes = torch.arange(32).view(2, 16)
    torch.manual_seed(0)
    windows = train_transformer.token_sequences(codes, codes + 100, Tokenizer(), cfg)
    seen = set()
    for _ in range(200):
        window, condition = windows[1]
        assert window.shape == (2, 2) and torch.equal(condition, window + 100)
        assert int(window[0, 1]) == int(window[0, 0]) + 1 and int(window[1, 0]) == int(window[0, 0]) + 4
        seen.add(int(window[0, 0]))
    assert seen == {16, 17, 18, 20, 21, 22, 24, 25, 26}
    labels = train_transformer.token_sequences(codes, torch.tensor([3, 4]), Tokenizer(), cfg)
    assert labels[0][1] == 3 and labels[0][0].shape == (2, 2)
