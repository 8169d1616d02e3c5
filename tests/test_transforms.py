"""Tests of case loading, its input checks and the dataset integrity check."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, ConcatItemsd, NormalizeIntensityd, Orientationd

from scripts.datalist import build_datalist
from scripts.phantom import generate_phantom_dataset
from scripts.transforms import InvalidCaseError, LoadCased, case_grid, check_dataset

MODALITIES = ["t1", "t2", "stir"]
SHAPE = (8, 7, 4)
SPACING_MM = (0.5, 0.5, 3.0)


def grid_affine(spacing=SPACING_MM, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, grid_affine() if affine is None else affine), str(path))
    return str(path)


def modality_array(index: int) -> np.ndarray:
    """Return a distinct float32 volume of SHAPE for modality ``index``."""
    return (np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 100.0 * index).astype(np.float32)


def label_array() -> np.ndarray:
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:5, 1:4, 1:3] = 1
    return label


@pytest.fixture()
def case(tmp_path: Path) -> dict[str, str]:
    """Return a valid three-modality case written under ``tmp_path/case``."""
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    entry = {
        modality: write_nifti(case_dir / f"{modality}.nii.gz", modality_array(i))
        for i, modality in enumerate(MODALITIES)
    }
    entry["label"] = write_nifti(case_dir / "label.nii.gz", label_array())
    return entry


def load_error(entry, **kwargs) -> str:
    """Return the message of the InvalidCaseError that LoadCased raises for ``entry``."""
    with pytest.raises(InvalidCaseError) as raised:
        LoadCased(MODALITIES, **kwargs)(entry)
    return str(raised.value)


def test_loads_per_modality(case):
    output = LoadCased(MODALITIES)(case)
    for index, modality in enumerate(MODALITIES):
        assert isinstance(output[modality], MetaTensor), modality
        assert output[modality].shape == (1, *SHAPE), modality
        assert output[modality].dtype == torch.float32, modality
        np.testing.assert_array_equal(output[modality][0].numpy(), modality_array(index))
    assert output["t2"].meta["filename_or_obj"] == case["t2"]
    np.testing.assert_allclose(output["t1"].affine.numpy(), grid_affine())


def test_label_float_binary(case):
    label = LoadCased(MODALITIES)(case)["label"]
    assert label.shape == (1, *SHAPE)
    assert label.dtype == torch.float32
    np.testing.assert_array_equal(label[0].numpy(), label_array())


def test_other_keys_pass_through(case):
    output = LoadCased(MODALITIES)({**case, "case": "case_7", "fold": 2})
    assert output["case"] == "case_7"
    assert output["fold"] == 2


def test_multichannel_matches_per_modality(case, tmp_path):
    stacked = np.stack([modality_array(i) for i in range(3)], axis=-1)  # (X, Y, Z, M) on disk
    image_path = write_nifti(tmp_path / "case_mc.nii.gz", stacked)
    per_modality = LoadCased(MODALITIES)(case)
    multi_channel = LoadCased(MODALITIES)({"image": image_path, "label": case["label"]})
    assert "image" not in multi_channel
    for modality in MODALITIES:
        assert torch.equal(multi_channel[modality].as_tensor(), per_modality[modality].as_tensor()), modality
        assert multi_channel[modality].meta["filename_or_obj"] == image_path, modality
    assert torch.equal(multi_channel["label"].as_tensor(), per_modality["label"].as_tensor())


def test_in_memory_arrays(case):
    loaded = LoadCased(MODALITIES)(case)
    output = LoadCased(MODALITIES)({key: loaded[key] for key in [*MODALITIES, "label"]})
    assert torch.equal(output["t2"].as_tensor(), loaded["t2"].as_tensor())


def test_missing_file_raises(case):
    case["t2"] = case["t2"].replace("t2.nii.gz", "t2_missing.nii.gz")
    message = load_error(case)
    assert case["t2"] in message
    assert "not found" in message


def test_missing_key_raises(case):
    del case["stir"]
    message = load_error(case)
    assert "no 'stir'" in message


def test_no_images_raises():
    message = load_error({"label": "x.nii.gz"})
    assert "neither the modality keys" in message


def test_corrupt_file_raises(case):
    data = Path(case["t1"]).read_bytes()
    Path(case["t1"]).write_bytes(data[: len(data) // 2])
    message = load_error(case)
    assert case["t1"] in message
    assert "could not be read" in message


def test_two_dimensional_image_raises(case, tmp_path):
    case["t2"] = write_nifti(tmp_path / "flat.nii.gz", modality_array(1)[:, :, 0])
    message = load_error(case)
    assert case["t2"] in message
    assert "shape (1, 8, 7)" in message


def test_multichannel_modality_file_raises(case, tmp_path):
    case["stir"] = write_nifti(tmp_path / "stir4d.nii.gz", np.zeros((*SHAPE, 2), dtype=np.float32))
    message = load_error(case)
    assert case["stir"] in message
    assert "2 channels (shape (2, 8, 7, 4))" in message


def test_nan_voxel_raises(case, tmp_path):
    array = modality_array(0)
    array[1, 2, 3] = np.nan
    case["t1"] = write_nifti(tmp_path / "nan.nii.gz", array)
    message = load_error(case)
    assert case["t1"] in message
    assert "1 NaN or infinite voxel" in message


def test_infinite_label_voxel_raises(case, tmp_path):
    label = label_array().astype(np.float32)
    label[0, 0, 0] = np.inf
    case["label"] = write_nifti(tmp_path / "inf.nii.gz", label)
    assert "1 NaN or infinite voxel" in load_error(case)


def test_label_value_two_raises(case, tmp_path):
    label = label_array()
    label[0, 0, 0] = 2
    case["label"] = write_nifti(tmp_path / "label2.nii.gz", label)
    message = load_error(case)
    assert case["label"] in message
    assert "[0, 1, 2]" in message
    assert "map every tumour class to 1" in message


def test_misaligned_spacing_raises(case, tmp_path):
    case["t2"] = write_nifti(tmp_path / "t2_spacing.nii.gz", modality_array(1), grid_affine(spacing=(0.6, 0.5, 3.0)))
    message = load_error(case)
    assert case["t2"] in message
    assert case["t1"] in message
    assert "spacing (0.6, 0.5, 3) mm differs" in message
    assert "resample_misaligned" in message


def test_misaligned_origin_raises(case, tmp_path):
    case["stir"] = write_nifti(tmp_path / "stir_origin.nii.gz", modality_array(2), grid_affine(origin=(0.0, 0.0, 1.5)))
    assert "origin (0, 0, 1.5) mm differs" in load_error(case)


def test_misaligned_shape_raises(case, tmp_path):
    case["label"] = write_nifti(tmp_path / "label_small.nii.gz", label_array()[:, :, :3])
    message = load_error(case)
    assert case["label"] in message
    assert "shape (8, 7, 3) differs from (8, 7, 4)" in message


def test_tolerance_accepts_small_offset(case, tmp_path):
    case["t2"] = write_nifti(tmp_path / "t2_offset.nii.gz", modality_array(1), grid_affine(origin=(0.0005, 0.0, 0.0)))
    output = LoadCased(MODALITIES)(case)
    assert output["t2"].shape == (1, *SHAPE)


def test_misaligned_resampled(case, tmp_path, caplog):
    # The same voxels stored with the X axis flipped: resampling must restore the original order exactly.
    flipped_affine = grid_affine()
    flipped_affine[0, 0] = -SPACING_MM[0]
    flipped_affine[0, 3] = (SHAPE[0] - 1) * SPACING_MM[0]
    case["t2"] = write_nifti(tmp_path / "t2_flipped.nii.gz", modality_array(1)[::-1].copy(), flipped_affine)
    case["label"] = write_nifti(tmp_path / "label_flipped.nii.gz", label_array()[::-1].copy(), flipped_affine)
    with caplog.at_level(logging.WARNING, logger="scripts.transforms"):
        output = LoadCased(MODALITIES, resample_misaligned=True)(case)
    np.testing.assert_allclose(output["t2"][0].numpy(), modality_array(1), atol=1e-3)
    np.testing.assert_array_equal(output["label"][0].numpy(), label_array())
    np.testing.assert_allclose(output["t2"].affine.numpy(), grid_affine())
    assert case["t2"] in caplog.text
    assert case["t1"] in caplog.text


def test_misaligned_spacing_resampled(case, tmp_path):
    case["t2"] = write_nifti(
        tmp_path / "t2_coarse.nii.gz", np.ones((4, 4, 4), dtype=np.float32), grid_affine(spacing=(1.0, 1.0, 3.0))
    )
    output = LoadCased(MODALITIES, resample_misaligned=True)(case)
    assert output["t2"].shape == (1, *SHAPE)
    assert case_grid(output["t2"]).spacing_mm.tolist() == list(SPACING_MM)


def test_multichannel_wrong_count_raises(case, tmp_path):
    image_path = write_nifti(tmp_path / "two_channels.nii.gz", np.zeros((*SHAPE, 2), dtype=np.float32))
    message = load_error({"image": image_path, "label": case["label"]})
    assert image_path in message
    assert "has 2 channels" in message
    assert "3 modalities" in message


def test_label_missing_allowed(case):
    del case["label"]
    output = LoadCased(MODALITIES)(case)
    assert "label" not in output


def test_label_missing_rejected(case):
    del case["label"]
    assert "no 'label'" in load_error(case, allow_missing_label=False)


def test_all_problems_reported(case, tmp_path):
    case["t1"] = case["t1"] + ".absent"
    case["label"] = write_nifti(tmp_path / "label3.nii.gz", label_array() * 3)
    with pytest.raises(InvalidCaseError) as raised:
        LoadCased(MODALITIES)(case)
    assert len(raised.value.problems) == 2
    assert case["t1"] in str(raised.value)
    assert case["label"] in str(raised.value)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="duplicate"):
        LoadCased(["t1", "t1"])
    with pytest.raises(ValueError, match="label_key 'label' is also a modality"):
        LoadCased(["t1", "label"])


def test_preprocessing_chain(case):
    # The start of the bundle's preprocessing: load, orient, normalise, stack.
    preprocessing = Compose(
        [
            LoadCased(MODALITIES),
            Orientationd(keys=[*MODALITIES, "label"], axcodes="RAS"),
            NormalizeIntensityd(keys=MODALITIES, nonzero=True),
            ConcatItemsd(keys=MODALITIES, name="image"),
        ]
    )
    output = preprocessing(case)
    assert output["image"].shape == (3, *SHAPE)
    assert output["label"].shape == (1, *SHAPE)


def test_phantom_round_trip(tmp_path):
    generate_phantom_dataset(tmp_path, num_cases=1, shape_xy=(64, 64), num_slices=6)
    entry = build_datalist(tmp_path, MODALITIES, num_folds=1)[0]
    output = LoadCased(MODALITIES)(entry)
    on_disk = np.asanyarray(nib.load(entry["stir"]).dataobj)
    np.testing.assert_array_equal(output["stir"][0].numpy(), on_disk)
    np.testing.assert_allclose(case_grid(output["t1"]).spacing_mm, [0.4, 0.4, 4.4], rtol=1e-6)


def test_check_dataset_lists_every_case(case, tmp_path):
    bad_nan = dict(case, case="bad_nan")
    array = modality_array(1)
    array[0, 0, 0] = np.nan
    bad_nan["t2"] = write_nifti(tmp_path / "t2_nan.nii.gz", array)
    bad_label = dict(case, case="bad_label", label=write_nifti(tmp_path / "label5.nii.gz", label_array() * 5))
    good = dict(case, case="good")
    with pytest.raises(ValueError) as raised:
        check_dataset([good, bad_nan, bad_label], MODALITIES)
    message = str(raised.value)
    assert "2 problem(s) in 2 of 3 case(s)" in message
    assert f"bad_nan: t2 file {bad_nan['t2']}" in message
    assert f"bad_label: label file {bad_label['label']}" in message
    assert "good:" not in message


def test_check_dataset_summary(case, caplog):
    empty_label = dict(case, case="empty")
    empty_label["label"] = write_nifti(Path(case["t1"]).parent / "empty.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    with caplog.at_level(logging.INFO, logger="scripts.transforms"):
        check_dataset([dict(case, case="a"), empty_label], MODALITIES)
    assert "dataset check passed: 2 cases, spacing from (0.5, 0.5, 3) to (0.5, 0.5, 3) mm" in caplog.text
    assert "shape from (8, 7, 4) to (8, 7, 4)" in caplog.text
    assert "1 case(s) have an empty label (no tumour): empty" in caplog.text


def test_sts_case_loads(sts_dir):
    case_dir = sts_dir / "STS_001"
    output = LoadCased(["t1"], allow_missing_label=False)(
        {"t1": str(case_dir / "t1.nii.gz"), "label": str(case_dir / "label.nii.gz")}
    )
    spacing = case_grid(output["t1"]).spacing_mm
    np.testing.assert_allclose(spacing, [0.977, 0.977, 3.27], atol=0.001)
    assert output["t1"].shape == (1, 174, 158, 59)
    assert set(torch.unique(output["label"]).tolist()) == {0.0, 1.0}


def test_brats_case_loads(brats_dir):
    entry = build_datalist(brats_dir, ["t1", "t2", "flair"], patient_pattern=r"^(brats_\d+)_p")[0]
    output = LoadCased(["t1", "t2", "flair"])(entry)
    for modality in ("t1", "t2", "flair"):
        assert output[modality].shape == (1, 160, 160, 16), modality
    assert output["label"].shape == (1, 160, 160, 16)
