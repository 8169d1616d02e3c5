"""Training and inference on real MRI: MSD BraTS crops (three modalities) and soft-tissue sarcoma T1.

The sets are found as tests/conftest.py describes; each test skips with the
reason when they are absent. Training runs a few dozen iterations of the quick profile, so
the checks are about geometry and that the mask finds the tumour, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_workflows import INFER, TRAIN, run_bundle

pytestmark = pytest.mark.slow


def write_datalist(path: Path, cases: list[tuple[Path, int]], modalities: list[str]) -> Path:
    """Write an MSD-style datalist of the given case folders with their folds."""
    entries = []
    for case_dir, fold in cases:
        entry = {modality: str(case_dir / f"{modality}.nii.gz") for modality in modalities}
        entry.update({"label": str(case_dir / "label.nii.gz"), "fold": fold, "case": case_dir.name})
        entries.append(entry)
    path.write_text(json.dumps({"training": entries}, indent=2))
    return path


def train_and_segment(tmp_path: Path, datalist: Path, modalities: list[str], case_dir: Path, iterations: int) -> Path:
    """Train on fold 0 of the datalist (fold 1 validates), segment ``case_dir`` and return the written mask path."""
    modality_list = "[" + ",".join(f"'{m}'" for m in modalities) + "]"
    common = ["--bundle_root", str(tmp_path), "--modalities", modality_list, "--datalist", str(datalist)]
    run_bundle(
        "run", "training", "--config_file", TRAIN, *common,
        "--fold", "1", "--max_epochs", "2", "--iterations_per_epoch", str(iterations // 2), "--val_interval", "2",
    )
    output_dir = tmp_path / "inference"
    run_bundle("run", "--config_file", INFER, *common, "--case", str(case_dir), "--output_dir", str(output_dir))
    return output_dir / case_dir.name / f"{case_dir.name}_seg.nii.gz"


def check_mask(mask_path: Path, case_dir: Path) -> None:
    """The mask has the input's grid, finds part of the tumour and is not the whole volume."""
    reference = nib.load(case_dir / "t1.nii.gz")
    mask_image = nib.load(mask_path)
    assert mask_image.shape == reference.shape
    assert np.allclose(mask_image.affine, reference.affine, atol=1e-4)

    mask = np.asarray(mask_image.dataobj) > 0
    label = np.asarray(nib.load(case_dir / "label.nii.gz").dataobj) > 0
    assert (mask & label).sum() > 0, "the mask does not overlap the tumour"
    assert mask.mean() < 0.5, "the mask covers most of the volume"


def test_brats_three_modalities(brats_dir, tmp_path):
    modalities = ["t1", "t2", "flair"]
    training = [(brats_dir / f"brats_009_p{index:02d}", 0) for index in (1, 2, 3)]
    validation = [(brats_dir / "brats_119_p01", 1)]
    datalist = write_datalist(tmp_path / "datalist.json", training + validation, modalities)
    mask_path = train_and_segment(tmp_path, datalist, modalities, brats_dir / "brats_119_p01", iterations=100)
    check_mask(mask_path, brats_dir / "brats_119_p01")


def test_sts_single_modality(sts_dir, tmp_path):
    training = [(sts_dir / name, 0) for name in ("STS_002", "STS_003", "STS_004")]
    validation = [(sts_dir / "STS_001", 1)]
    datalist = write_datalist(tmp_path / "datalist.json", training + validation, ["t1"])
    mask_path = train_and_segment(tmp_path, datalist, ["t1"], sts_dir / "STS_001", iterations=40)

    reference = nib.load(sts_dir / "STS_001" / "t1.nii.gz")
    mask_image = nib.load(mask_path)
    assert mask_image.shape == reference.shape
    assert np.allclose(mask_image.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask_image.dataobj))) <= {0, 1}
