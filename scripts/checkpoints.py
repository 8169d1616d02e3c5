"""Locate checkpoints for resuming training and for inference."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["KeyedStateDict", "latest_checkpoint", "require_checkpoint"]

_STEP_PATTERN = re.compile(r"=(\d+)\.pt$")


def latest_checkpoint(directory: str | Path, prefix: str = "state") -> str:
    """Return the path of the newest ``<prefix>*.pt`` in ``directory``.

    Checkpoints written by MONAI's ``CheckpointSaver`` end in ``=<step>.pt``;
    the highest step wins, and the modification time breaks ties.

    Raises:
        FileNotFoundError: no such checkpoint exists, naming the folder and the fix.
    """
    folder = Path(directory)
    candidates = sorted(folder.glob(f"{prefix}*.pt"))
    if not candidates:
        raise FileNotFoundError(
            f"No training state '{prefix}*.pt' found in {folder} to resume from; "
            "set resume to false to start a new run, or output_dir to the folder of the run to resume."
        )

    def step_and_time(path: Path) -> tuple[int, float]:
        match = _STEP_PATTERN.search(path.name)
        return (int(match.group(1)) if match else -1, path.stat().st_mtime)

    newest = max(candidates, key=step_and_time)
    logger.info("Resuming from %s", newest)
    return str(newest)


def require_checkpoint(path: str | Path, network: nn.Module | None = None, key: str = "model") -> str:
    """Return ``path`` as a string after checking that the checkpoint exists and fits ``network``.

    With ``network``, the weights under ``key`` must have the network's parameter
    names and shapes, so that a checkpoint trained with other modalities or
    another network size stops here with the fix instead of deep in loading.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the weights do not fit ``network``, naming the first differing parameter.
    """
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint} not found. Train first "
            "(python -m monai.bundle run training --config_file configs/train.yaml), "
            "or set ckpt_path to a checkpoint whose weights are stored under the key 'model'."
        )
    if network is not None:
        _check_weights_fit(checkpoint, network, key)
    return str(checkpoint)


def _check_weights_fit(checkpoint: Path, network: nn.Module, key: str) -> None:
    """Raise ValueError when the checkpoint's weights do not match ``network``'s parameters."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = state.get(key, state) if isinstance(state, dict) else state
    expected = network.module.state_dict() if hasattr(network, "module") else network.state_dict()

    hint = (
        "The network config (modalities, embed_dim, num_heads, window_size) must match the training run: "
        "merge the same configs, e.g. configs/quick.yaml for quick-profile weights, and pass the same --modalities."
    )
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"Checkpoint {checkpoint} has no weights for {missing[0]} ({len(missing)} missing). {hint}")
    for name, tensor in expected.items():
        if tuple(weights[name].shape) != tuple(tensor.shape):
            raise ValueError(
                f"Checkpoint {checkpoint} contains {name} of shape {tuple(weights[name].shape)}, "
                f"but the network expects {tuple(tensor.shape)}. {hint}"
            )


class KeyedStateDict:
    """Group modules so that a checkpoint stores each state dict under its own key.

    Ignite's ``Checkpoint`` (0.5) saves the bare state dict when it is given one
    object, so ``CheckpointSaver(save_dict={"model": network})`` writes the
    weights without the ``model`` key. Saving ``{"model": KeyedStateDict(model=network)}``
    instead writes ``{"model": weights}``, the layout the model zoo and
    ``CheckpointLoader(load_dict={"model": network})`` expect. Wrapped
    ``DistributedDataParallel`` or ``DataParallel`` modules are saved without the
    ``module.`` prefix.
    """

    def __init__(self, **modules: nn.Module) -> None:
        if not modules:
            raise ValueError("KeyedStateDict needs at least one module, e.g. KeyedStateDict(model=network).")
        self.modules = modules

    @staticmethod
    def _unwrap(module: nn.Module) -> nn.Module:
        if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            return module.module
        return module

    def state_dict(self) -> dict[str, Any]:
        return {name: self._unwrap(module).state_dict() for name, module in self.modules.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, module in self.modules.items():
            self._unwrap(module).load_state_dict(state[name])
