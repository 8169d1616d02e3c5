"""Loading and integrity checks of multi-modality cases.

``LoadCased`` is the first preprocessing transform. It accepts a case in
either of two forms and always returns one channel-first MetaTensor of shape
(1, X, Y, Z) per modality:

- one file (or array) per modality, under the modality keys,
- one multi-channel image under ``image`` (as MONAI Label sends it): a 4D
  NIfTI with the channels last on disk, (M, X, Y, Z) after loading, with
  channel ``i`` being ``modalities[i]``.

Every file is checked before use, and each problem gets an error that names
the file and the fix. ``check_dataset`` runs the same checks on a whole
datalist and reports every problem at once, before training starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, ResampleToMatch
from monai.utils import ImageMetaKey
from tqdm import tqdm

logger = logging.getLogger(__name__)

__all__ = ["CaseGrid", "InvalidCaseError", "LoadCased", "case_grid", "check_dataset"]

# Number of distinct label values that an error message lists.
MAX_LISTED_VALUES = 10


class InvalidCaseError(ValueError):
    """Error for a case that cannot be loaded. ``problems`` lists one message per problem, each naming its file."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n  " + "\n  ".join(self.problems)
        super().__init__(message)


@dataclass(frozen=True)
class CaseGrid:
    """Voxel grid of an image: spatial shape (X, Y, Z), spacing in mm, direction cosines (3, 3), origin in mm."""

    shape: tuple[int, ...]
    spacing_mm: np.ndarray
    direction: np.ndarray
    origin_mm: np.ndarray


def case_grid(image: MetaTensor) -> CaseGrid:
    """Return the grid of a channel-first image of shape (C, X, Y, Z) from its shape and affine."""
    affine = np.asarray(image.affine, dtype=np.float64)
    linear = affine[:3, :3]
    spacing = np.sqrt((linear * linear).sum(axis=0))
    return CaseGrid(
        shape=tuple(int(size) for size in image.shape[1:]),
        spacing_mm=spacing,
        direction=linear / np.where(spacing > 0, spacing, 1.0),
        origin_mm=affine[:3, 3].copy(),
    )


def _format_vector(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{value:.4g}" for value in values) + ")"


def _grid_difference(reference: CaseGrid, other: CaseGrid, atol_mm: float, direction_atol: float) -> str | None:
    """Describe the first property in which ``other`` differs from ``reference``, or return None when they match."""
    if other.shape != reference.shape:
        return f"shape {other.shape} differs from {reference.shape}"
    if not np.allclose(other.spacing_mm, reference.spacing_mm, rtol=0.0, atol=atol_mm):
        return f"spacing {_format_vector(other.spacing_mm)} mm differs from {_format_vector(reference.spacing_mm)} mm"
    if not np.allclose(other.direction, reference.direction, rtol=0.0, atol=direction_atol):
        return f"direction {other.direction.round(4).tolist()} differs from {reference.direction.round(4).tolist()}"
    if not np.allclose(other.origin_mm, reference.origin_mm, rtol=0.0, atol=atol_mm):
        return f"origin {_format_vector(other.origin_mm)} mm differs from {_format_vector(reference.origin_mm)} mm"
    return None


def _source_name(value: Any, key: str) -> str:
    """Return the file name of a path or a loaded MetaTensor, or a description of an in-memory array."""
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, MetaTensor) and value.meta.get(ImageMetaKey.FILENAME_OR_OBJ):
        return str(value.meta[ImageMetaKey.FILENAME_OR_OBJ])
    return f"in-memory {key!r} array"


class LoadCased(MapTransform):
    """Load one case, one channel-first image per modality, and check it.

    Input: a dictionary with a path (or a loaded array) per modality key, or
    one multi-channel path or array under ``image_key``, plus optionally
    ``label_key``. A modality key that is present selects the per-modality
    form, and then every modality must be present. Arrays must be channel-first:
    (1, X, Y, Z) per modality or (M, X, Y, Z) for the multi-channel form. A
    MetaTensor keeps its affine, and a plain array gets the identity affine.

    Output: the dictionary with each modality as a float32 MetaTensor of shape
    (1, X, Y, Z) and the label, when present, as a float32 MetaTensor of shape
    (1, X, Y, Z) with values 0 and 1. Files are read with MONAI's ``LoadImage``,
    so the metadata (affine, ``filename_or_obj``) stays for inverting the
    preprocessing and saving. The multi-channel entry is removed after
    splitting. Other keys pass through unchanged.

    Each of these problems raises ``InvalidCaseError`` (a ``ValueError``) with a
    message that names the file and the fix. All problems of a case are
    reported in one error.

    - a missing key or file, or a file that cannot be read,
    - an image that is not 3D or has more than one channel,
    - a multi-channel image with a channel count other than ``len(modalities)``,
    - NaN or infinite voxels,
    - a label with values other than 0 and 1,
    - an image or label whose grid (shape, spacing, direction, origin) differs
      from the first modality's. With ``resample_misaligned``, such an image is
      resampled onto the first modality's grid instead (trilinear, the label
      nearest-neighbour), with a warning that names both files.

    Args:
        modalities: modality keys in channel order, e.g. ``["t1", "t2", "stir"]``.
        label_key: key of the label.
        image_key: key of the multi-channel image.
        resample_misaligned: resample images whose grid differs from the first
            modality's instead of raising.
        atol_mm: tolerance on spacing and origin, in mm.
        direction_atol: tolerance on the direction cosines.
        allow_missing_label: accept a case without ``label_key`` (for inference).
        reader: image reader for ``LoadImage`` (e.g. ``"NibabelReader"``); None
            picks one by file suffix.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        label_key: str = "label",
        image_key: str = "image",
        resample_misaligned: bool = False,
        atol_mm: float = 1e-3,
        direction_atol: float = 1e-4,
        allow_missing_label: bool = True,
        reader: str | None = None,
    ) -> None:
        if isinstance(modalities, str) or len(modalities) == 0:
            raise ValueError(
                f"modalities must be a non-empty list of keys such as ['t1', 't2', 'stir'], got {modalities!r}."
            )
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities {list(modalities)} contain a duplicate; list each modality once.")
        if label_key in modalities:
            raise ValueError(
                f"label_key {label_key!r} is also a modality in {list(modalities)}; use another label_key."
            )
        if not atol_mm > 0 or not direction_atol > 0:
            raise ValueError(f"atol_mm and direction_atol must be positive, got {atol_mm!r} and {direction_atol!r}.")
        keys: KeysCollection = [*modalities, label_key]
        super().__init__(keys, allow_missing_keys=True)
        self.modalities = list(modalities)
        self.label_key = label_key
        self.image_key = image_key
        self.resample_misaligned = resample_misaligned
        self.atol_mm = float(atol_mm)
        self.direction_atol = float(direction_atol)
        self.allow_missing_label = allow_missing_label
        self.loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=np.float32)
        self.resampler = ResampleToMatch(padding_mode="zeros")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return ``data`` with the case loaded and checked, or raise ``InvalidCaseError`` listing every problem."""
        loaded, problems = self.load_case(data)
        if problems:
            raise InvalidCaseError(problems)

        output = dict(data)
        if not any(key in data for key in self.modalities):
            output.pop(self.image_key, None)
        output.update(loaded)
        return output

    def load_case(self, data: Mapping[Hashable, Any]) -> tuple[dict[str, MetaTensor], list[str]]:
        """Load and check a case without raising.

        Returns:
            The images (and label) that loaded, keyed by modality and label key,
            and one message per problem found. The images are complete only when
            the list of problems is empty.
        """
        if not isinstance(data, Mapping):
            return {}, [f"LoadCased expects a dictionary of paths, got {type(data).__name__}; use a datalist entry."]

        problems: list[str] = []
        names: dict[str, str] = {}
        if any(key in data for key in self.modalities):
            images = self._load_per_modality(data, problems, names)
        elif self.image_key in data:
            images = self._load_multi_channel(data[self.image_key], problems, names)
        else:
            keys = sorted(str(key) for key in data)
            return {}, [
                f"case with keys {keys} has neither the modality keys {self.modalities} nor {self.image_key!r}; "
                "add the image paths to the datalist entry."
            ]

        if self.label_key in data and data[self.label_key] is not None:
            label = self._load_single(data[self.label_key], self.label_key, problems, names)
            if label is not None and self._check_label_values(label, names[self.label_key], problems):
                images[self.label_key] = label
        elif not self.allow_missing_label:
            first_file = next(iter(names.values()), "with no images")
            problems.append(
                f"case of {first_file} has no {self.label_key!r}; "
                "add the label path or set allow_missing_label to true."
            )

        self._match_grids(images, names, problems)
        return images, problems

    def _read(self, value: Any, key: str, problems: list[str]) -> MetaTensor | None:
        """Read a path with LoadImage or wrap an array. On failure, record a problem and return None."""
        name = _source_name(value, key)
        if isinstance(value, (str, os.PathLike)):
            if not os.path.exists(value):
                problems.append(f"{key} file {name} not found; fix the path in the datalist or add the file.")
                return None
            try:
                image = self.loader(value)
            except (
                Exception
            ) as error:  # noqa: BLE001 - readers of damaged files raise many types (EOFError, zlib.error, ...)
                problems.append(
                    f"{key} file {name} could not be read ({type(error).__name__}: {error}); "
                    "the file is damaged or not an image. Export it again as NIfTI."
                )
                return None
        elif isinstance(value, (np.ndarray, torch.Tensor)):
            image = value if isinstance(value, MetaTensor) else MetaTensor(torch.as_tensor(value))
            image = image.to(torch.float32)
        else:
            problems.append(f"{key} must be a file path or a channel-first array, got {type(value).__name__}.")
            return None

        # A NIfTI vector image (X, Y, Z, 1, M) loads as (M, X, Y, Z, 1): drop the trailing unit dimension.
        while image.ndim > 4 and image.shape[-1] == 1:
            image = image.squeeze(-1)
        return image

    def _check_finite(self, image: MetaTensor, key: str, name: str, problems: list[str]) -> bool:
        non_finite = int((~torch.isfinite(image)).sum())
        if non_finite:
            problems.append(
                f"{key} file {name} has {non_finite} NaN or infinite voxel(s); "
                "replace them (e.g. with 0) or export the image again."
            )
        return non_finite == 0

    def _check_spatial_dims(self, image: MetaTensor, key: str, name: str, problems: list[str]) -> bool:
        if image.ndim != 4:
            problems.append(
                f"{key} file {name} has shape {tuple(image.shape)} after loading (channel first), so "
                f"{image.ndim - 1} spatial dimension(s); a 3D volume (X, Y, Z) is expected. "
                "Give a 3D image; a single slice needs the shape (X, Y, 1)."
            )
            return False
        return True

    def _load_single(self, value: Any, key: str, problems: list[str], names: dict[str, str]) -> MetaTensor | None:
        """Load one single-channel image (a modality or the label) of shape (1, X, Y, Z)."""
        names[key] = _source_name(value, key)
        image = self._read(value, key, problems)
        if image is None or not self._check_spatial_dims(image, key, names[key], problems):
            return None
        if image.shape[0] != 1:
            problems.append(
                f"{key} file {names[key]} has {image.shape[0]} channels (shape {tuple(image.shape)}) "
                "but one is expected; "
                f"give one image per modality, or pass the multi-channel image as {self.image_key!r} "
                f"with channels in the order {self.modalities}."
            )
            return None
        if not self._check_finite(image, key, names[key], problems):
            return None
        return image

    def _load_per_modality(
        self, data: Mapping[Hashable, Any], problems: list[str], names: dict[str, str]
    ) -> dict[str, MetaTensor]:
        images: dict[str, MetaTensor] = {}
        for modality in self.modalities:
            if modality not in data or data[modality] is None:
                problems.append(
                    f"case has no {modality!r} (keys: {sorted(str(key) for key in data)}); "
                    f"add the {modality} path to the datalist entry or remove {modality!r} from modalities."
                )
                continue
            image = self._load_single(data[modality], modality, problems, names)
            if image is not None:
                images[modality] = image
        return images

    def _load_multi_channel(self, value: Any, problems: list[str], names: dict[str, str]) -> dict[str, MetaTensor]:
        """Load an (M, X, Y, Z) image and split it into one (1, X, Y, Z) image per modality."""
        name = _source_name(value, self.image_key)
        image = self._read(value, self.image_key, problems)
        if image is None or not self._check_spatial_dims(image, self.image_key, name, problems):
            return {}
        if image.shape[0] != len(self.modalities):
            problems.append(
                f"{self.image_key} file {name} has {image.shape[0]} channels (shape {tuple(image.shape)}) but "
                f"{len(self.modalities)} modalities {self.modalities} are configured; make the channel count match "
                "the modalities, in the same order."
            )
            return {}
        if not self._check_finite(image, self.image_key, name, problems):
            return {}

        images = {}
        for channel, modality in enumerate(self.modalities):
            images[modality] = image[channel : channel + 1].clone()  # (1, X, Y, Z), metadata copied
            names[modality] = f"{name} (channel {channel}, {modality})"
        return images

    def _check_label_values(self, label: MetaTensor, name: str, problems: list[str]) -> bool:
        values = torch.unique(label.as_tensor())
        unexpected = values[(values != 0) & (values != 1)]
        if unexpected.numel():
            listed = ", ".join(f"{value:g}" for value in values[:MAX_LISTED_VALUES].tolist())
            more = ", ..." if values.numel() > MAX_LISTED_VALUES else ""
            problems.append(
                f"{self.label_key} file {name} contains the values [{listed}{more}] but only 0 (background) and "
                "1 (tumour) are allowed; map every tumour class to 1 and everything else to 0."
            )
            return False
        return True

    def _match_grids(self, images: dict[str, MetaTensor], names: dict[str, str], problems: list[str]) -> None:
        """Compare every image's grid with the first modality's, and resample the image or record a problem."""
        reference_key = self.modalities[0]
        if reference_key not in images:
            return
        reference = images[reference_key]
        reference_grid = case_grid(reference)
        for key, image in list(images.items()):
            if key == reference_key:
                continue
            difference = _grid_difference(reference_grid, case_grid(image), self.atol_mm, self.direction_atol)
            if difference is None:
                continue
            if not self.resample_misaligned:
                problems.append(
                    f"{key} file {names[key]} is not on the grid of {reference_key} file {names[reference_key]}: "
                    f"{difference}. Register or resample it, or set resample_misaligned to true to resample it "
                    f"onto the {reference_key} grid."
                )
                continue
            logger.warning(
                "resampling %s file %s onto the grid of %s file %s: %s",
                key,
                names[key],
                reference_key,
                names[reference_key],
                difference,
            )
            mode = "nearest" if key == self.label_key else "bilinear"
            images[key] = self.resampler(image, img_dst=reference, mode=mode)


def check_dataset(
    datalist: Sequence[Mapping[str, Any]],
    modalities: Sequence[str],
    resample_misaligned: bool = False,
    label_key: str = "label",
    image_key: str = "image",
    allow_missing_label: bool = False,
) -> None:
    """Check every case of a datalist with ``LoadCased`` and raise one error that lists every problem.

    Each case is loaded in full, so this reads the whole dataset once. When all
    cases pass, a summary (case count, spacing and shape ranges, cases with an
    empty label) is logged.

    Args:
        datalist: entries as ``scripts.datalist.load_datalist`` returns them.
        modalities: modality keys in channel order.
        resample_misaligned: accept grids that differ from the first modality's
            (they would be resampled), with a warning per file.
        label_key, image_key: keys of the label and the multi-channel image.
        allow_missing_label: accept cases without a label.

    Raises:
        ValueError: listing each failing case and its problems.
    """
    loader = LoadCased(
        modalities,
        label_key=label_key,
        image_key=image_key,
        resample_misaligned=resample_misaligned,
        allow_missing_label=allow_missing_label,
    )
    failures: list[str] = []
    failing_cases: set[str] = set()
    spacings: list[np.ndarray] = []
    shapes: list[tuple[int, ...]] = []
    empty_labels: list[str] = []
    for index, entry in enumerate(tqdm(datalist, desc="checking cases", unit="case")):
        case = str(entry.get("case", f"entry {index}")) if isinstance(entry, Mapping) else f"entry {index}"
        images, problems = loader.load_case(entry)
        if problems:
            failures.extend(f"{case}: {problem}" for problem in problems)
            failing_cases.add(case)
            continue

        grid = case_grid(images[modalities[0]])
        spacings.append(grid.spacing_mm)
        shapes.append(grid.shape)
        if label_key in images and not bool(images[label_key].any()):
            empty_labels.append(case)

    if failures:
        raise ValueError(
            f"dataset check failed: {len(failures)} problem(s) in {len(failing_cases)} of {len(datalist)} case(s):\n  "
            + "\n  ".join(failures)
        )
    if not spacings:
        raise ValueError("dataset check failed: the datalist is empty; check dataset_dir or the datalist file.")

    spacing_array = np.stack(spacings)
    shape_array = np.array(shapes)
    logger.info(
        "dataset check passed: %d cases, spacing from %s to %s mm, shape from %s to %s",
        len(spacings),
        _format_vector(spacing_array.min(axis=0)),
        _format_vector(spacing_array.max(axis=0)),
        tuple(shape_array.min(axis=0).tolist()),
        tuple(shape_array.max(axis=0).tolist()),
    )
    if empty_labels:
        logger.warning("%d case(s) have an empty label (no tumour): %s", len(empty_labels), ", ".join(empty_labels))
