"""Locate checkpoints for resuming training and for inference."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

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


def require_checkpoint(path: str | Path) -> str:
    """Return ``path`` as a string if the checkpoint file exists, else raise FileNotFoundError with the fix."""
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint} not found. Train first "
            "(python -m monai.bundle run training --config_file configs/train.yaml), "
            "or set ckpt_path to a checkpoint whose weights are stored under the key 'model'."
        )
    return str(checkpoint)


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
