"""End-to-end runs of the bundle's training, inference and evaluation configs.

Each workflow runs as a user runs it, ``python -m monai.bundle run ...`` in a
subprocess from the bundle root, with the quick profile and a schedule of a
few iterations so that the file finishes in a few minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.phantom import generate_phantom_dataset
from scripts.ptnet import PTNet

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
TRAIN = "['configs/train.yaml','configs/quick.yaml']"
INFER = "['configs/inference.yaml','configs/quick.yaml']"
EVALUATE = "['configs/inference.yaml','configs/evaluate.yaml','configs/quick.yaml']"

pytestmark = pytest.mark.slow


def run_bundle(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle <args>`` from the bundle root and return the finished process."""
    command = [sys.executable, "-m", "monai.bundle", *args]
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        command, cwd=BUNDLE_ROOT, env=environment, capture_output=True, text=True, timeout=900, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(args[:2])} failed with exit code {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def phantom_overrides(root: Path) -> list[str]:
    """Overrides shared by every run on the phantom: paths under ``root``, two folds, no caching."""
    return [
        "--bundle_root", str(root),
        "--dataset_dir", str(root / "phantom"),
        "--num_folds", "2",
        "--cache_rate", "0",
    ]


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory) -> Path:
    """Train for one short epoch on a four-case phantom and return the run's root folder."""
    root = tmp_path_factory.mktemp("phantom_run")
    generate_phantom_dataset(root / "phantom", num_cases=4, shape_xy=(128, 128), num_slices=12, seed=3)
    run_bundle(
        "run", "training", "--config_file", TRAIN, *phantom_overrides(root),
        "--max_epochs", "1", "--iterations_per_epoch", "3", "--val_interval", "1",
    )
    return root


def test_training_saves_best_weights(phantom_run):
    checkpoint = torch.load(phantom_run / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"model"}
    network = PTNet(in_channels=3, out_channels=2, embed_dim=12, num_heads=(1, 2, 4, 8))
    network.load_state_dict(checkpoint["model"])


def test_training_state_has_everything_to_resume(phantom_run):
    states = sorted((phantom_run / "outputs" / "train").glob("state*.pt"))
    assert len(states) == 1
    state = torch.load(states[0], map_location="cpu", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "loss", "trainer"} <= set(state)
    assert "lambda_dice" in state["loss"]


def test_training_resumes_from_state(phantom_run):
    result = run_bundle(
        "run", "training", "--config_file", TRAIN, *phantom_overrides(phantom_run),
        "--max_epochs", "2", "--iterations_per_epoch", "2", "--val_interval", "2", "--resume", "True",
    )
    log = result.stdout + result.stderr
    assert "Restored all variables from" in log
    assert "Epoch[1] Complete" not in log
    assert "Epoch[2] Complete" in log
    assert (phantom_run / "outputs" / "train" / "state_checkpoint_epoch=2.pt").is_file()


def test_tensorboard_logs_written(phantom_run):
    assert list((phantom_run / "outputs" / "train").glob("events.out.tfevents.*"))


def test_inference_mask_matches_input_grid(phantom_run):
    case_dir = phantom_run / "phantom" / "phantom_001"
    output_dir = phantom_run / "inference_one"
    run_bundle(
        "run", "--config_file", INFER, *phantom_overrides(phantom_run),
        "--case", str(case_dir), "--output_dir", str(output_dir), "--save_probabilities", "True",
    )
    reference = nib.load(case_dir / "t1.nii.gz")
    mask = nib.load(output_dir / "phantom_001" / "phantom_001_seg.nii.gz")
    probabilities = nib.load(output_dir / "phantom_001" / "phantom_001_prob.nii.gz")
    assert mask.shape == reference.shape
    assert np.allclose(mask.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert probabilities.shape == reference.shape
    probability_values = np.asarray(probabilities.dataobj)
    assert probability_values.min() >= 0.0
    assert probability_values.max() <= 1.0

    with open(output_dir / "volumes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["phantom_001"]
    voxel_cc = float(np.prod(reference.header.get_zooms()[:3])) / 1000.0
    expected_cc = float(np.asarray(mask.dataobj).sum()) * voxel_cc
    assert float(rows[0]["tumour_volume_cc"]) == pytest.approx(expected_cc, rel=1e-4)


def test_inference_accepts_multichannel_image(phantom_run, tmp_path):
    case_dir = phantom_run / "phantom" / "phantom_002"
    reference = nib.load(case_dir / "t1.nii.gz")
    stacked = np.stack([np.asarray(nib.load(case_dir / f"{m}.nii.gz").dataobj) for m in ("t1", "t2", "stir")], -1)
    multichannel = tmp_path / "phantom_002.nii.gz"
    nib.save(nib.Nifti1Image(stacked.astype(np.float32), reference.affine), multichannel)

    folder_output, file_output = tmp_path / "from_folder", tmp_path / "from_file"
    common = ["run", "--config_file", INFER, *phantom_overrides(phantom_run)]
    run_bundle(*common, "--case", str(case_dir), "--output_dir", str(folder_output))
    run_bundle(*common, "--case", str(multichannel), "--output_dir", str(file_output))

    from_folder = nib.load(folder_output / "phantom_002" / "phantom_002_seg.nii.gz")
    from_file = nib.load(file_output / "phantom_002" / "phantom_002_seg.nii.gz")
    assert np.array_equal(np.asarray(from_folder.dataobj), np.asarray(from_file.dataobj))
    assert np.allclose(from_file.affine, reference.affine, atol=1e-4)


def test_evaluation_writes_reports(phantom_run):
    output_dir = phantom_run / "evaluation"
    run_bundle("run", "--config_file", EVALUATE, *phantom_overrides(phantom_run), "--output_dir", str(output_dir))
    with open(output_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cases = sorted(path.name for path in (phantom_run / "phantom").iterdir())
    assert rows
    assert {row["case"] for row in rows} <= set(cases)
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0
        assert row["group"] in {"A", "B", "C"}
    summary = json.loads((output_dir / "summary.json").read_text())
    dice = summary["groups"]["all"]["metrics"]["dice"]
    assert dice["n"] + dice["n_undefined"] == len(rows)
    assert (output_dir / "summary.md").read_text().startswith("#")


def test_missing_modality_names_the_file(phantom_run, tmp_path):
    case_dir = tmp_path / "case_without_t2"
    case_dir.mkdir()
    for name in ("t1", "stir"):
        (case_dir / f"{name}.nii.gz").write_bytes((phantom_run / "phantom" / "phantom_000" / f"{name}.nii.gz").read_bytes())
    result = run_bundle(
        "run", "--config_file", INFER, *phantom_overrides(phantom_run),
        "--case", str(case_dir), "--output_dir", str(tmp_path / "out"), check=False,
    )
    assert result.returncode != 0
    assert "t2.nii.gz" in result.stderr
    assert str(case_dir) in result.stderr


def test_inference_without_checkpoint_explains(phantom_run, tmp_path):
    result = run_bundle(
        "run", "--config_file", INFER, "--bundle_root", str(tmp_path),
        "--case", str(phantom_run / "phantom" / "phantom_000"), check=False,
    )
    assert result.returncode != 0
    assert str(tmp_path / "models" / "model.pt") in result.stderr
    assert "Train first" in result.stderr


def test_verify_net_in_out():
    run_bundle(
        "verify_net_in_out", "network_def", "--meta_file", "configs/metadata.json",
        "--config_file", "configs/inference.yaml", "--device", "cpu", "--n", "1",
    )


def test_ckpt_export_traces(phantom_run):
    exported = phantom_run / "models" / "model.ts"
    run_bundle(
        "ckpt_export", "network_def", "--filepath", str(exported), "--ckpt_file", str(phantom_run / "models" / "model.pt"),
        "--meta_file", "configs/metadata.json", "--config_file", INFER, "--key_in_ckpt", "model",
        "--use_trace", "true", "--input_shape", "[1, 3, 64, 64, 8]",
    )
    module = torch.jit.load(str(exported))
    output = module(torch.randn(1, 3, 64, 64, 8))
    assert output.shape == (1, 2, 64, 64, 8)


def test_distributed_training_two_processes(tmp_path):
    generate_phantom_dataset(tmp_path / "phantom", num_cases=4, shape_xy=(128, 128), num_slices=12, seed=1)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.yaml','configs/quick.yaml','configs/multi_gpu_train.yaml']",
        *phantom_overrides(tmp_path),
        "--max_epochs", "2", "--iterations_per_epoch", "2", "--val_interval", "1",
    ]
    result = subprocess.run(command, cwd=BUNDLE_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-6000:]
    assert (tmp_path / "models" / "model.pt").is_file()
    assert (tmp_path / "outputs" / "train" / "state_checkpoint_epoch=2.pt").is_file()
    # Only the first process logs the loss: two epochs of two iterations.
    assert result.stdout.count("train_loss") == 4


def test_checkpoint_of_other_modalities_explains(phantom_run):
    result = run_bundle(
        "run", "--config_file", INFER, *phantom_overrides(phantom_run), "--modalities", "['t1','stir']",
        "--case", str(phantom_run / "phantom" / "phantom_000"), "--output_dir", str(phantom_run / "two"), check=False,
    )
    assert result.returncode != 0
    assert "must match the training run" in result.stderr
    assert "but the network expects" in result.stderr
