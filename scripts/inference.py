"""Case selection and the tumour-volume record of the inference workflow."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.utils import ImageMetaKey

from scripts.datalist import case_from_path, load_datalist
from scripts.evaluation import tumour_volume_cc, write_text_atomic
from scripts.losses import spacing_from_affine

logger = logging.getLogger(__name__)

__all__ = ["TumourVolumeHandler", "select_cases"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _case_from_folder(folder: Path, modalities: Sequence[str]) -> dict[str, Any]:
    """Return a datalist entry for one case folder ``<case>/<modality>.nii[.gz]`` (label optional)."""
    entry: dict[str, Any] = {"case": folder.name}
    for key in [*modalities, "label"]:
        found = [folder / f"{key}{suffix}" for suffix in NIFTI_SUFFIXES if (folder / f"{key}{suffix}").is_file()]
        if found:
            entry[key] = str(found[0])
        elif key != "label":
            raise FileNotFoundError(
                f"Case folder {folder} has no {key}.nii.gz (or {key}.nii); every case needs one file per "
                f"modality {list(modalities)}, or pass one multi-channel NIfTI file as the case."
            )
    return entry


def select_cases(
    source: str | os.PathLike | None,
    modalities: Sequence[str],
    case: str | os.PathLike | None = None,
    fold: int | None = None,
    num_folds: int = 5,
    patient_pattern: str | None = None,
    seed: int = 0,
    require_label: bool = False,
) -> list[dict[str, Any]]:
    """Return the datalist entries to segment.

    Args:
        source: a folder of case folders or an MSD-style datalist JSON; ignored when
            ``case`` is given.
        modalities: modality file stems in channel order.
        case: one case to segment instead: a case folder with one file per modality,
            or one NIfTI file (multi-channel, channels in modality order, or the single
            modality of a one-modality model).
        fold: segment only the cases of this fold (for example the held-out fold of
            a training run, with the same ``num_folds``, ``patient_pattern`` and
            ``seed``); None segments every case.
        require_label: raise unless every selected case has a ``label`` (evaluation).

    Raises:
        FileNotFoundError: ``case`` or ``source`` does not exist.
        ValueError: no case is selected.
    """
    if case is not None:
        path = Path(case)
        if path.is_dir():
            cases = [_case_from_folder(path, modalities)]
        elif path.is_file():
            key = modalities[0] if len(modalities) == 1 else "image"
            cases = [{"case": case_from_path(path, modalities), key: str(path)}]
        else:
            raise FileNotFoundError(f"Case {path} not found; pass a case folder or a NIfTI file.")
        _check_labels(cases, require_label)
        return cases

    if source is None:
        raise ValueError("Nothing to segment: set dataset_dir or datalist, or pass case=<folder or file>.")
    cases = load_datalist(
        source,
        modalities,
        num_folds=num_folds,
        patient_pattern=patient_pattern,
        seed=seed,
        require_label=require_label,
    )
    if fold is not None and fold >= 0:
        cases = [entry for entry in cases if entry.get("fold") == fold]
    if not cases:
        raise ValueError(f"No case selected from {source} (fold {fold}); check the path and the fold.")
    _check_labels(cases, require_label)
    logger.info("Segmenting %d case(s) from %s", len(cases), source)
    return cases


def _check_labels(cases: Sequence[dict[str, Any]], require_label: bool) -> None:
    """Raise ValueError naming the cases without a label when labels are required."""
    missing = [str(entry.get("case", index)) for index, entry in enumerate(cases) if "label" not in entry]
    if require_label and missing:
        raise ValueError(
            f"Evaluation needs a label for every case; no label.nii.gz for: {', '.join(missing)}. "
            "Add the labels or run configs/inference.yaml alone."
        )


class TumourVolumeHandler:
    """Record the predicted tumour volume of every case segmented by an evaluator.

    After each iteration it reads ``engine.state.output`` (the decollated
    samples, after postprocessing has inverted the preprocessing) and computes
    the tumour volume in cubic centimetres from the class-index mask ``pred``
    (1, X, Y, Z) and the voxel spacing of its affine. Each case is logged as one
    line; when the run completes, ``<output_dir>/volumes.csv`` is written
    atomically with the columns case, tumour_volume_cc, tumour_voxels, mask_file.

    Args:
        output_dir: folder of the CSV.
        modalities: modality file stems, so that ``<case>/t1.nii.gz`` is named ``<case>``.
        pred_key: key of the class-index mask in each output sample.
        filename: name of the CSV.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        modalities: Sequence[str] = (),
        pred_key: str = "pred",
        filename: str = "volumes.csv",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.modalities = tuple(modalities)
        self.pred_key = pred_key
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.rows = []

    def iteration_completed(self, engine: Engine) -> None:
        samples = engine.state.output
        if isinstance(samples, dict):
            samples = [samples]
        for sample in samples:
            mask = sample[self.pred_key]
            if not isinstance(mask, MetaTensor):
                raise TypeError(f"'{self.pred_key}' must be a MetaTensor with an affine, got {type(mask).__name__}.")
            spacing_mm = spacing_from_affine(torch.as_tensor(mask.affine)).tolist()
            source = mask.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "")
            case = case_from_path(source, self.modalities) if source else f"case_{len(self.rows)}"
            tumour = mask[0] > 0.5 if mask.shape[0] == 1 else mask.argmax(0) == 1
            row = {
                "case": case,
                "tumour_volume_cc": tumour_volume_cc(tumour, spacing_mm),
                "tumour_voxels": int(tumour.sum()),
                "mask_file": mask.meta.get("saved_to", ""),
            }
            self.rows.append(row)
            logger.info("%s: tumour volume %.3f cc (%d voxels)", case, row["tumour_volume_cc"], row["tumour_voxels"])

    def completed(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["case", "tumour_volume_cc", "tumour_voxels", "mask_file"])
        writer.writeheader()
        writer.writerows(self.rows)

        write_text_atomic(self.output_dir / self.filename, buffer.getvalue())
        logger.info("Segmented %d case(s); masks and %s are in %s", len(self.rows), self.filename, self.output_dir)
