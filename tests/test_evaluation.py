"""Tests of the per-case metrics, summaries, reports, paired t-test and report handler."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import AsDiscreted
from scipy import stats

from scripts.datalist import case_from_path
from scripts.evaluation import (
    CSV_COLUMNS,
    SegmentationReportHandler,
    compute_case_metrics,
    main,
    paired_t_test,
    size_group,
    summarise,
    tumour_volume_cc,
    write_reports,
)

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SPACING_MM = (0.5, 0.5, 3.0)


def box(shape: tuple[int, int, int], start: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """Return a (X, Y, Z) float mask with ones in the box of ``size`` voxels at ``start``."""
    mask = torch.zeros(shape)
    x, y, z = start
    sx, sy, sz = size
    mask[x : x + sx, y : y + sy, z : z + sz] = 1
    return mask


# ---------------------------------------------------------------------------
# compute_case_metrics
# ---------------------------------------------------------------------------


def test_identical_masks_are_perfect():
    label = box((12, 12, 14), (3, 3, 3), (5, 5, 5))
    metrics = compute_case_metrics(label.clone(), label, SPACING_MM)
    assert metrics["dice"] == 1.0
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == 1.0
    assert metrics["hd95_mm"] == 0.0
    assert metrics["asd_mm"] == 0.0


def test_cube_shifted_along_z():
    # A 5^3 cube shifted by 2 voxels along z (3 mm per voxel) overlaps in 3 of 5 slices.
    # Prediction surface voxels (98) and their distance to the label surface:
    #   slice z=5: ring 16 x 0, inner 3x3: 8 x 0.5 mm (one in-plane step), centre 1 x 1.0 mm;
    #   slices z=6, 7: rings 32 x 0; slice z=8: ring 16 x 3 mm; slice z=9: 25 x 6 mm.
    # ASD = (4 + 1 + 48 + 150) / 98 mm. The 95th percentiles of both directions fall in
    # the 25 values of 6 mm, so HD95 = 6 mm.
    label = box((12, 12, 14), (3, 3, 3), (5, 5, 5))
    pred = box((12, 12, 14), (3, 3, 5), (5, 5, 5))
    metrics = compute_case_metrics(pred, label, SPACING_MM)
    assert metrics["dice"] == pytest.approx(0.6, rel=1e-6)
    assert metrics["precision"] == pytest.approx(0.6, rel=1e-12)
    assert metrics["recall"] == pytest.approx(0.6, rel=1e-12)
    assert metrics["hd95_mm"] == pytest.approx(6.0, rel=1e-6)
    assert metrics["asd_mm"] == pytest.approx(203 / 98, rel=1e-6)


def test_bar_shifted_along_x_uses_x_spacing():
    # A 4x2x2 bar has no interior voxel. Shifted by 1 voxel along x (0.5 mm), 12 of the
    # 16 prediction voxels lie on the label and the last slice is 0.5 mm away.
    label = box((10, 6, 6), (2, 2, 2), (4, 2, 2))
    pred = box((10, 6, 6), (3, 2, 2), (4, 2, 2))
    metrics = compute_case_metrics(pred, label, SPACING_MM)
    assert metrics["dice"] == pytest.approx(0.75, rel=1e-6)
    assert metrics["hd95_mm"] == pytest.approx(0.5, rel=1e-6)
    assert metrics["asd_mm"] == pytest.approx(4 * 0.5 / 16, rel=1e-6)


def test_prediction_inside_label():
    # The prediction is the lower half of a 2x2x4 bar: no false positive, half the label missed.
    # ASD (prediction to label) is 0 because every predicted voxel is a label surface voxel.
    # Label to prediction: 8 x 0, 4 x 3 mm, 4 x 6 mm, so its 95th percentile is 6 mm.
    label = box((6, 6, 8), (2, 2, 2), (2, 2, 4))
    pred = box((6, 6, 8), (2, 2, 2), (2, 2, 2))
    metrics = compute_case_metrics(pred, label, SPACING_MM)
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == 0.5
    assert metrics["dice"] == pytest.approx(2 / 3, rel=1e-6)
    assert metrics["asd_mm"] == 0.0
    assert metrics["hd95_mm"] == pytest.approx(6.0, rel=1e-6)


def test_empty_prediction():
    label = box((8, 8, 8), (2, 2, 2), (3, 3, 3))
    metrics = compute_case_metrics(torch.zeros_like(label), label, SPACING_MM)
    assert math.isnan(metrics["precision"])
    assert metrics["recall"] == 0.0
    assert metrics["dice"] == 0.0
    assert math.isnan(metrics["hd95_mm"])
    assert math.isnan(metrics["asd_mm"])
    assert metrics["pred_volume_cc"] == 0.0


def test_empty_label():
    pred = box((8, 8, 8), (2, 2, 2), (3, 3, 3))
    metrics = compute_case_metrics(pred, torch.zeros_like(pred), SPACING_MM)
    assert metrics["precision"] == 0.0
    assert math.isnan(metrics["recall"])
    assert metrics["dice"] == 0.0
    assert math.isnan(metrics["hd95_mm"])
    assert math.isnan(metrics["asd_mm"])


def test_both_empty():
    empty = torch.zeros(8, 8, 8)
    metrics = compute_case_metrics(empty, empty.clone(), SPACING_MM)
    assert metrics["dice"] == 1.0
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == 1.0
    assert math.isnan(metrics["hd95_mm"])
    assert math.isnan(metrics["asd_mm"])


def test_channel_and_numpy_inputs_match():
    label = box((12, 12, 14), (3, 3, 3), (5, 5, 5))
    pred = box((12, 12, 14), (3, 3, 5), (5, 5, 5))
    from_tensors = compute_case_metrics(pred, label, SPACING_MM)
    from_arrays = compute_case_metrics(pred.numpy()[None], label.numpy().astype(bool), np.array(SPACING_MM))
    assert from_arrays == from_tensors


@pytest.mark.parametrize(
    ("pred", "label", "spacing", "message"),
    [
        (torch.zeros(4, 4, 4), torch.zeros(4, 4, 5), SPACING_MM, "same spatial shape"),
        (torch.zeros(2, 4, 4, 4), torch.zeros(4, 4, 4), SPACING_MM, "shape"),
        (torch.full((4, 4, 4), 0.7), torch.zeros(4, 4, 4), SPACING_MM, "binary"),
        (torch.zeros(4, 4, 4), torch.zeros(4, 4, 4), (1.0, 1.0), "spacing_mm"),
        (torch.zeros(4, 4, 4), torch.zeros(4, 4, 4), (1.0, 0.0, 1.0), "spacing_mm"),
    ],
)
def test_case_metrics_reject_bad_input(pred, label, spacing, message):
    with pytest.raises(ValueError, match=message):
        compute_case_metrics(pred, label, spacing)


# ---------------------------------------------------------------------------
# Volumes and size groups
# ---------------------------------------------------------------------------


def test_volume_uses_spacing():
    # 125 voxels of 0.5 x 0.5 x 3 mm = 93.75 mm^3 = 0.09375 cc.
    mask = box((12, 12, 14), (3, 3, 3), (5, 5, 5))
    assert tumour_volume_cc(mask, SPACING_MM) == 0.09375
    assert tumour_volume_cc(mask[None], (1.0, 2.0, 4.0)) == 1.0


@pytest.mark.parametrize(
    ("volume_cc", "group"),
    [
        (0.0, "C"),
        (3.999, "C"),
        (4.0, "B"),
        (7.5, "B"),
        (10.0, "B"),
        (10.0 + 1e-9, "B"),
        (10.001, "A"),
        (250.0, "A"),
    ],
)
def test_size_group_boundaries(volume_cc, group):
    assert size_group(volume_cc) == group


@pytest.mark.parametrize("volume_cc", [-1.0, math.nan, math.inf])
def test_size_group_rejects_invalid_volume(volume_cc):
    with pytest.raises(ValueError, match="volume_cc"):
        size_group(volume_cc)


# ---------------------------------------------------------------------------
# Summaries and reports
# ---------------------------------------------------------------------------


def make_rows() -> list[dict]:
    """Four cases: one in group A, three in group B (one of them without HD95), none in C."""
    return [
        {"case": "a1", "group": "A", "dice": 0.9, "precision": 0.8, "recall": 1.0, "hd95_mm": 2.0, "asd_mm": 0.5,
         "label_volume_cc": 12.0, "pred_volume_cc": 13.0},
        {"case": "b1", "group": "B", "dice": 0.5, "precision": 0.5, "recall": 0.5, "hd95_mm": 4.0, "asd_mm": 1.0,
         "label_volume_cc": 5.0, "pred_volume_cc": 5.0},
        {"case": "b2", "group": "B", "dice": 0.7, "precision": 0.6, "recall": 0.9, "hd95_mm": 8.0, "asd_mm": 3.0,
         "label_volume_cc": 6.0, "pred_volume_cc": 7.0},
        {"case": "b3", "group": "B", "dice": 0.0, "precision": math.nan, "recall": 0.0, "hd95_mm": math.nan,
         "asd_mm": math.nan, "label_volume_cc": 4.0, "pred_volume_cc": 0.0},
    ]


def test_summary_overall_by_hand():
    overall = summarise(make_rows())["groups"]["all"]
    dice = overall["metrics"]["dice"]
    # Dice 0.9, 0.5, 0.7, 0.0: mean 0.525; squared deviations sum to 0.4475, over n - 1 = 3.
    assert overall["n_cases"] == 4
    assert dice["mean"] == pytest.approx(0.525, rel=1e-12)
    assert dice["std"] == pytest.approx(math.sqrt(0.4475 / 3), rel=1e-12)
    assert dice["n"] == 4
    assert dice["n_undefined"] == 0


def test_summary_counts_undefined_values():
    hd95 = summarise(make_rows())["groups"]["all"]["metrics"]["hd95_mm"]
    # HD95 2, 4, 8 (and one undefined): mean 14/3; squared deviations sum to 168/9, over n - 1 = 2.
    assert hd95["n"] == 3
    assert hd95["n_undefined"] == 1
    assert hd95["mean"] == pytest.approx(14 / 3, rel=1e-12)
    assert hd95["std"] == pytest.approx(math.sqrt(28 / 3), rel=1e-12)


def test_summary_per_group():
    groups = summarise(make_rows())["groups"]
    assert groups["A"]["n_cases"] == 1
    assert groups["B"]["n_cases"] == 3
    assert groups["C"]["n_cases"] == 0
    assert groups["A"]["metrics"]["dice"]["mean"] == 0.9
    assert math.isnan(groups["A"]["metrics"]["dice"]["std"])
    assert groups["B"]["metrics"]["asd_mm"]["mean"] == pytest.approx(2.0, rel=1e-12)
    assert groups["B"]["metrics"]["asd_mm"]["std"] == pytest.approx(math.sqrt(2.0), rel=1e-12)
    assert math.isnan(groups["C"]["metrics"]["dice"]["mean"])


def test_summary_derives_group_from_volume():
    rows = [{"case": "x", "dice": 0.5, "label_volume_cc": 10.5}]
    assert summarise(rows)["groups"]["A"]["n_cases"] == 1


def test_summary_rejects_unknown_group():
    with pytest.raises(ValueError, match="group"):
        summarise([{"case": "x", "group": "D", "dice": 0.5}])


def test_reports_written_and_parseable(tmp_path):
    paths = write_reports(make_rows(), tmp_path / "reports")

    with paths["csv"].open(newline="") as stream:
        table = list(csv.DictReader(stream))
    summary = json.loads(paths["json"].read_text())
    markdown = paths["markdown"].read_text()

    assert [row["case"] for row in table] == ["a1", "b1", "b2", "b3"]
    assert list(table[0])[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert float(table[2]["dice"]) == 0.7
    assert math.isnan(float(table[3]["hd95_mm"]))
    assert summary["std_ddof"] == 1
    assert summary["groups"]["all"]["metrics"]["dice"]["mean"] == pytest.approx(0.525, rel=1e-12)
    assert summary["groups"]["C"]["metrics"]["dice"]["mean"] is None
    assert "| metric | all (4 cases) |" in markdown
    assert "| dice | 0.5250 ± 0.3862 (n=4) |" in markdown
    assert "| hd95_mm | 4.67 ± 3.06 (n=3), 1 undefined |" in markdown
    assert sorted(path.name for path in (tmp_path / "reports").iterdir()) == [
        "metrics.csv",
        "summary.json",
        "summary.md",
    ]


def test_reports_replace_previous_files(tmp_path):
    write_reports(make_rows(), tmp_path)
    paths = write_reports(make_rows()[:1], tmp_path)
    with paths["csv"].open(newline="") as stream:
        assert len(list(csv.DictReader(stream))) == 1


# ---------------------------------------------------------------------------
# Paired t-test and command line
# ---------------------------------------------------------------------------


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, Path]:
    """Run A and run B over four shared cases, plus one case that only each run has."""
    run_a = [
        {"case": "c1", "precision": 0.9, "recall": 0.8, "dice": 0.82, "hd95_mm": 3.0, "asd_mm": 1.0},
        {"case": "c2", "precision": 0.7, "recall": 0.6, "dice": 0.61, "hd95_mm": 9.0, "asd_mm": 2.5},
        {"case": "c3", "precision": 0.8, "recall": 0.9, "dice": 0.88, "hd95_mm": "nan", "asd_mm": 0.7},
        {"case": "c4", "precision": 0.6, "recall": 0.7, "dice": 0.66, "hd95_mm": 5.0, "asd_mm": 1.9},
        {"case": "only_a", "precision": 0.1, "recall": 0.1, "dice": 0.1, "hd95_mm": 50.0, "asd_mm": 20.0},
    ]
    run_b = [
        {"case": "c4", "precision": 0.5, "recall": 0.6, "dice": 0.55, "hd95_mm": 7.0, "asd_mm": 2.2},
        {"case": "c3", "precision": 0.8, "recall": 0.7, "dice": 0.80, "hd95_mm": 4.0, "asd_mm": 0.9},
        {"case": "c2", "precision": 0.6, "recall": 0.6, "dice": 0.52, "hd95_mm": 12.0, "asd_mm": 3.5},
        {"case": "c1", "precision": 0.85, "recall": 0.7, "dice": 0.75, "hd95_mm": 4.0, "asd_mm": 1.1},
        {"case": "only_b", "precision": 0.9, "recall": 0.9, "dice": 0.9, "hd95_mm": 1.0, "asd_mm": 0.1},
    ]
    return write_csv(tmp_path / "a.csv", run_a), write_csv(tmp_path / "b.csv", run_b)


def test_t_test_matches_scipy(two_runs):
    result = paired_t_test(*two_runs)
    expected = stats.ttest_rel([0.82, 0.61, 0.88, 0.66], [0.75, 0.52, 0.80, 0.55])
    dice = result["metrics"]["dice"]
    assert result["n_shared_cases"] == 4
    assert result["cases_only_in_a"] == ["only_a"]
    assert result["cases_only_in_b"] == ["only_b"]
    assert dice["n"] == 4
    assert dice["t_statistic"] == pytest.approx(float(expected.statistic), rel=1e-12)
    assert dice["p_value"] == pytest.approx(float(expected.pvalue), rel=1e-12)
    assert dice["mean_difference"] == pytest.approx(0.0875, rel=1e-9)


def test_t_test_skips_undefined_pairs(two_runs):
    hd95 = paired_t_test(*two_runs, metrics=["hd95_mm"])["metrics"]["hd95_mm"]
    expected = stats.ttest_rel([3.0, 9.0, 5.0], [4.0, 12.0, 7.0])
    assert hd95["n"] == 3
    assert hd95["n_excluded"] == 1
    assert hd95["p_value"] == pytest.approx(float(expected.pvalue), rel=1e-12)


def test_t_test_rejects_missing_column(two_runs):
    with pytest.raises(ValueError, match="volume"):
        paired_t_test(*two_runs, metrics=["volume"])


def test_t_test_rejects_disjoint_runs(tmp_path):
    a = write_csv(tmp_path / "a.csv", [{"case": "x", "dice": 0.5}])
    b = write_csv(tmp_path / "b.csv", [{"case": "y", "dice": 0.5}])
    with pytest.raises(ValueError, match="share no case"):
        paired_t_test(a, b, metrics=["dice"])


def test_t_test_rejects_duplicate_case(tmp_path):
    a = write_csv(tmp_path / "a.csv", [{"case": "x", "dice": 0.5}, {"case": "x", "dice": 0.6}])
    with pytest.raises(ValueError, match="twice"):
        paired_t_test(a, a, metrics=["dice"])


def test_t_test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        paired_t_test(tmp_path / "missing.csv", tmp_path / "missing.csv")


def test_compare_command_writes_json(two_runs, tmp_path, capsys):
    output = tmp_path / "t_test.json"
    assert main(["compare", str(two_runs[0]), str(two_runs[1]), "--json", str(output)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(output.read_text())
    assert "| dice | 4 |" in printed
    assert saved["metrics"]["dice"]["n"] == 4


def test_compare_module_entry_point(two_runs):
    completed = subprocess.run(
        [sys.executable, "-m", "scripts.evaluation", "compare", str(two_runs[0]), str(two_runs[1]), "--metrics", "dice"],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| dice | 4 |" in completed.stdout


def test_compare_command_reports_bad_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["compare", str(tmp_path / "a.csv"), str(tmp_path / "b.csv")])
    assert raised.value.code == 2
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# SegmentationReportHandler
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "case"),
    [
        ("/data/case_007/label.nii.gz", "case_007"),
        ("/data/case_007/label.nii", "case_007"),
        ("/data/labels/case_008.nii.gz", "case_008"),
        ("/data/labels/case_009_seg.nii", "case_009_seg"),
    ],
)
def test_case_name_from_path(path, case):
    assert case_from_path(path) == case


class ImageAsLogits(torch.nn.Module):
    """Fixed network: class 1 wins wherever the single input channel is positive."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (B, 1, X, Y, Z) -> (B, 2, X, Y, Z) logits.
        return torch.cat([-image, image], dim=1)


def make_cases(folder: Path) -> list[dict]:
    """Two labelled cases whose image is the intended prediction, with non-1 mm spacing.

    case_a: the 5^3 cube shifted by 2 voxels along z, spacing (0.5, 0.5, 3) mm.
    case_b: an empty prediction of a 2x2x4 bar, spacing (1.0, 0.75, 2.5) mm from a
    rotated affine, and the label file named ``case_b.nii.gz``.
    """
    affine_a = torch.diag(torch.tensor([0.5, 0.5, 3.0, 1.0], dtype=torch.float64))
    affine_b = torch.tensor(
        [[0.0, -0.75, 0.0, 10.0], [1.0, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 2.0], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    shape = (12, 12, 14)
    cases = [
        ("case_a", folder / "case_a" / "label.nii.gz", affine_a,
         box(shape, (3, 3, 5), (5, 5, 5)), box(shape, (3, 3, 3), (5, 5, 5))),
        ("case_b", folder / "labels" / "case_b.nii.gz", affine_b,
         torch.zeros(shape), box(shape, (2, 2, 2), (2, 2, 4))),
    ]
    items = []
    for _, label_file, affine, image, label in cases:
        items.append(
            {
                "image": MetaTensor(image[None], affine=affine, meta={"filename_or_obj": str(label_file.parent / "t1.nii.gz")}),
                "label": MetaTensor(label[None], affine=affine, meta={"filename_or_obj": str(label_file)}),
            }
        )
    return items


def run_evaluator(tmp_path: Path, postprocessing, label_key: str = "label") -> SegmentationReportHandler:
    handler = SegmentationReportHandler(output_dir=tmp_path / "eval", label_key=label_key)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(make_cases(tmp_path), batch_size=2, num_workers=0),
        network=ImageAsLogits(),
        postprocessing=postprocessing,
        decollate=True,
        val_handlers=[handler],
    )
    evaluator.run()
    return handler


def read_report(tmp_path: Path) -> dict[str, dict[str, str]]:
    with (tmp_path / "eval" / "metrics.csv").open(newline="") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}


def test_handler_on_supervised_evaluator(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="scripts.evaluation"):
        run_evaluator(tmp_path, AsDiscreted(keys="pred", argmax=True))
    report = read_report(tmp_path)

    assert sorted(report) == ["case_a", "case_b"]
    assert [float(report["case_a"][f"spacing_{axis}_mm"]) for axis in "xyz"] == [0.5, 0.5, 3.0]
    assert [float(report["case_b"][f"spacing_{axis}_mm"]) for axis in "xyz"] == [1.0, 0.75, 2.5]
    assert float(report["case_a"]["dice"]) == pytest.approx(0.6, rel=1e-6)
    assert float(report["case_a"]["hd95_mm"]) == pytest.approx(6.0, rel=1e-6)
    assert float(report["case_a"]["asd_mm"]) == pytest.approx(203 / 98, rel=1e-6)
    assert float(report["case_b"]["label_volume_cc"]) == pytest.approx(16 * 1.0 * 0.75 * 2.5 / 1000, rel=1e-12)
    assert float(report["case_b"]["dice"]) == 0.0
    assert math.isnan(float(report["case_b"]["hd95_mm"]))
    assert report["case_b"]["label_file"].endswith("case_b.nii.gz")
    assert (tmp_path / "eval" / "summary.json").is_file()
    assert (tmp_path / "eval" / "summary.md").is_file()
    assert "Case case_a: Dice 0.6000, HD95 6.00 mm" in caplog.text
    assert "| hd95_mm |" in caplog.text


def test_handler_accepts_one_hot(tmp_path):
    handler = run_evaluator(
        tmp_path, AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[2, 2])
    )
    report = read_report(tmp_path)
    assert len(handler.rows) == 2
    assert float(report["case_a"]["dice"]) == pytest.approx(0.6, rel=1e-6)
    assert handler.summary["groups"]["all"]["metrics"]["hd95_mm"]["n_undefined"] == 1


def test_handler_restarts_rows_per_run(tmp_path):
    handler = SegmentationReportHandler(output_dir=tmp_path / "eval")
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(make_cases(tmp_path), batch_size=1, num_workers=0),
        network=ImageAsLogits(),
        postprocessing=AsDiscreted(keys="pred", argmax=True),
        val_handlers=[handler],
    )
    evaluator.run()
    evaluator.run()
    assert [row["case"] for row in handler.rows] == ["case_a", "case_b"]


def fake_engine(output: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(output=output, batch=[{} for _ in output]))


def test_handler_rejects_label_without_spacing(tmp_path):
    handler = SegmentationReportHandler(output_dir=tmp_path)
    mask = box((6, 6, 6), (1, 1, 1), (2, 2, 2))[None]
    with pytest.raises(ValueError, match="spacing"):
        handler.iteration_completed(fake_engine([{"pred": mask, "label": mask.clone()}]))


def test_handler_uses_case_key_and_meta_pixdim(tmp_path):
    handler = SegmentationReportHandler(output_dir=tmp_path, case_key="name")
    mask = box((6, 6, 6), (1, 1, 1), (2, 2, 2))[None]
    item = {"pred": mask, "label": mask.clone(), "label_meta_dict": {"pixdim": [1.0, 0.8, 0.8, 4.0, 0, 0, 0, 0]}}
    engine = fake_engine([item])
    engine.state.batch = [{"name": "patient_12"}]
    handler.iteration_completed(engine)
    assert handler.rows[0]["case"] == "patient_12"
    assert handler.rows[0]["spacing_z_mm"] == 4.0


def test_handler_renames_duplicate_case(tmp_path):
    handler = SegmentationReportHandler(output_dir=tmp_path)
    affine = torch.eye(4, dtype=torch.float64)
    mask = box((6, 6, 6), (1, 1, 1), (2, 2, 2))[None]
    items = [
        {"pred": mask, "label": MetaTensor(mask, affine=affine, meta={"filename_or_obj": f"/{root}/c1/label.nii.gz"})}
        for root in ("site1", "site2")
    ]
    handler.iteration_completed(fake_engine(items))
    assert [row["case"] for row in handler.rows] == ["c1", "c1-2"]


def test_handler_rejects_missing_key(tmp_path):
    handler = SegmentationReportHandler(output_dir=tmp_path, pred_key="seg")
    mask = box((6, 6, 6), (1, 1, 1), (2, 2, 2))[None]
    with pytest.raises(KeyError, match="seg"):
        handler.iteration_completed(fake_engine([{"pred": mask, "label": mask}]))


def test_handler_rejects_multiclass_prediction(tmp_path):
    handler = SegmentationReportHandler(output_dir=tmp_path)
    label = MetaTensor(box((6, 6, 6), (1, 1, 1), (2, 2, 2))[None])
    with pytest.raises(ValueError, match="AsDiscreted"):
        handler.iteration_completed(fake_engine([{"pred": torch.zeros(3, 6, 6, 6), "label": label}]))


DISTRIBUTED_SCRIPT = '''
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import AsDiscreted
from torch.utils.data.distributed import DistributedSampler

from scripts.evaluation import SegmentationReportHandler


class ImageAsLogits(torch.nn.Module):
    def forward(self, image):
        return torch.cat([-image, image], dim=1)


dist.init_process_group("gloo")
folder = Path(sys.argv[1])
cases = []
for index in range(3):
    mask = torch.zeros(1, 8, 8, 8)
    mask[:, 2 : 4 + index, 2:4, 2:4] = 1
    meta = {"filename_or_obj": str(folder / f"case_{index}" / "label.nii.gz")}
    cases.append({"image": MetaTensor(mask.clone(), meta=dict(meta)), "label": MetaTensor(mask, meta=meta)})

# Three cases on two ranks: the sampler repeats case_0 on rank 1 as padding.
sampler = DistributedSampler(cases, shuffle=False)
handler = SegmentationReportHandler(output_dir=folder / "eval")
SupervisedEvaluator(
    device=torch.device("cpu"),
    val_data_loader=DataLoader(cases, batch_size=1, sampler=sampler, num_workers=0),
    network=ImageAsLogits(),
    postprocessing=AsDiscreted(keys="pred", argmax=True),
    val_handlers=[handler],
).run()
assert [row["case"] for row in handler.rows] == ["case_0", "case_2", "case_1"], handler.rows
dist.destroy_process_group()
'''


def test_handler_gathers_ranks(tmp_path):
    script = tmp_path / "evaluate_two_ranks.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)],
        cwd=BUNDLE_ROOT,
        env={**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = read_report(tmp_path)
    assert list(report) == ["case_0", "case_2", "case_1"]
    assert all(float(row["dice"]) == 1.0 for row in report.values())
