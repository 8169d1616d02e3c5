"""Tests of checkpoint lookup, the fit check before inference and keyed saving."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from scripts.checkpoints import KeyedStateDict, latest_checkpoint, require_checkpoint


def test_latest_checkpoint_takes_highest_step(tmp_path):
    for step in (2, 10, 9):
        (tmp_path / f"state_checkpoint_epoch={step}.pt").write_bytes(b"x")
    os.utime(tmp_path / "state_checkpoint_epoch=9.pt")  # newest file, lower step
    assert latest_checkpoint(tmp_path).endswith("state_checkpoint_epoch=10.pt")


def test_latest_checkpoint_missing_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match="resume to false"):
        latest_checkpoint(tmp_path)


def test_require_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="Train first"):
        require_checkpoint(tmp_path / "model.pt")


def test_require_checkpoint_accepts_matching_weights(tmp_path):
    network = nn.Conv3d(3, 2, 3)
    path = tmp_path / "model.pt"
    torch.save({"model": network.state_dict()}, path)
    assert require_checkpoint(path, nn.Conv3d(3, 2, 3)) == str(path)


def test_require_checkpoint_rejects_other_shape(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": nn.Conv3d(3, 2, 3).state_dict()}, path)
    with pytest.raises(ValueError, match=r"weight of shape \(2, 3, 3, 3, 3\), but the network expects \(2, 1, 3, 3, 3\)"):
        require_checkpoint(path, nn.Conv3d(1, 2, 3))


def test_require_checkpoint_rejects_missing_weights(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": nn.Conv3d(3, 2, 3, bias=False).state_dict()}, path)
    with pytest.raises(ValueError, match="no weights for bias"):
        require_checkpoint(path, nn.Conv3d(3, 2, 3))


def test_keyed_state_dict_round_trip():
    source, target = nn.Linear(4, 2), nn.Linear(4, 2)
    state = KeyedStateDict(model=source).state_dict()
    assert set(state) == {"model"}
    KeyedStateDict(model=target).load_state_dict(state)
    assert torch.equal(source.weight, target.weight)


def test_keyed_state_dict_unwraps_data_parallel():
    network = nn.Linear(4, 2)
    state = KeyedStateDict(model=nn.DataParallel(network)).state_dict()
    assert set(state["model"]) == {"weight", "bias"}
