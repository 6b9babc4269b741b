"""utils/checkpoint.py: atomic writes, safe loading with clear errors, strict weight loading, RNG state."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import utils.checkpoint as checkpoint
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    remove_stale_temp_files,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)


class Payload:
    """Unpickling this would run a shell command: the code execution that loading must never allow."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def small_state(value: float = 1.0) -> dict:
    return training_checkpoint("vqgan", 3, {"train": {"lr": 0.1}}, model={"w": torch.full((2, 2), value)},
                               model_config={})


def test_round_trip_holds_plain_values_only(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(small_state(), path)
    plain = torch.load(path, weights_only=True)
    assert plain["kind"] == "vqgan" and plain["step"] == 3 and plain["config"] == {"train": {"lr": 0.1}}
    assert torch.equal(load_checkpoint(path, kind="vqgan")["model"]["w"], torch.ones(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_failed_write_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(small_state(1.0), path)

    def dies_half_way(state: dict, handle) -> None:
        handle.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(CheckpointError, match="No space left on device.*Free disk space.*intact"):
        save_checkpoint(small_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2, 2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".last.pt.tmp4242"
    stale.write_bytes(b"PK\x03\x04 cut")
    save_checkpoint(small_state(), tmp_path / "last.pt")
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty, so it is not a checkpoint"),
    (b"a text file\n", "is not a file written by torch.save"),
])
def test_files_that_are_not_checkpoints(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist.*checkpoints/last.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(small_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*previous periodic checkpoint"):
        load_checkpoint(path)


def test_torch_file_of_another_kind(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project.*train_vqgan.py"):
        load_checkpoint(path)


def test_wrong_stage_names_both_kinds(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint(small_state(), path)
    with pytest.raises(CheckpointError, match="is a stage-1 \\(VQGAN\\) checkpoint.*stage-2 \\(GPT prior\\).*needed"):
        load_checkpoint(path, kind="transformer")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_checkpoint({**small_state(), "format_version": checkpoint.FORMAT_VERSION + 1}, path)
    with pytest.raises(CheckpointError, match="newer than this code reads"):
        load_checkpoint(path)


def test_checkpoint_that_needs_code_to_unpickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save({"kind": "vqgan", "model": {}, "extra": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused for safety.*it asks to import posix.system"):
        load_checkpoint(path)
    assert not marker.exists()

    module_path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), module_path)
    with pytest.raises(CheckpointError, match="refused for safety.*re-save a plain dict"):
        load_checkpoint(module_path)


def test_mismatched_weights_list_every_key_and_shape() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    weights = nn.Sequential(nn.Linear(4, 5), nn.Linear(3, 2)).state_dict()
    del weights["1.bias"]
    weights["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(model, weights, "ck.pt")
    message = str(info.value)
    assert "missing: 1.bias" in message and "unexpected: 2.weight" in message
    assert "0.weight: checkpoint (5, 4) vs model (3, 4)" in message
    assert "0.bias: checkpoint (5,) vs model (3,)" in message
    assert "config the checkpoint was trained with" in message

    reference = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    load_state_dict_checked(model, reference.state_dict(), "ck.pt")
    assert torch.equal(model[0].weight, reference[0].weight)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    torch.manual_seed(1)
    path = tmp_path / "rng.pt"
    save_checkpoint(small_state(), path)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(2)
    random.seed(2)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (torch.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and expected[1] == got[1]


@pytest.mark.parametrize("change, expected", [
    ({"config": None}, "'config' (missing)"),
    ({"step": "3"}, "'step' (a str)"),
    ({"model_config": [1]}, "'model_config' (a list)"),
    ({"kind": "mystery"}, "names its kind 'mystery'"),
])
def test_checkpoints_are_checked_as_a_whole(tmp_path: Path, change: dict, expected: str) -> None:
    state = small_state()
    state.update(change)
    state = {k: v for k, v in state.items() if v is not None}
    save_checkpoint(state, tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_checkpoint(tmp_path / "ck.pt")


def test_resuming_needs_the_optimizer_and_rng_states(tmp_path: Path) -> None:
    save_checkpoint(small_state(), tmp_path / "ck.pt")
    assert load_checkpoint(tmp_path / "ck.pt")["step"] == 3
    with pytest.raises(CheckpointError, match="incomplete: 'disc' \\(missing\\), 'opt_ae'.*Resuming needs"):
        load_checkpoint(tmp_path / "ck.pt", resume=True)
