"""Tests of datalist building, patient-grouped folds and fold splitting."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.datalist import (
    build_datalist,
    case_from_path,
    load_datalist,
    patient_from_case,
    split_by_fold,
    write_datalist,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ["t1", "t2", "stir"]
PATTERN = r"^(pat\d+)_s"


def write_case(case_dir: Path, names=("t1", "t2", "stir", "label"), suffix=".nii.gz") -> None:
    """Write tiny NIfTI files ``<case_dir>/<name><suffix>``."""
    case_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), dtype=np.float32), np.eye(4)), str(case_dir / f"{name}{suffix}"))


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """Return a folder of 6 patients with 2 cases each, ``pat<P>_s<S>``."""
    for patient in range(6):
        for scan in range(2):
            write_case(tmp_path / "data" / f"pat{patient}_s{scan}")
    return tmp_path / "data"


def folds_per_patient(datalist):
    folds = defaultdict(set)
    for entry in datalist:
        folds[entry["patient"]].add(entry["fold"])
    return folds


def test_build_entry_keys_and_paths(dataset):
    datalist = build_datalist(dataset, MODALITIES)
    entry = datalist[0]
    assert list(entry) == ["case", "patient", "fold", "t1", "t2", "stir", "label"]
    assert entry["case"] == "pat0_s0"
    assert entry["patient"] == "pat0_s0"
    assert entry["t2"] == str(dataset / "pat0_s0" / "t2.nii.gz")
    assert Path(entry["label"]).is_absolute()


def test_build_sorted_by_case(dataset):
    cases = [entry["case"] for entry in build_datalist(dataset, MODALITIES)]
    assert cases == sorted(cases)
    assert len(cases) == 12


def test_build_accepts_uncompressed_nifti(tmp_path):
    write_case(tmp_path / "case_a", suffix=".nii")
    datalist = build_datalist(tmp_path, MODALITIES, num_folds=1)
    assert datalist[0]["t1"].endswith("case_a/t1.nii")


def test_folds_grouped_by_patient(dataset):
    datalist = build_datalist(dataset, MODALITIES, num_folds=3, patient_pattern=PATTERN)
    for patient, folds in folds_per_patient(datalist).items():
        assert len(folds) == 1, patient


def test_folds_balanced_by_cases(dataset):
    datalist = build_datalist(dataset, MODALITIES, num_folds=3, patient_pattern=PATTERN)
    assert Counter(entry["fold"] for entry in datalist) == {0: 4, 1: 4, 2: 4}


def test_folds_deterministic_for_seed(dataset):
    first = build_datalist(dataset, MODALITIES, num_folds=3, patient_pattern=PATTERN, seed=5)
    second = build_datalist(dataset, MODALITIES, num_folds=3, patient_pattern=PATTERN, seed=5)
    assert [entry["fold"] for entry in first] == [entry["fold"] for entry in second]


def test_folds_unbalanced_patients(tmp_path):
    # Patient sizes 4, 2, 1, 1: the largest fills fold 0, the others share fold 1.
    for patient, count in (("pat0", 4), ("pat1", 2), ("pat2", 1), ("pat3", 1)):
        for scan in range(count):
            write_case(tmp_path / f"{patient}_s{scan}")
    datalist = build_datalist(tmp_path, MODALITIES, num_folds=2, patient_pattern=PATTERN)
    assert Counter(entry["fold"] for entry in datalist) == {0: 4, 1: 4}
    assert {entry["fold"] for entry in datalist if entry["patient"] == "pat0"} == {0}


def test_fewer_patients_than_folds(tmp_path, caplog):
    for patient in range(2):
        write_case(tmp_path / f"pat{patient}_s0")
    with caplog.at_level(logging.WARNING, logger="scripts.datalist"):
        datalist = build_datalist(tmp_path, MODALITIES, num_folds=5, patient_pattern=PATTERN)
    assert sorted(entry["fold"] for entry in datalist) == [0, 1]
    assert "only 2 patient(s) for 5 folds" in caplog.text


def test_missing_modality_raises(dataset):
    (dataset / "pat3_s1" / "t2.nii.gz").unlink()
    with pytest.raises(ValueError) as raised:
        build_datalist(dataset, MODALITIES)
    message = str(raised.value)
    assert str(dataset / "pat3_s1") in message
    assert "no t2.nii.gz" in message
    assert "set modalities" in message


def test_missing_label_raises(dataset):
    (dataset / "pat0_s0" / "label.nii.gz").unlink()
    with pytest.raises(ValueError, match="no label.nii.gz"):
        build_datalist(dataset, MODALITIES)


def test_missing_label_allowed(dataset):
    (dataset / "pat0_s0" / "label.nii.gz").unlink()
    datalist = build_datalist(dataset, MODALITIES, require_label=False)
    assert "label" not in datalist[0]
    assert "label" in datalist[1]


def test_both_suffixes_raise(tmp_path):
    write_case(tmp_path / "case_a")
    write_case(tmp_path / "case_a", names=("t1",), suffix=".nii")
    with pytest.raises(ValueError, match="both t1.nii.gz and t1.nii"):
        build_datalist(tmp_path, MODALITIES)


def test_skips_non_case_entries(dataset):
    (dataset / "datalist.json").write_text("[]")
    (dataset / "notes").mkdir()
    (dataset / "notes" / "readme.txt").write_text("not a case")
    write_case(dataset / ".cache_case")
    datalist = build_datalist(dataset, MODALITIES)
    assert len(datalist) == 12


def test_empty_folder_raises(tmp_path):
    with pytest.raises(ValueError, match="no case folder found"):
        build_datalist(tmp_path, MODALITIES)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="check dataset_dir"):
        build_datalist(tmp_path / "absent", MODALITIES)


def test_pattern_mismatch_raises(dataset):
    with pytest.raises(ValueError, match="does not match 12 case"):
        build_datalist(dataset, MODALITIES, patient_pattern=r"^brats_(\d+)")


def test_invalid_pattern_raises():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        patient_from_case("pat0_s0", "(unclosed")


def test_patient_from_case():
    assert patient_from_case("brats_009_p01", r"^(brats_\d+)_p") == "brats_009"
    assert patient_from_case("pat7_s1", r"pat\d+") == "pat7"
    assert patient_from_case("pat7_s1") == "pat7_s1"


def test_case_from_path():
    assert case_from_path("/data/case_12/t1.nii.gz", ["t1"]) == "case_12"
    assert case_from_path("/data/case_12/label.nii") == "case_12"
    assert case_from_path("/data/case_12/image.nii.gz") == "case_12"
    assert case_from_path("/data/imagesTr/spleen_3.nii.gz", ["t1"]) == "spleen_3"


def test_reserved_modality_raises(dataset):
    with pytest.raises(ValueError, match="reserved"):
        build_datalist(dataset, ["t1", "label"])


def test_load_json_relative_paths(dataset):
    entries = [
        {"t1": f"pat{p}_s0/t1.nii.gz", "t2": f"pat{p}_s0/t2.nii.gz", "stir": f"pat{p}_s0/stir.nii.gz",
         "label": f"pat{p}_s0/label.nii.gz"}
        for p in range(4)
    ]  # fmt: skip
    json_path = dataset / "datalist.json"
    json_path.write_text(json.dumps({"training": entries}))
    datalist = load_datalist(json_path, MODALITIES, num_folds=2, patient_pattern=PATTERN)
    assert datalist[2]["stir"] == str(dataset / "pat2_s0" / "stir.nii.gz")
    assert [entry["case"] for entry in datalist] == ["pat0_s0", "pat1_s0", "pat2_s0", "pat3_s0"]
    assert [entry["patient"] for entry in datalist] == ["pat0", "pat1", "pat2", "pat3"]
    assert sorted(entry["fold"] for entry in datalist) == [0, 0, 1, 1]


def test_load_json_plain_list_multichannel(tmp_path):
    write_case(tmp_path / "imagesTr", names=("case_1", "case_2"))
    entries = [{"image": "imagesTr/case_1.nii.gz"}, {"image": "imagesTr/case_2.nii.gz", "fold": 1}]
    json_path = tmp_path / "list.json"
    json_path.write_text(json.dumps(entries))
    datalist = load_datalist(json_path, MODALITIES, require_label=False)
    assert [entry["case"] for entry in datalist] == ["case_1", "case_2"]
    assert datalist[0]["image"] == str(tmp_path / "imagesTr" / "case_1.nii.gz")
    assert [entry["fold"] for entry in datalist] == [0, 1]


def test_load_json_keeps_given_folds(dataset):
    entries = [
        {**{key: f"pat{p}_s{s}/{key}.nii.gz" for key in [*MODALITIES, "label"]}, "fold": 4, "extra": p}
        for p in range(2)
        for s in range(2)
    ]
    entries[3].pop("fold")
    json_path = dataset / "datalist.json"
    json_path.write_text(json.dumps({"training": entries}))
    datalist = load_datalist(json_path, MODALITIES, patient_pattern=PATTERN)
    # pat1_s1 had no fold and joins its patient's fold 4.
    assert [entry["fold"] for entry in datalist] == [4, 4, 4, 4]
    assert [entry["extra"] for entry in datalist] == [0, 0, 1, 1]


def test_load_json_missing_path_raises(dataset):
    entries = [{"case": "broken", "t1": "pat0_s0/t1.nii.gz", "t2": "nowhere/t2.nii.gz", "stir": "pat0_s0/stir.nii.gz",
                "label": "pat0_s0/label.nii.gz"}]  # fmt: skip
    json_path = dataset / "datalist.json"
    json_path.write_text(json.dumps({"training": entries}))
    with pytest.raises(ValueError) as raised:
        load_datalist(json_path, MODALITIES)
    message = str(raised.value)
    assert "entry 0 ('broken')" in message
    assert "'t2'" in message
    assert str(dataset / "nowhere" / "t2.nii.gz") in message


def test_load_json_partial_modalities_raises(dataset):
    json_path = dataset / "datalist.json"
    json_path.write_text(json.dumps([{"t1": "pat0_s0/t1.nii.gz", "label": "pat0_s0/label.nii.gz"}]))
    with pytest.raises(ValueError, match=r"has no \['t2', 'stir'\]"):
        load_datalist(json_path, MODALITIES)


def test_load_json_missing_label_raises(dataset):
    json_path = dataset / "datalist.json"
    json_path.write_text(json.dumps([{"image": "pat0_s0/t1.nii.gz"}]))
    with pytest.raises(ValueError, match="has no 'label'"):
        load_datalist(json_path, MODALITIES)


def test_load_json_invalid_raises(tmp_path):
    json_path = tmp_path / "datalist.json"
    json_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(json_path, MODALITIES)


def test_load_folder_matches_build(dataset):
    assert load_datalist(dataset, MODALITIES, patient_pattern=PATTERN) == build_datalist(
        dataset, MODALITIES, patient_pattern=PATTERN
    )


def test_split_by_fold(dataset):
    datalist = build_datalist(dataset, MODALITIES, num_folds=3, patient_pattern=PATTERN)
    training, validation = split_by_fold(datalist, 1)
    assert {entry["fold"] for entry in validation} == {1}
    assert len(validation) == 4
    assert len(training) == 8
    assert {entry["case"] for entry in training} | {entry["case"] for entry in validation} == {
        entry["case"] for entry in datalist
    }


def test_split_all_cases(dataset, caplog):
    datalist = build_datalist(dataset, MODALITIES)
    with caplog.at_level(logging.WARNING, logger="scripts.datalist"):
        training, validation = split_by_fold(datalist, -1)
    assert training == datalist
    assert validation == datalist
    assert "not held out" in caplog.text


def test_split_empty_fold_raises(dataset):
    datalist = build_datalist(dataset, MODALITIES, num_folds=3)
    with pytest.raises(ValueError, match=r"fold 7 has no cases; choose one of \[0, 1, 2\]"):
        split_by_fold(datalist, 7)


def test_split_single_fold_raises(tmp_path):
    write_case(tmp_path / "only_case")
    datalist = build_datalist(tmp_path, MODALITIES)
    with pytest.raises(ValueError, match="leaves none for training"):
        split_by_fold(datalist, 0)


def test_write_then_load(dataset, tmp_path):
    datalist = build_datalist(dataset, MODALITIES, num_folds=3, patient_pattern=PATTERN)
    json_path = write_datalist(datalist, tmp_path / "out" / "datalist.json")
    assert load_datalist(json_path, MODALITIES) == datalist
    assert [path.name for path in json_path.parent.iterdir()] == ["datalist.json"]


def test_cli_writes_datalist(dataset, tmp_path):
    output = tmp_path / "list.json"
    command = [
        sys.executable, "-m", "scripts.datalist", "--dataset_dir", str(dataset), "--modalities", "t1", "t2", "stir",
        "--patient_pattern", PATTERN, "--num_folds", "3", "--output", str(output),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    entries = json.loads(output.read_text())["training"]
    assert len(entries) == 12
    assert entries[0]["patient"] == "pat0"


def test_brats_patients_in_one_fold(brats_dir):
    datalist = build_datalist(brats_dir, ["t1", "t2", "flair"], patient_pattern=r"^(brats_\d+)_p")
    folds = folds_per_patient(datalist)
    assert len(datalist) == 40
    assert sorted(folds) == ["brats_009", "brats_119"]
    for patient, patient_folds in folds.items():
        assert len(patient_folds) == 1, patient
    assert folds["brats_009"] != folds["brats_119"]


def test_sts_skips_licence_file(sts_dir):
    datalist = build_datalist(sts_dir, ["t1"])
    assert len(datalist) == 32
    assert Counter(entry["fold"] for entry in datalist) == {0: 7, 1: 7, 2: 6, 3: 6, 4: 6}
