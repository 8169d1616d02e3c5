"""Datalists of multi-modality cases, with cross-validation folds grouped by patient.

A datalist is a list of dictionaries, one per case, in the form MONAI's
dictionary transforms read::

    {"case": "brats_009_p01", "patient": "brats_009", "fold": 3,
     "t1": "/abs/.../t1.nii.gz", "t2": "...", "flair": "...", "label": "..."}

It comes either from a case folder, ``<dataset_dir>/<case>/<modality>.nii.gz``
(or ``.nii``) plus ``label.nii.gz``, or from an MSD-style datalist JSON whose
entries give one path per modality or one multi-channel ``"image"``.

Folds are assigned per patient, so that crops or repeated scans of one
patient never sit in both the training and the validation set of a fold.

Command line::

    python -m scripts.datalist --dataset_dir DIR --modalities t1 t2 flair \\
        --patient_pattern '^(brats_\\d+)_p' --output DIR/datalist.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_KEY",
    "LABEL_KEY",
    "assign_folds",
    "build_datalist",
    "case_from_path",
    "load_datalist",
    "patient_from_case",
    "split_by_fold",
    "write_datalist",
]

LABEL_KEY = "label"
IMAGE_KEY = "image"
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# Number of file or case names that an error message lists before "...".
MAX_LISTED_NAMES = 10


def _strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def case_from_path(path: str | os.PathLike, modalities: Sequence[str] = ()) -> str:
    """Return the case name of an image path.

    The name is the parent folder's name when the file is named after a
    modality, the label or the multi-channel image (``<case>/t1.nii.gz``,
    ``<case>/label.nii.gz``, ``<case>/image.nii.gz``). Otherwise it is the file
    name without ``.nii.gz`` or ``.nii`` (``imagesTr/case_001.nii.gz`` gives
    ``case_001``).

    Args:
        path: image file path.
        modalities: modality names that count as generic file names.
    """
    path = Path(path)
    stem = _strip_nifti_suffix(path.name)
    generic_names = {*modalities, LABEL_KEY, IMAGE_KEY}
    if stem in generic_names and path.parent.name:
        return path.parent.name
    return stem


def patient_from_case(case: str, patient_pattern: str | re.Pattern | None = None) -> str:
    """Return the patient id of a case name.

    Args:
        case: case name.
        patient_pattern: regular expression searched in the case name. Its first
            group, or the whole match when it has no group, is the patient id
            (``^(brats_\\d+)_p`` maps ``brats_009_p01`` to ``brats_009``).
            None makes every case its own patient.

    Raises:
        ValueError: when the pattern does not match the case name.
    """
    if patient_pattern is None:
        return case
    pattern = _compile_pattern(patient_pattern)
    match = pattern.search(case)
    if match is None:
        raise ValueError(
            f"patient_pattern {pattern.pattern!r} does not match case {case!r}; "
            "fix the pattern so that it matches every case name, or set it to null to treat each case as a patient."
        )
    return match.group(1) if pattern.groups >= 1 else match.group(0)


def _compile_pattern(patient_pattern: str | re.Pattern) -> re.Pattern:
    if isinstance(patient_pattern, re.Pattern):
        return patient_pattern
    try:
        return re.compile(patient_pattern)
    except re.error as error:
        raise ValueError(f"patient_pattern {patient_pattern!r} is not a valid regular expression: {error}.") from error


def _validate_num_folds(num_folds: int) -> int:
    if isinstance(num_folds, bool) or int(num_folds) != num_folds or num_folds < 1:
        raise ValueError(f"num_folds must be a positive integer, got {num_folds!r}.")
    return int(num_folds)


def _validate_modalities(modalities: Sequence[str]) -> list[str]:
    if isinstance(modalities, str) or len(modalities) == 0:
        raise ValueError(
            f"modalities must be a non-empty list of names such as ['t1', 't2', 'stir'], got {modalities!r}."
        )
    reserved = {LABEL_KEY, "case", "patient", "fold"} & set(modalities)
    if reserved:
        raise ValueError(f"modalities {list(modalities)} contain the reserved key(s) {sorted(reserved)}; rename them.")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities {list(modalities)} contain a duplicate; list each modality once.")
    return list(modalities)


def assign_folds(datalist: list[dict[str, Any]], num_folds: int = 5, seed: int = 0) -> int:
    """Set ``fold`` in the entries that lack one, keeping all cases of a patient in one fold.

    Patients are shuffled with ``seed`` and then, the largest first, given to
    the fold with the fewest cases (the lowest fold index on ties), so folds
    are balanced by case count. A patient that already has a fold in some
    entry keeps it for its other entries. With fewer new patients than folds,
    only as many folds as patients are used and a warning is logged.

    Args:
        datalist: entries with a ``patient`` key; modified in place.
        num_folds: number of folds for patients without a fold.
        seed: seed of the shuffle.

    Returns:
        The number of folds in use after the assignment.
    """
    num_folds = _validate_num_folds(num_folds)
    fold_sizes: Counter[int] = Counter()
    patient_fold: dict[str, int] = {}
    cases_per_patient: Counter[str] = Counter()
    for entry in datalist:
        if entry.get("fold") is not None:
            fold = entry["fold"]
            fold_sizes[fold] += 1
            previous = patient_fold.setdefault(entry["patient"], fold)
            if previous != fold:
                logger.warning(
                    "patient %s has cases in folds %d and %d of the datalist, so its cases leak into validation",
                    entry["patient"],
                    previous,
                    fold,
                )
        else:
            cases_per_patient[entry["patient"]] += 1

    # Cases without a fold whose patient already has one join that fold.
    for patient in list(cases_per_patient):
        if patient in patient_fold:
            fold_sizes[patient_fold[patient]] += cases_per_patient.pop(patient)

    new_patients = sorted(cases_per_patient)
    if new_patients:
        if len(new_patients) < num_folds and not fold_sizes:
            logger.warning(
                "only %d patient(s) for %d folds; using %d folds. Add patients or lower num_folds.",
                len(new_patients),
                num_folds,
                len(new_patients),
            )
            num_folds = len(new_patients)
        for fold in range(num_folds):
            fold_sizes.setdefault(fold, 0)

    random.Random(seed).shuffle(new_patients)
    new_patients.sort(key=lambda patient: -cases_per_patient[patient])  # stable: ties keep the shuffled order
    for patient in new_patients:
        smallest_fold = min(fold_sizes, key=lambda fold: (fold_sizes[fold], fold))
        patient_fold[patient] = smallest_fold
        fold_sizes[smallest_fold] += cases_per_patient[patient]

    for entry in datalist:
        if entry.get("fold") is None:
            entry["fold"] = patient_fold[entry["patient"]]
    return len({entry["fold"] for entry in datalist})


def _find_image(case_dir: Path, name: str) -> Path | None:
    """Return ``<case_dir>/<name>.nii.gz`` or ``.nii``, None when neither exists.

    Raises:
        ValueError: when both exist, because either could be the intended one.
    """
    found = [case_dir / f"{name}{suffix}" for suffix in NIFTI_SUFFIXES if (case_dir / f"{name}{suffix}").is_file()]
    if len(found) > 1:
        raise ValueError(
            f"case folder {case_dir} contains both {found[0].name} and {found[1].name}; remove one of them."
        )
    return found[0] if found else None


def _format_names(names: Sequence[str]) -> str:
    listed = ", ".join(names[:MAX_LISTED_NAMES])
    return listed + (", ..." if len(names) > MAX_LISTED_NAMES else "")


def build_datalist(
    dataset_dir: str | os.PathLike,
    modalities: Sequence[str],
    num_folds: int = 5,
    patient_pattern: str | None = None,
    seed: int = 0,
    require_label: bool = True,
) -> list[dict[str, Any]]:
    """Build a datalist from the case folders ``<dataset_dir>/<case>/<modality>.nii.gz``.

    A sub-folder is a case when it contains a NIfTI file. Files in
    ``dataset_dir`` (a datalist JSON, a licence), hidden folders and folders
    without NIfTI files are skipped.

    Args:
        dataset_dir: folder of case folders.
        modalities: modality names, which are also the file names and the entry keys.
        num_folds: number of cross-validation folds.
        patient_pattern: regular expression that extracts the patient id from a
            case name (see ``patient_from_case``); None makes each case a patient.
        seed: seed of the fold assignment.
        require_label: raise when a case has no ``label.nii.gz``; when False, the
            label is listed where it exists.

    Returns:
        Entries ``{"case", "patient", "fold", <modality>..., "label"}`` sorted by
        case name, with absolute paths as strings.

    Raises:
        FileNotFoundError: when ``dataset_dir`` does not exist.
        ValueError: when a case folder lacks a modality or the label, when no case
            folder exists, or when ``patient_pattern`` does not match a case.
    """
    modalities = _validate_modalities(modalities)
    dataset_dir = Path(dataset_dir).expanduser().absolute()
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder {dataset_dir} not found; check dataset_dir.")

    required = modalities + ([LABEL_KEY] if require_label else [])
    datalist: list[dict[str, Any]] = []
    problems: list[str] = []
    for case_dir in sorted(path for path in dataset_dir.iterdir() if path.is_dir()):
        if case_dir.name.startswith("."):
            continue
        nifti_files = sorted(p.name for p in case_dir.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
        if not nifti_files:
            logger.debug("skipping %s: no NIfTI file", case_dir)
            continue

        try:
            paths = {key: _find_image(case_dir, key) for key in [*modalities, LABEL_KEY]}
        except ValueError as error:
            problems.append(str(error))
            continue
        missing = [f"{key}.nii.gz" for key in required if paths[key] is None]
        if missing:
            problems.append(f"case folder {case_dir} has no {', '.join(missing)} (found: {_format_names(nifti_files)})")
            continue

        entry: dict[str, Any] = {"case": case_dir.name}
        entry.update({key: str(path) for key, path in paths.items() if path is not None})
        datalist.append(entry)

    if problems:
        listed = problems[:MAX_LISTED_NAMES] + (
            [f"... and {len(problems) - MAX_LISTED_NAMES} more"] if len(problems) > MAX_LISTED_NAMES else []
        )
        raise ValueError(
            f"{len(problems)} case folder(s) in {dataset_dir} are incomplete:\n  "
            + "\n  ".join(listed)
            + f"\nEach case needs {', '.join(f'{key}.nii.gz' for key in required)}. Add the missing files, "
            "move the folder out of the dataset, or set modalities to the names of the files."
        )
    if not datalist:
        raise ValueError(
            f"no case folder found in {dataset_dir}; expected {dataset_dir}/<case>/{modalities[0]}.nii.gz "
            f"for modalities {modalities}."
        )

    _set_patients(datalist, patient_pattern)
    used_folds = assign_folds(datalist, num_folds=num_folds, seed=seed)
    logger.info(
        "datalist of %s: %d cases, %d patients, %d folds",
        dataset_dir,
        len(datalist),
        len({entry["patient"] for entry in datalist}),
        used_folds,
    )
    return [_order_keys(entry, modalities) for entry in datalist]


def _set_patients(datalist: list[dict[str, Any]], patient_pattern: str | None) -> None:
    """Set ``patient`` where it is missing, raising one error that lists every case the pattern does not match."""
    unmatched = []
    for entry in datalist:
        if entry.get("patient") is not None:
            entry["patient"] = str(entry["patient"])
            continue
        try:
            entry["patient"] = patient_from_case(entry["case"], patient_pattern)
        except ValueError:
            unmatched.append(entry["case"])
    if unmatched:
        raise ValueError(
            f"patient_pattern {patient_pattern!r} does not match {len(unmatched)} case(s): {_format_names(unmatched)}; "
            "fix the pattern so that it matches every case name, or set it to null to treat each case as a patient."
        )


def _order_keys(entry: dict[str, Any], modalities: Sequence[str]) -> dict[str, Any]:
    """Return the entry with ``case``, ``patient``, ``fold``, the modalities and the label first."""
    leading = ["case", "patient", "fold", *modalities, IMAGE_KEY, LABEL_KEY]
    ordered = {key: entry[key] for key in leading if key in entry}
    ordered.update({key: value for key, value in entry.items() if key not in ordered})
    return ordered


def _read_json_entries(json_path: Path, data_list_key: str) -> list[Any]:
    try:
        with open(json_path, encoding="utf-8") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist {json_path} is not valid JSON: {error}; fix the file.") from error
    if isinstance(content, dict):
        if data_list_key not in content:
            raise ValueError(
                f"datalist {json_path} has no {data_list_key!r} list (keys: {sorted(content)}); "
                f"put the cases under {data_list_key!r} or make the file a plain list."
            )
        content = content[data_list_key]
    if not isinstance(content, list) or not content:
        raise ValueError(f"datalist {json_path} must contain a non-empty list of cases, got {type(content).__name__}.")
    return content


def _resolve_entry(
    raw_entry: Any,
    index: int,
    json_path: Path,
    modalities: list[str],
    require_label: bool,
) -> dict[str, Any]:
    """Validate one JSON entry and return it with absolute paths, ``case`` set and ``fold`` as int or None."""
    if not isinstance(raw_entry, dict):
        raise ValueError(f"entry {index} of {json_path} is a {type(raw_entry).__name__}, not an object of paths.")
    entry = dict(raw_entry)
    name = f"entry {index}" + (f" ({entry['case']!r})" if "case" in entry else "")

    present = [key for key in modalities if key in entry]
    if present and len(present) < len(modalities):
        missing = [key for key in modalities if key not in entry]
        raise ValueError(f"{name} of {json_path} has no {missing}; give a path for every modality {modalities}.")
    image_keys = modalities if present else [IMAGE_KEY]
    if not present and IMAGE_KEY not in entry:
        raise ValueError(
            f"{name} of {json_path} has neither the modality keys {modalities} nor a multi-channel {IMAGE_KEY!r}; "
            "add the image paths."
        )
    if require_label and LABEL_KEY not in entry:
        raise ValueError(
            f"{name} of {json_path} has no {LABEL_KEY!r}; add the label path or set require_label to false."
        )

    path_keys = image_keys + ([LABEL_KEY] if LABEL_KEY in entry else [])
    for key in path_keys:
        if not isinstance(entry[key], (str, os.PathLike)):
            raise ValueError(f"{name} of {json_path}: {key!r} must be a file path, got {entry[key]!r}.")
        path = Path(entry[key]).expanduser()
        if not path.is_absolute():
            path = json_path.parent / path
        if not path.exists():
            raise ValueError(f"{name} of {json_path}: {key!r} file {path} not found; fix the path in the datalist.")
        entry[key] = str(path.absolute())

    if "case" not in entry:
        entry["case"] = case_from_path(entry[image_keys[0]], modalities)
    if entry.get("fold") is not None:
        fold = entry["fold"]
        if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise ValueError(f"{name} of {json_path}: fold must be a non-negative integer, got {fold!r}.")
    return entry


def load_datalist(
    source: str | os.PathLike,
    modalities: Sequence[str],
    num_folds: int = 5,
    patient_pattern: str | None = None,
    seed: int = 0,
    require_label: bool = True,
    data_list_key: str = "training",
) -> list[dict[str, Any]]:
    """Load a datalist from a case folder or an MSD-style datalist JSON.

    A JSON file contains ``{"training": [...]}`` (the key is ``data_list_key``)
    or a plain list. Each entry gives a path for every modality or one
    multi-channel ``"image"``, and optionally ``"label"``, ``"case"``,
    ``"patient"`` and ``"fold"``. Relative paths are resolved against the
    JSON's folder. Entries without a fold get one by patient (see
    ``assign_folds``); other keys are kept.

    Args:
        source: case folder (see ``build_datalist``) or JSON file.
        modalities: modality names, in the order of the network's input channels.
        num_folds, patient_pattern, seed, require_label: see ``build_datalist``.
        data_list_key: key of the case list in a JSON object.

    Returns:
        Entries with absolute paths, ``case``, ``patient`` and ``fold``.

    Raises:
        FileNotFoundError: when ``source`` does not exist.
        ValueError: on an invalid JSON, an entry without images or label, or a
            path that does not exist (the message names the entry, key and path).
    """
    modalities = _validate_modalities(modalities)
    source = Path(source).expanduser().absolute()
    if source.is_dir():
        return build_datalist(source, modalities, num_folds, patient_pattern, seed, require_label)
    if not source.is_file():
        raise FileNotFoundError(f"datalist source {source} not found; give a case folder or a datalist JSON file.")

    raw_entries = _read_json_entries(source, data_list_key)
    datalist = [
        _resolve_entry(raw_entry, index, source, modalities, require_label)
        for index, raw_entry in enumerate(raw_entries)
    ]
    _set_patients(datalist, patient_pattern)
    used_folds = assign_folds(datalist, num_folds=num_folds, seed=seed)
    logger.info(
        "datalist %s: %d cases, %d patients, %d folds",
        source,
        len(datalist),
        len({entry["patient"] for entry in datalist}),
        used_folds,
    )
    return [_order_keys(entry, modalities) for entry in datalist]


def split_by_fold(
    datalist: Sequence[dict[str, Any]], fold: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a datalist into (training, validation) entries for one cross-validation fold.

    Args:
        datalist: entries with a ``fold`` key.
        fold: validation fold. -1 or None trains and validates on all entries,
            which only checks that training runs; a warning is logged.

    Raises:
        ValueError: when an entry has no fold, when ``fold`` has no cases (the
            message lists the valid folds), or when every case is in ``fold``.
    """
    unassigned = [entry.get("case", index) for index, entry in enumerate(datalist) if entry.get("fold") is None]
    if unassigned:
        raise ValueError(
            f"entries {unassigned[:MAX_LISTED_NAMES]} have no fold; build the datalist with load_datalist."
        )
    if fold is not None:
        try:
            fold = int(fold)
        except (TypeError, ValueError) as error:
            raise ValueError(f"fold must be an integer fold index or -1, got {fold!r}.") from error
    if fold is None or fold == -1:
        logger.warning(
            "fold %s: training and validating on all %d cases, so validation scores are not held out",
            fold,
            len(datalist),
        )
        return list(datalist), list(datalist)

    valid_folds = sorted({entry["fold"] for entry in datalist})
    validation = [entry for entry in datalist if entry["fold"] == fold]
    training = [entry for entry in datalist if entry["fold"] != fold]
    if not validation:
        raise ValueError(
            f"fold {fold!r} has no cases; choose one of {valid_folds}, or -1 to train and validate on all."
        )
    if not training:
        raise ValueError(
            f"fold {fold!r} contains every case, which leaves none for training; use fold -1 or add patients."
        )
    return training, validation


def write_datalist(
    datalist: Sequence[dict[str, Any]], path: str | os.PathLike, data_list_key: str = "training"
) -> Path:
    """Write ``{"training": datalist}`` as JSON through a temporary file and a rename, and return the path."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump({data_list_key: list(datalist)}, file, indent=2)
            file.write("\n")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command-line interface that writes a datalist JSON for a case folder."""
    parser = argparse.ArgumentParser(description="Write an MSD-style datalist JSON with patient-grouped folds.")
    parser.add_argument("--dataset_dir", required=True, help="folder of case folders <case>/<modality>.nii.gz")
    parser.add_argument(
        "--modalities", nargs="+", default=["t1", "t2", "stir"], help="modality file names, in channel order"
    )
    parser.add_argument(
        "--patient_pattern", default=None, help="regular expression whose first group is the patient id of a case name"
    )
    parser.add_argument("--num_folds", type=int, default=5, help="number of cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument("--no_label", action="store_true", help="accept cases without label.nii.gz")
    parser.add_argument("--output", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    datalist = build_datalist(
        args.dataset_dir,
        args.modalities,
        num_folds=args.num_folds,
        patient_pattern=args.patient_pattern,
        seed=args.seed,
        require_label=not args.no_label,
    )
    output = write_datalist(datalist, args.output)
    cases_per_fold = Counter(entry["fold"] for entry in datalist)
    logger.info("wrote %s; cases per fold: %s", output, dict(sorted(cases_per_fold.items())))


if __name__ == "__main__":
    main()
