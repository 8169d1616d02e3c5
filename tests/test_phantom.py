"""Tests of the synthetic parotid MRI generator."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from scripts.phantom import (
    DEFAULT_SPACING_MM,
    DISTRACTOR_MARGIN_MM,
    Tissue,
    ensure_phantom_dataset,
    generate_phantom_case,
    generate_phantom_dataset,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"shape_xy": (96, 96), "num_slices": 12}
TINY = {"shape_xy": (64, 64), "num_slices": 6}
SEEDS = [0, 1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def cases():
    """Return phantom cases of the default grid for several seeds, with FLAIR too."""
    return {seed: generate_phantom_case(seed, modalities=("t1", "t2", "stir", "flair")) for seed in SEEDS}


def test_case_same_seed_identical():
    first = generate_phantom_case(7, **SMALL)
    second = generate_phantom_case(7, **SMALL)
    for modality in ("t1", "t2", "stir"):
        assert first.images[modality].tobytes() == second.images[modality].tobytes()
    assert first.label.tobytes() == second.label.tobytes()
    assert first.tissue_map.tobytes() == second.tissue_map.tobytes()


def test_case_different_seed_differs():
    first = generate_phantom_case(7, **SMALL)
    second = generate_phantom_case(8, **SMALL)
    assert not np.array_equal(first.images["t1"], second.images["t1"])
    assert not np.array_equal(first.label, second.label)


def test_case_anatomy_independent_of_modalities():
    three = generate_phantom_case(7, modalities=("t1", "t2", "stir"), **SMALL)
    stir_only = generate_phantom_case(7, modalities=("stir",), **SMALL)
    np.testing.assert_array_equal(three.tissue_map, stir_only.tissue_map)
    np.testing.assert_array_equal(three.label, stir_only.label)


def test_case_default_grid(cases):
    case = cases[0]
    num_slices = case.label.shape[2]
    assert case.label.shape[:2] == (192, 192)
    assert 12 <= num_slices <= 24
    assert case.spacing_mm == DEFAULT_SPACING_MM
    for modality, image in case.images.items():
        assert image.shape == case.label.shape, modality
        assert image.dtype == np.float32, modality
    assert case.label.dtype == np.uint8
    np.testing.assert_allclose(np.diag(case.affine), [0.4, 0.4, 4.4, 1.0])
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")


def test_case_affine_centres_volume():
    case = generate_phantom_case(0, shape_xy=(100, 90), num_slices=14)
    assert case.label.shape == (100, 90, 14)
    centre_voxel = np.array([99 / 2, 89 / 2, 13 / 2, 1.0])
    np.testing.assert_allclose(case.affine @ centre_voxel, [0.0, 0.0, 0.0, 1.0], atol=1e-12)


def test_case_slice_count_varies(cases):
    slice_counts = {case.label.shape[2] for case in cases.values()}
    assert len(slice_counts) > 1


def test_label_binary_and_nonempty(cases):
    for seed, case in cases.items():
        assert set(np.unique(case.label).tolist()) == {0, 1}, seed


def test_label_is_tumour_tissue(cases):
    for seed, case in cases.items():
        np.testing.assert_array_equal(case.label == 1, case.tissue_map == Tissue.TUMOUR, err_msg=f"seed {seed}")


def test_tumour_diameter_range(cases):
    for seed, case in cases.items():
        assert 5.0 <= case.tumour_diameter_mm <= 35.0, seed
        assert case.tumour_volume_cc > 0.0, seed


@pytest.mark.parametrize(
    ("modality", "tumour_brighter"), [("t1", False), ("t2", True), ("stir", True), ("flair", True)]
)
def test_tumour_contrast_direction(cases, modality, tumour_brighter):
    for seed, case in cases.items():
        image = case.images[modality]
        tumour_mean = image[case.label == 1].mean()
        gland_mean = image[case.tissue_map == Tissue.GLAND].mean()
        assert (tumour_mean > gland_mean) == tumour_brighter, f"seed {seed}: tumour {tumour_mean}, gland {gland_mean}"


@pytest.mark.parametrize("tissue", [Tissue.MUSCLE, Tissue.VESSEL])
def test_distractors_away_from_tumour(cases, tissue):
    for seed, case in cases.items():
        distance_mm = ndimage.distance_transform_edt(case.label == 0, sampling=case.spacing_mm)
        mask = case.tissue_map == tissue
        assert mask.any(), f"seed {seed}: no {tissue.name}"
        assert distance_mm[mask].min() >= DISTRACTOR_MARGIN_MM, f"seed {seed}"


@pytest.mark.parametrize(
    ("tissue", "modality"),
    [(Tissue.MUSCLE, "t1"), (Tissue.VESSEL, "t2"), (Tissue.VESSEL, "stir"), (Tissue.VESSEL, "flair")],
)
def test_distractors_tumour_like(cases, tissue, modality):
    # Tumour-like: the distractor's mean is closer to the tumour's than the gland's is.
    for seed, case in cases.items():
        image = case.images[modality]
        tumour_mean = image[case.label == 1].mean()
        distractor_mean = image[case.tissue_map == tissue].mean()
        gland_mean = image[case.tissue_map == Tissue.GLAND].mean()
        assert abs(distractor_mean - tumour_mean) < abs(gland_mean - tumour_mean), f"seed {seed}"


def test_background_is_dark(cases):
    case = cases[0]
    air = case.tissue_map == Tissue.AIR
    gland = case.tissue_map == Tissue.GLAND
    assert case.images["t2"][air].mean() < 0.2 * case.images["t2"][gland].mean()


def test_unknown_modality_raises():
    with pytest.raises(ValueError, match="'dwi'"):
        generate_phantom_case(0, modalities=("t1", "dwi"), **TINY)


def test_small_field_of_view_raises():
    with pytest.raises(ValueError, match="increase shape_xy or spacing_mm"):
        generate_phantom_case(0, shape_xy=(40, 40), spacing_mm=(0.4, 0.4, 4.4))


def test_invalid_shape_raises():
    with pytest.raises(ValueError, match="shape_xy"):
        generate_phantom_case(0, shape_xy=(96,), num_slices=8)


def test_dataset_files_and_types(tmp_path):
    case_dirs = generate_phantom_dataset(tmp_path / "data", num_cases=2, seed=1, **TINY)
    assert [path.name for path in case_dirs] == ["phantom_000", "phantom_001"]
    assert sorted(path.name for path in case_dirs[0].iterdir()) == [
        "label.nii.gz",
        "stir.nii.gz",
        "t1.nii.gz",
        "t2.nii.gz",
    ]
    image = nib.load(case_dirs[0] / "t2.nii.gz")
    label = nib.load(case_dirs[0] / "label.nii.gz")
    assert image.get_data_dtype() == np.float32
    assert label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(image.header.get_zooms(), DEFAULT_SPACING_MM, rtol=1e-6)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    assert int(image.header["sform_code"]) == 1


def test_dataset_deterministic(tmp_path):
    first = generate_phantom_dataset(tmp_path / "a", num_cases=2, seed=3, **TINY)
    second = generate_phantom_dataset(tmp_path / "b", num_cases=1, seed=3, **TINY)
    for name in ("t1.nii.gz", "label.nii.gz"):
        first_array = np.asanyarray(nib.load(first[0] / name).dataobj)
        second_array = np.asanyarray(nib.load(second[0] / name).dataobj)
        assert first_array.tobytes() == second_array.tobytes(), name


def test_dataset_seed_changes_cases(tmp_path):
    first = generate_phantom_dataset(tmp_path / "a", num_cases=1, seed=3, **TINY)
    second = generate_phantom_dataset(tmp_path / "b", num_cases=1, seed=4, **TINY)
    first_array = np.asanyarray(nib.load(first[0] / "t1.nii.gz").dataobj)
    second_array = np.asanyarray(nib.load(second[0] / "t1.nii.gz").dataobj)
    assert not np.array_equal(first_array, second_array)


def test_dataset_leaves_no_temporary_files(tmp_path):
    generate_phantom_dataset(tmp_path, num_cases=1, **TINY)
    leftovers = [path for path in tmp_path.rglob("*") if path.name.startswith(".")]
    assert leftovers == []


def test_ensure_generates_when_absent(tmp_path, caplog):
    dataset_dir = tmp_path / "phantom"
    with caplog.at_level(logging.INFO, logger="scripts.phantom"):
        returned = ensure_phantom_dataset(dataset_dir, num_cases=2, **TINY)
    assert returned == dataset_dir
    assert sorted(path.name for path in dataset_dir.iterdir()) == ["phantom_000", "phantom_001"]
    assert "generated 2 phantom cases" in caplog.text


def test_ensure_generates_once(tmp_path):
    dataset_dir = tmp_path / "phantom"
    ensure_phantom_dataset(dataset_dir, num_cases=1, **TINY)
    label_path = dataset_dir / "phantom_000" / "label.nii.gz"
    first_mtime = label_path.stat().st_mtime_ns
    ensure_phantom_dataset(dataset_dir, num_cases=3, **TINY)
    assert label_path.stat().st_mtime_ns == first_mtime
    assert sorted(path.name for path in dataset_dir.iterdir()) == ["phantom_000"]


def test_ensure_fills_empty_folder(tmp_path):
    dataset_dir = tmp_path / "phantom"
    dataset_dir.mkdir()
    ensure_phantom_dataset(dataset_dir, num_cases=1, **TINY)
    assert (dataset_dir / "phantom_000" / "t1.nii.gz").is_file()


def test_ensure_leaves_existing_folder(tmp_path, caplog):
    dataset_dir = tmp_path / "real"
    dataset_dir.mkdir()
    (dataset_dir / "notes.txt").write_text("my data\n")
    with caplog.at_level(logging.INFO, logger="scripts.phantom"):
        ensure_phantom_dataset(dataset_dir, num_cases=1, **TINY)
    assert sorted(path.name for path in dataset_dir.iterdir()) == ["notes.txt"]
    assert "not empty" in caplog.text


def test_ensure_concurrent_calls(tmp_path):
    dataset_dir = tmp_path / "phantom"
    errors = []

    def call() -> None:
        try:
            ensure_phantom_dataset(dataset_dir, num_cases=2, **TINY)
        except Exception as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["phantom"]
    assert sorted(path.name for path in dataset_dir.iterdir()) == ["phantom_000", "phantom_001"]


def test_cli_writes_cases(tmp_path):
    command = [
        sys.executable, "-m", "scripts.phantom", "--output_dir", str(tmp_path / "out"), "--num_cases", "1",
        "--seed", "2", "--shape_xy", "64", "64", "--num_slices", "6", "--modalities", "t1", "flair",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written = sorted(path.name for path in (tmp_path / "out" / "phantom_000").iterdir())
    assert written == ["flair.nii.gz", "label.nii.gz", "t1.nii.gz"]
