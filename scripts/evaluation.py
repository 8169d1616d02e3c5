"""Segmentation metrics per case, size groups, summaries, reports and paired t-tests.

Masks are binary tumour masks in MONAI's spatial order (X, Y, Z) with 1 = tumour and
0 = background. Distances are in millimetres, computed with the voxel spacing of the
image, and volumes are in cubic centimetres (1 cc = 1000 mm^3).

Per case (:func:`compute_case_metrics`), with TP, FP and FN counted over voxels:

- ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)`` and
  ``dice = 2 TP / (2 TP + FP + FN)``, as fractions in [0, 1];
- ``hd95_mm``: the 95th percentile Hausdorff distance between the surface voxels of
  prediction and label, the larger of the two directed 95th percentiles (linear
  interpolation between ranks, as ``torch.quantile`` computes it);
- ``asd_mm``: the average surface distance from the prediction's surface voxels to
  the label's surface, ``ASD = (1 / |P|) sum_{p in P} d(p, G)`` (not symmetric);
- ``label_volume_cc`` and ``pred_volume_cc``.

The ground-truth volume sets the size group (:func:`size_group`): A above 10 cc,
B from 4 cc to 10 cc with both boundaries included, and C below 4 cc.

Command line::

    python -m scripts.evaluation compare runA/metrics.csv runB/metrics.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.data.utils import affine_to_spacing
from monai.metrics import (
    compute_average_surface_distance,
    compute_confusion_matrix_metric,
    compute_dice,
    compute_hausdorff_distance,
    get_confusion_matrix,
)
from monai.utils import convert_to_numpy, convert_to_tensor
from scipy import stats

from scripts.datalist import case_from_path

logger = logging.getLogger(__name__)

__all__ = [
    "CASE_METRICS",
    "CSV_COLUMNS",
    "SIZE_GROUPS",
    "SegmentationReportHandler",
    "build_case_row",
    "compute_case_metrics",
    "main",
    "paired_t_test",
    "size_group",
    "summarise",
    "tumour_volume_cc",
    "write_reports",
    "write_text_atomic",
]

# Metrics that summaries and paired t-tests cover, in report order.
CASE_METRICS: tuple[str, ...] = (
    "precision",
    "recall",
    "dice",
    "hd95_mm",
    "asd_mm",
    "label_volume_cc",
    "pred_volume_cc",
)

# Metrics that the paired t-test compares by default: the five segmentation scores.
COMPARED_METRICS: tuple[str, ...] = ("precision", "recall", "dice", "hd95_mm", "asd_mm")

CSV_COLUMNS: tuple[str, ...] = (
    "case",
    "group",
    *CASE_METRICS,
    "spacing_x_mm",
    "spacing_y_mm",
    "spacing_z_mm",
    "label_file",
)

# Size groups by ground-truth tumour volume. The boundaries 4 cc and 10 cc belong to group B.
SIZE_GROUPS: dict[str, str] = {
    "A": "volume > 10 cc",
    "B": "4 cc <= volume <= 10 cc",
    "C": "volume < 4 cc",
}

# Volumes are rounded to this many decimals of a cc (1e-6 cc = 1e-3 mm^3, far below one
# voxel) before grouping, so that spacing read from an affine with floating-point noise
# does not move a tumour of exactly 4 or 10 cc across a boundary.
_GROUP_VOLUME_DECIMALS = 6

# Number formats of the Markdown table.
_MARKDOWN_FORMATS: dict[str, str] = {
    "precision": ".4f",
    "recall": ".4f",
    "dice": ".4f",
    "hd95_mm": ".2f",
    "asd_mm": ".2f",
    "label_volume_cc": ".2f",
    "pred_volume_cc": ".2f",
}


# ---------------------------------------------------------------------------
# Per-case metrics
# ---------------------------------------------------------------------------


def _validate_spacing(spacing_mm: Sequence[float] | np.ndarray | torch.Tensor) -> list[float]:
    """Return the spacing as three positive finite floats, or raise ValueError."""
    try:
        array = np.asarray(convert_to_numpy(spacing_mm, wrap_sequence=True), dtype=np.float64)
        values = [float(value) for value in array.ravel()]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or not all(math.isfinite(value) and value > 0 for value in values):
        raise ValueError(
            f"spacing_mm must be three positive voxel sizes in mm (x, y, z), got {spacing_mm}. "
            "Pass the image spacing, for example MetaTensor.pixdim."
        )
    return values


def _to_binary_mask(mask: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    """Return ``mask`` as a bool tensor of shape (X, Y, Z), or raise ValueError.

    Accepts shape (X, Y, Z) or (1, X, Y, Z) with values 0 and 1 only.
    """
    tensor = convert_to_tensor(mask, track_meta=False)
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3:
        raise ValueError(
            f"{name} must have shape (X, Y, Z) or (1, X, Y, Z), got {tuple(tensor.shape)}. "
            "Convert one-hot masks with argmax over the channel first."
        )
    if tensor.dtype != torch.bool:
        is_binary = bool(torch.all((tensor == 0) | (tensor == 1)))
        if not is_binary:
            raise ValueError(
                f"{name} must be binary (0 background, 1 tumour), got values other than 0 and 1. "
                "Threshold probabilities or apply argmax (AsDiscreted) first."
            )
        tensor = tensor == 1
    return tensor


def tumour_volume_cc(mask: np.ndarray | torch.Tensor, spacing_mm: Sequence[float]) -> float:
    """Compute the volume of a binary mask in cubic centimetres.

    Args:
        mask: binary mask of shape (X, Y, Z) or (1, X, Y, Z), 1 = tumour.
        spacing_mm: voxel size (x, y, z) in millimetres.

    Returns:
        ``number of foreground voxels * prod(spacing_mm) / 1000``.
    """
    spacing = _validate_spacing(spacing_mm)
    voxels = int(_to_binary_mask(mask, "mask").sum())
    return voxels * math.prod(spacing) / 1000.0


def size_group(volume_cc: float) -> str:
    """Return the size group of a tumour from its ground-truth volume in cc.

    ``"A"`` for volume > 10 cc, ``"B"`` for 4 cc <= volume <= 10 cc (both boundaries
    belong to B) and ``"C"`` for volume < 4 cc, an empty label (0 cc) included. The
    volume is rounded to 1e-6 cc before the comparison.
    """
    volume = float(volume_cc)
    if not math.isfinite(volume) or volume < 0:
        raise ValueError(f"volume_cc must be a finite volume >= 0 in cc, got {volume_cc}.")

    volume = round(volume, _GROUP_VOLUME_DECIMALS)
    if volume > 10.0:
        return "A"
    if volume >= 4.0:
        return "B"
    return "C"


def _surface_distances_mm(pred: torch.Tensor, label: torch.Tensor, spacing: list[float]) -> tuple[float, float]:
    """Return (HD95, ASD from prediction to label) in mm for two non-empty masks of shape (X, Y, Z)."""
    # (X, Y, Z) -> (1, 1, X, Y, Z): MONAI's metrics take batch-first, channel-first input.
    pred_batch = pred[None, None].float()
    label_batch = label[None, None].float()

    with warnings.catch_warnings():
        # MONAI 1.6.1 passes its own deprecated get_mask_edges argument and warns on every call.
        warnings.filterwarnings("ignore", message=".*get_mask_edges:always_return_as_numpy", category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            pred_batch, label_batch, include_background=True, percentile=95, spacing=spacing
        )
        asd = compute_average_surface_distance(
            pred_batch, label_batch, include_background=True, symmetric=False, spacing=spacing
        )
    return float(hd95[0, 0]), float(asd[0, 0])


def compute_case_metrics(
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
) -> dict[str, float]:
    """Compute precision, recall, Dice, HD95, ASD and both volumes for one case.

    The scores come from ``monai.metrics`` (confusion matrix, ``compute_dice``,
    ``compute_hausdorff_distance`` with ``percentile=95`` and
    ``compute_average_surface_distance`` with ``symmetric=False``). Surface voxels are
    the foreground voxels with a background neighbour along an axis, and distances
    between their centres are scaled by ``spacing_mm``.

    Empty masks:

    - both empty: dice, precision and recall are 1 (the prediction agrees that there
      is no tumour); hd95_mm and asd_mm are NaN;
    - empty prediction, non-empty label: dice 0, recall 0, precision NaN (0 / 0),
      hd95_mm and asd_mm NaN;
    - empty label, non-empty prediction: dice 0, precision 0, recall NaN (0 / 0),
      hd95_mm and asd_mm NaN.

    NaN marks an undefined value, and :func:`summarise` counts such values per metric.

    Args:
        pred: binary prediction of shape (X, Y, Z) or (1, X, Y, Z), 1 = tumour.
        label: binary ground truth with the same spatial shape.
        spacing_mm: voxel size (x, y, z) in millimetres.

    Returns:
        ``precision``, ``recall``, ``dice`` (fractions), ``hd95_mm``, ``asd_mm`` (mm),
        ``label_volume_cc`` and ``pred_volume_cc`` (cc), all Python floats.
    """
    spacing = _validate_spacing(spacing_mm)
    pred_mask = _to_binary_mask(pred, "pred")
    label_mask = _to_binary_mask(label, "label")
    if pred_mask.shape != label_mask.shape:
        raise ValueError(
            f"pred and label must have the same spatial shape, got {tuple(pred_mask.shape)} and "
            f"{tuple(label_mask.shape)}. Resample the prediction onto the label grid first."
        )
    label_mask = label_mask.to(pred_mask.device)

    pred_empty = not bool(pred_mask.any())
    label_empty = not bool(label_mask.any())

    # (X, Y, Z) -> (1, 1, X, Y, Z) for MONAI's batch-first, channel-first metrics. Float64
    # keeps ratios such as 3/5 exact to double precision.
    pred_batch = pred_mask[None, None].double()
    label_batch = label_mask[None, None].double()

    confusion = get_confusion_matrix(pred_batch, label_batch, include_background=True).double()  # (1, 1, 4)
    precision = float(compute_confusion_matrix_metric("precision", confusion)[0, 0])
    recall = float(compute_confusion_matrix_metric("recall", confusion)[0, 0])
    dice = float(compute_dice(pred_batch, label_batch, include_background=True, ignore_empty=False)[0, 0])
    if pred_empty and label_empty:
        precision, recall = 1.0, 1.0

    if pred_empty or label_empty:
        hd95, asd = math.nan, math.nan
    else:
        hd95, asd = _surface_distances_mm(pred_mask, label_mask, spacing)

    voxel_volume_cc = math.prod(spacing) / 1000.0
    return {
        "precision": precision,
        "recall": recall,
        "dice": dice,
        "hd95_mm": hd95,
        "asd_mm": asd,
        "label_volume_cc": int(label_mask.sum()) * voxel_volume_cc,
        "pred_volume_cc": int(pred_mask.sum()) * voxel_volume_cc,
    }


def build_case_row(
    case: str,
    pred: np.ndarray | torch.Tensor,
    label: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    label_file: str = "",
) -> dict[str, Any]:
    """Compute the metrics of one case and return its report row.

    The row has the keys of :data:`CSV_COLUMNS`: the case name, the size group of the
    ground-truth volume, the metrics of :func:`compute_case_metrics`, the spacing in mm
    and the label file (empty when unknown).
    """
    spacing = _validate_spacing(spacing_mm)
    metrics = compute_case_metrics(pred, label, spacing)
    return {
        "case": str(case),
        "group": size_group(metrics["label_volume_cc"]),
        **metrics,
        "spacing_x_mm": spacing[0],
        "spacing_y_mm": spacing[1],
        "spacing_z_mm": spacing[2],
        "label_file": str(label_file),
    }


# ---------------------------------------------------------------------------
# Summaries and reports
# ---------------------------------------------------------------------------


def _metric_value(row: Mapping[str, Any], metric: str) -> float:
    """Return ``row[metric]`` as a float, with NaN for a missing or empty value."""
    value = row.get(metric)
    if value is None or value == "":
        return math.nan
    return float(value)


def _describe(values: list[float]) -> dict[str, Any]:
    """Return mean, sample std, count of finite values and count of undefined values."""
    finite = np.asarray([value for value in values if math.isfinite(value)], dtype=np.float64)
    n = int(finite.size)
    mean = float(finite.mean()) if n > 0 else math.nan
    std = float(finite.std(ddof=1)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "n_undefined": len(values) - n}


def _row_group(row: Mapping[str, Any]) -> str:
    """Return the row's size group, from ``group`` or else from ``label_volume_cc``."""
    group = row.get("group")
    if group:
        if group not in SIZE_GROUPS:
            raise ValueError(f"case {row.get('case')!r} has invalid group {group!r}, expected one of {sorted(SIZE_GROUPS)}.")
        return str(group)
    return size_group(_metric_value(row, "label_volume_cc"))


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarise per-case rows overall and per size group.

    For each metric of :data:`CASE_METRICS` and each of ``"all"``, ``"A"``, ``"B"``
    and ``"C"``, the summary gives ``mean``, ``std`` (sample standard deviation,
    ddof=1), ``n`` (cases with a finite value) and ``n_undefined`` (cases where the
    value is NaN or infinite, which mean and std leave out). ``mean`` is NaN when
    ``n == 0`` and ``std`` is NaN when ``n < 2``.

    Args:
        rows: one mapping per case with the metric keys and ``group`` (or
            ``label_volume_cc``, from which the group is derived).

    Returns:
        ``{"std_ddof": 1, "group_definitions": {...}, "groups": {name: {"n_cases": int,
        "metrics": {metric: {"mean", "std", "n", "n_undefined"}}}}}``.
    """
    members: dict[str, list[Mapping[str, Any]]] = {"all": list(rows), "A": [], "B": [], "C": []}
    for row in rows:
        members[_row_group(row)].append(row)

    groups: dict[str, Any] = {}
    for name, group_rows in members.items():
        metrics = {metric: _describe([_metric_value(row, metric) for row in group_rows]) for metric in CASE_METRICS}
        groups[name] = {"n_cases": len(group_rows), "metrics": metrics}

    return {"std_ddof": 1, "group_definitions": dict(SIZE_GROUPS), "groups": groups}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it onto ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json_ready(value: Any) -> Any:
    """Replace NaN and infinite floats with None so that the output is valid JSON."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _format_cell(statistics: Mapping[str, Any], number_format: str) -> str:
    """Format one summary cell as ``mean ± std (n=N)``, noting undefined values."""
    if statistics["n"] == 0:
        cell = "n/a (n=0)"
    else:
        mean = format(statistics["mean"], number_format)
        std = format(statistics["std"], number_format) if math.isfinite(statistics["std"]) else "n/a"
        cell = f"{mean} ± {std} (n={statistics['n']})"
    if statistics["n_undefined"]:
        cell += f", {statistics['n_undefined']} undefined"
    return cell


def format_summary_markdown(summary: Mapping[str, Any]) -> str:
    """Return the summary as a Markdown table: one row per metric, one column per group."""
    groups = summary["groups"]
    headers = [
        f"all ({groups['all']['n_cases']} cases)",
        *(f"{name}: {SIZE_GROUPS[name]} ({groups[name]['n_cases']} cases)" for name in SIZE_GROUPS),
    ]
    lines = [
        "# Segmentation metrics",
        "",
        "Mean ± sample standard deviation (ddof=1) over the cases where the metric is defined, "
        "and n counts those cases. Precision, recall and Dice are fractions, HD95 and ASD are in mm, "
        "volumes in cc.",
        "",
        "| metric | " + " | ".join(headers) + " |",
        "|---" * (len(headers) + 1) + "|",
    ]
    for metric in CASE_METRICS:
        cells = [_format_cell(groups[name]["metrics"][metric], _MARKDOWN_FORMATS[metric]) for name in groups]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format_csv_value(value: Any) -> str:
    """Format a CSV cell, writing floats at full precision and undefined values as ``nan``."""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return "" if value is None else str(value)


def write_reports(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``metrics.csv``, ``summary.json`` and ``summary.md`` to ``output_dir``.

    ``metrics.csv`` has one row per case with the columns of :data:`CSV_COLUMNS`
    (undefined values written as ``nan``), followed by any extra keys of the rows in
    sorted order. ``summary.json`` contains :func:`summarise` with undefined values
    as ``null``, and ``summary.md`` contains its Markdown table. Each file is written
    to a temporary name in ``output_dir`` and renamed, so a reader never sees a
    partial file. The folder is created if missing.

    Returns:
        The written paths under the keys ``"csv"``, ``"json"`` and ``"markdown"``.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not rows:
        logger.warning("Writing reports to %s with no cases.", folder)

    summary = summarise(rows)
    extra_columns = sorted({key for row in rows for key in row} - set(CSV_COLUMNS))
    columns = [*CSV_COLUMNS, *extra_columns]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_csv_value(row.get(column)) for column in columns])

    paths = {
        "csv": folder / "metrics.csv",
        "json": folder / "summary.json",
        "markdown": folder / "summary.md",
    }
    write_text_atomic(paths["csv"], buffer.getvalue())
    write_text_atomic(paths["json"], json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n")
    write_text_atomic(paths["markdown"], format_summary_markdown(summary))
    return paths


# ---------------------------------------------------------------------------
# Paired t-test between two runs
# ---------------------------------------------------------------------------


def _read_metrics_csv(path: Path, metrics: Sequence[str]) -> dict[str, dict[str, float]]:
    """Read a ``metrics.csv`` into ``{case: {metric: value}}``, or raise with the file named."""
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}. Pass a metrics.csv written by write_reports.")

    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        columns = reader.fieldnames or []
        missing = [column for column in ("case", *metrics) if column not in columns]
        if missing:
            raise ValueError(f"{path} is missing the columns {missing}. Its columns are {columns}.")

        table: dict[str, dict[str, float]] = {}
        for line_number, record in enumerate(reader, start=2):
            case = record["case"]
            if case in table:
                raise ValueError(f"{path} line {line_number}: case {case!r} appears twice. Keep one row per case.")
            try:
                table[case] = {metric: _metric_value(record, metric) for metric in metrics}
            except ValueError as error:
                raise ValueError(f"{path} line {line_number}: invalid number ({error}).") from error
    return table


def paired_t_test(
    csv_a: str | os.PathLike,
    csv_b: str | os.PathLike,
    metrics: Sequence[str] = COMPARED_METRICS,
) -> dict[str, Any]:
    """Compare two runs with a paired t-test per metric over the cases both contain.

    Cases are matched by the ``case`` column. For each metric, the cases where either
    run's value is NaN or infinite are left out, and ``scipy.stats.ttest_rel(a, b)``
    runs on the rest (two-sided). ``t_statistic`` and ``p_value`` are NaN when fewer
    than two pairs remain, or as scipy returns them when all differences are equal
    (NaN for zero differences, an infinite t for a constant non-zero difference).

    Args:
        csv_a: ``metrics.csv`` of run A.
        csv_b: ``metrics.csv`` of run B.
        metrics: columns to compare.

    Returns:
        ``{"csv_a", "csv_b", "n_shared_cases", "cases_only_in_a", "cases_only_in_b",
        "metrics": {metric: {"n", "n_excluded", "mean_a", "mean_b", "mean_difference",
        "t_statistic", "p_value"}}}``, where ``mean_difference`` is the mean of
        ``a - b`` over the pairs tested.
    """
    path_a, path_b = Path(csv_a), Path(csv_b)
    if not metrics:
        raise ValueError("metrics is empty. Name at least one column to compare, for example 'dice'.")
    table_a = _read_metrics_csv(path_a, metrics)
    table_b = _read_metrics_csv(path_b, metrics)

    shared = sorted(set(table_a) & set(table_b))
    if not shared:
        raise ValueError(f"{path_a} and {path_b} share no case names. Compare runs on the same cases.")

    results: dict[str, Any] = {}
    for metric in metrics:
        pairs = [(table_a[case][metric], table_b[case][metric]) for case in shared]
        finite_pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b)]
        values_a = np.asarray([a for a, _ in finite_pairs], dtype=np.float64)
        values_b = np.asarray([b for _, b in finite_pairs], dtype=np.float64)

        t_statistic, p_value = math.nan, math.nan
        if len(finite_pairs) >= 2:
            test = stats.ttest_rel(values_a, values_b)
            t_statistic, p_value = float(test.statistic), float(test.pvalue)

        results[metric] = {
            "n": len(finite_pairs),
            "n_excluded": len(pairs) - len(finite_pairs),
            "mean_a": float(values_a.mean()) if finite_pairs else math.nan,
            "mean_b": float(values_b.mean()) if finite_pairs else math.nan,
            "mean_difference": float((values_a - values_b).mean()) if finite_pairs else math.nan,
            "t_statistic": t_statistic,
            "p_value": p_value,
        }

    return {
        "csv_a": str(path_a),
        "csv_b": str(path_b),
        "n_shared_cases": len(shared),
        "cases_only_in_a": sorted(set(table_a) - set(table_b)),
        "cases_only_in_b": sorted(set(table_b) - set(table_a)),
        "metrics": results,
    }


def format_t_test_markdown(result: Mapping[str, Any]) -> str:
    """Return a :func:`paired_t_test` result as a Markdown table."""
    lines = [
        f"Paired t-test, A = {result['csv_a']}, B = {result['csv_b']}, {result['n_shared_cases']} shared cases "
        f"({len(result['cases_only_in_a'])} only in A, {len(result['cases_only_in_b'])} only in B).",
        "",
        "| metric | n | mean A | mean B | mean A - B | t | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for metric, values in result["metrics"].items():
        lines.append(
            f"| {metric} | {values['n']} | {values['mean_a']:.4f} | {values['mean_b']:.4f} | "
            f"{values['mean_difference']:.4f} | {values['t_statistic']:.4f} | {values['p_value']:.4g} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Ignite handler for MONAI evaluators
# ---------------------------------------------------------------------------


def _foreground_mask(tensor: torch.Tensor, key: str) -> torch.Tensor:
    """Return the tumour mask (X, Y, Z) of a class-index (1, X, Y, Z) or one-hot (2, X, Y, Z) tensor."""
    if tensor.ndim != 4 or tensor.shape[0] not in (1, 2):
        raise ValueError(
            f"output[{key!r}] must have shape (1, X, Y, Z) class indices or (2, X, Y, Z) one-hot, "
            f"got {tuple(tensor.shape)}. Add AsDiscreted(keys={key!r}, argmax=True) to the postprocessing."
        )
    plain = convert_to_tensor(tensor, track_meta=False)
    if plain.shape[0] == 2:
        # (2, X, Y, Z) one-hot or scores -> (X, Y, Z) class 1 where it wins.
        return plain.argmax(dim=0) == 1
    return _to_binary_mask(plain, f"output[{key!r}]")


def _spacing_from_item(item: Mapping[str, Any], label_key: str, pred_key: str) -> list[float]:
    """Return the voxel spacing in mm from the label's (else the prediction's) affine or meta data."""
    for key in (label_key, pred_key):
        value = item.get(key)
        if isinstance(value, MetaTensor):
            affine = value.affine
            if affine.ndim == 3:
                affine = affine[0]
            return _validate_spacing(affine_to_spacing(affine, r=3))

    meta = item.get(f"{label_key}_meta_dict") or {}
    if "affine" in meta:
        return _validate_spacing(affine_to_spacing(convert_to_tensor(meta["affine"], track_meta=False), r=3))
    if "pixdim" in meta:
        # NIfTI pixdim: element 0 is qfac, elements 1-3 are the voxel size.
        return _validate_spacing(np.asarray(meta["pixdim"], dtype=np.float64).ravel()[1:4])
    raise ValueError(
        f"voxel spacing of output[{label_key!r}] not found, because it is not a MetaTensor and there is no "
        f"{label_key}_meta_dict with 'affine' or 'pixdim'. Load labels with LoadImaged so that they keep "
        "their affine."
    )


def _label_file(item: Mapping[str, Any], label_key: str) -> str:
    """Return the label's ``filename_or_obj``, or an empty string when unknown."""
    label = item.get(label_key)
    meta = label.meta if isinstance(label, MetaTensor) else item.get(f"{label_key}_meta_dict") or {}
    filename = meta.get("filename_or_obj", "")
    if isinstance(filename, (list, tuple)):
        filename = filename[0] if filename else ""
    return str(filename) if filename else ""


class SegmentationReportHandler:
    """Score each case of a MONAI evaluator run and write the reports when it completes.

    Attach it to a ``monai.engines.SupervisedEvaluator``. With ``decollate=True``
    (MONAI's default), ``engine.state.output`` after each iteration is a list with one
    dict per sample, after the evaluator's postprocessing. A dict output of batched
    tensors (``decollate=False``) is split into samples first. Each sample must
    contain:

    - ``output[pred_key]``: class indices (1, X, Y, Z) with values 0 and 1, or one-hot
      or scores (2, X, Y, Z) whose argmax over the channel is used;
    - ``output[label_key]``: the ground truth in either of the same forms.

    The spacing in mm comes from the label MetaTensor's affine (column norms of its
    3x3 part, which is what ``MetaTensor.pixdim`` returns). Without a MetaTensor, the
    ``<label_key>_meta_dict`` entry ``affine`` or else ``pixdim`` is used, and without
    either the handler raises ValueError instead of assuming 1 mm. The case name is
    ``output[case_key]`` (or the batch's) when ``case_key`` is given. Otherwise it
    comes from the label's ``filename_or_obj`` (see ``scripts.datalist.case_from_path``) or,
    without one, ``case_<index>``. A name that two different files share gets a
    suffix ``-2``, ``-3`` and so on.

    Each case is logged on one line. On ``COMPLETED`` the handler writes
    ``metrics.csv``, ``summary.json`` and ``summary.md`` to ``output_dir`` (see
    :func:`write_reports`) and logs the Markdown summary. Under torch.distributed it
    gathers the rows of all ranks, drops the cases that DistributedSampler repeated
    as padding, and writes from rank 0 only. Rows restart at every ``STARTED``, so
    an evaluator that runs every epoch rewrites the reports.

    Args:
        output_dir: folder for the reports, created if missing.
        pred_key: key of the prediction in each output dict.
        label_key: key of the ground truth in each output dict.
        case_key: optional key of the case name in each output or batch dict.

    Attributes:
        rows: the report rows of the current run, one dict per case.
        summary: the last :func:`summarise` result, or None before the first run ends.
        report_paths: the paths last written, or None.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        pred_key: str = "pred",
        label_key: str = "label",
        case_key: str | None = None,
    ) -> None:
        if not str(output_dir):
            raise ValueError("output_dir is empty. Pass the folder for metrics.csv and the summaries.")
        for name, value in (("pred_key", pred_key), ("label_key", label_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
        if case_key is not None and (not isinstance(case_key, str) or not case_key):
            raise ValueError(f"case_key must be None or a non-empty string, got {case_key!r}.")

        self.output_dir = Path(output_dir)
        self.pred_key = pred_key
        self.label_key = label_key
        self.case_key = case_key
        self.rows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None
        self.report_paths: dict[str, Path] | None = None
        # Case names before any duplicate suffix, aligned with ``rows``, and the label file of each name.
        self._base_names: list[str] = []
        self._files_by_case: dict[str, str] = {}

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine``'s STARTED, ITERATION_COMPLETED and COMPLETED events."""
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        """Clear the rows of a previous run."""
        self.rows = []
        self._base_names = []
        self._files_by_case = {}

    def iteration_completed(self, engine: Engine) -> None:
        """Score every sample of the iteration's output and log one line per case."""
        outputs = self._samples(engine.state.output, "engine.state.output")
        batches = self._samples(engine.state.batch, "engine.state.batch") if self.case_key else []

        for index, item in enumerate(outputs):
            for key in (self.pred_key, self.label_key):
                if key not in item:
                    raise KeyError(
                        f"engine.state.output is missing {key!r}. Its keys are {sorted(item)}. "
                        "Set pred_key and label_key to the evaluator's output keys."
                    )

            spacing = _spacing_from_item(item, self.label_key, self.pred_key)
            pred = _foreground_mask(item[self.pred_key], self.pred_key)
            label = _foreground_mask(item[self.label_key], self.label_key)

            batch_item = batches[index] if index < len(batches) else {}
            label_file = _label_file(item, self.label_key)
            base_name = self._case_name(item, batch_item, label_file)
            case = self._unique_case_name(base_name, label_file)

            row = build_case_row(case, pred, label, spacing, label_file=label_file)
            self.rows.append(row)
            self._base_names.append(base_name)
            logger.info(
                "Case %s: Dice %.4f, HD95 %.2f mm, tumour volume %.2f cc (group %s).",
                case,
                row["dice"],
                row["hd95_mm"],
                row["label_volume_cc"],
                row["group"],
            )

    def completed(self, engine: Engine) -> None:
        """Write the reports for all cases of the run and log the summary table.

        Under torch.distributed the rows of all ranks are gathered first, every rank
        gets the same ``rows`` and ``summary``, and only rank 0 writes the files.
        """
        if idist.get_world_size() > 1:
            self.rows = self._gather_rows()
        self.summary = summarise(self.rows)
        if idist.get_rank() != 0:
            return

        self.report_paths = write_reports(self.rows, self.output_dir)
        logger.info(
            "Wrote metrics of %d cases to %s.\n%s",
            len(self.rows),
            self.report_paths["csv"],
            format_summary_markdown(self.summary),
        )

    def _gather_rows(self) -> list[dict[str, Any]]:
        """Return the rows of all ranks in rank order, each label file once.

        DistributedSampler pads the data set by repeating cases so that every rank gets
        the same number, so a row whose label file another rank already scored is
        dropped. Names that two different files share get a numeric suffix again.
        """
        named_rows_per_rank = idist.all_gather(list(zip(self._base_names, self.rows)))
        self._files_by_case = {}
        self._base_names = []
        seen_files: set[str] = set()
        rows: list[dict[str, Any]] = []
        for base_name, row in (pair for rank_pairs in named_rows_per_rank for pair in rank_pairs):
            label_file = row["label_file"]
            if label_file and label_file in seen_files:
                continue
            seen_files.add(label_file)
            rows.append({**row, "case": self._unique_case_name(base_name, label_file)})
            self._base_names.append(base_name)
        return rows

    @staticmethod
    def _samples(data: Any, name: str) -> list[Mapping[str, Any]]:
        """Return ``data`` as a list of per-sample dicts, decollating a batched dict."""
        if isinstance(data, Mapping):
            data = decollate_batch(data, detach=True)
        if not isinstance(data, list) or not all(isinstance(item, Mapping) for item in data):
            raise TypeError(
                f"{name} must be a list of dicts or a dict of batched tensors, got {type(data).__name__}. "
                "Use a MONAI SupervisedEvaluator with dict data."
            )
        return data

    def _case_name(self, item: Mapping[str, Any], batch_item: Mapping[str, Any], label_file: str) -> str:
        """Return the case name from ``case_key``, the label file, or the row index."""
        if self.case_key is not None:
            value = item.get(self.case_key, batch_item.get(self.case_key))
            if value is not None and str(value):
                return str(value)
            logger.warning("Sample is missing %r, so the case is named from its label file.", self.case_key)
        if label_file:
            return case_from_path(label_file)
        return f"case_{len(self.rows):04d}"

    def _unique_case_name(self, case: str, label_file: str) -> str:
        """Return ``case``, with a numeric suffix when another label file already used the name."""
        name, suffix = case, 1
        while name in self._files_by_case and (not label_file or self._files_by_case[name] != label_file):
            suffix += 1
            name = f"{case}-{suffix}"
        if name != case:
            logger.warning("Case name %r of %s is already used by another label file, so the case is named %r.", case, label_file or "a sample", name)
        self._files_by_case[name] = label_file
        return name


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. ``compare A.csv B.csv`` prints a paired t-test table."""
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluation", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="paired t-test of two runs' metrics.csv over their shared cases")
    compare.add_argument("csv_a", type=Path, help="metrics.csv of run A")
    compare.add_argument("csv_b", type=Path, help="metrics.csv of run B")
    compare.add_argument(
        "--metrics",
        nargs="+",
        default=list(COMPARED_METRICS),
        help=f"columns to compare (default: {' '.join(COMPARED_METRICS)})",
    )
    compare.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = paired_t_test(args.csv_a, args.csv_b, metrics=args.metrics)
    except (OSError, ValueError) as error:
        parser.error(str(error))

    sys.stdout.write(format_t_test_markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.json, json.dumps(_json_ready(result), indent=2, allow_nan=False) + "\n")
        logger.info("Wrote the t-test result to %s.", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
