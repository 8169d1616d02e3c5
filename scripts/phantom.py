"""Synthetic multi-modality MRI of a parotid tumour, for tests and demonstrations.

Each case is a small anisotropic volume that mimics a head-and-neck MRI crop
around the parotid gland. The arrays are in MONAI's spatial order (X, Y, Z),
with Z the through-plane axis, on a grid of about 0.4 x 0.4 x 4.4 mm with
12-24 slices. A case contains:

- air (signal 0) around a head-like elliptic cylinder of subcutaneous fat with
  a thin skin rim,
- a parotid gland (ellipsoid) that contains most of the tumour,
- the tumour: an ellipsoid of 5-35 mm mean diameter (log-uniform), randomly
  elongated, rotated and lobulated, with a soft boundary and a smooth texture.
  It is hypointense to the gland on T1 and hyperintense on T2, STIR and FLAIR.
- distractors at least ``DISTRACTOR_MARGIN_MM`` from the tumour: muscle-like
  ellipsoids with the tumour's T1 signal, and vessel-like tubes running
  through-plane with the tumour's T2, STIR and FLAIR signal,
- a smooth multiplicative bias field (within +-10 %) per modality and Rician
  noise.

The label is the tumour only (0 background, 1 tumour). The generator is
deterministic: the same seed gives byte-identical arrays on the same NumPy and
SciPy versions.

Command line::

    python -m scripts.phantom --output_dir data/phantom --num_cases 10 --seed 0
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODALITIES",
    "DEFAULT_NUM_CASES",
    "DEFAULT_SHAPE_XY",
    "DEFAULT_SPACING_MM",
    "PhantomCase",
    "Tissue",
    "case_seed",
    "ensure_phantom_dataset",
    "generate_phantom_case",
    "generate_phantom_dataset",
    "write_phantom_case",
]

DEFAULT_MODALITIES = ("t1", "t2", "stir")

# 192 x 192 voxels of 0.4 mm give a 76.8 mm field of view, room for a 35 mm
# tumour with gland, muscle and vessels around it.
DEFAULT_SHAPE_XY = (192, 192)
DEFAULT_SPACING_MM = (0.4, 0.4, 4.4)
SLICE_COUNT_RANGE = (12, 24)

# 10 cases give 5 cross-validation folds of 2 validation and 8 training cases each.
DEFAULT_NUM_CASES = 10

TUMOUR_DIAMETER_RANGE_MM = (5.0, 35.0)
DISTRACTOR_MARGIN_MM = 3.0
MIN_FIELD_OF_VIEW_MM = 25.0

# Signal of the parotid gland before the per-modality gain, in arbitrary units.
GLAND_SIGNAL = 400.0

# A distractor given this marker gets the tumour's signal times U(0.9, 1.1).
TUMOUR_LIKE = "tumour-like"


class Tissue(IntEnum):
    """Tissue codes of ``PhantomCase.tissue_map``."""

    AIR = 0
    FAT = 1
    SKIN = 2
    GLAND = 3
    MUSCLE = 4
    VESSEL = 5
    TUMOUR = 6


# Signal of each tissue relative to the parotid gland, as a (min, max) range
# sampled once per case, or TUMOUR_LIKE. Fat is bright on T1 and T2 and
# suppressed on STIR. Slow-flow vessels are bright on T2, STIR and FLAIR.
CONTRAST_RANGES: dict[str, dict[Tissue, tuple[float, float] | str]] = {
    "t1": {
        Tissue.FAT: (1.8, 2.2),
        Tissue.SKIN: (1.0, 1.2),
        Tissue.MUSCLE: TUMOUR_LIKE,
        Tissue.VESSEL: (0.25, 0.4),
        Tissue.TUMOUR: (0.45, 0.7),
    },
    "t2": {
        Tissue.FAT: (1.3, 1.6),
        Tissue.SKIN: (0.8, 1.0),
        Tissue.MUSCLE: (0.45, 0.6),
        Tissue.VESSEL: TUMOUR_LIKE,
        Tissue.TUMOUR: (1.5, 2.2),
    },
    "stir": {
        Tissue.FAT: (0.15, 0.3),
        Tissue.SKIN: (0.7, 0.9),
        Tissue.MUSCLE: (0.5, 0.65),
        Tissue.VESSEL: TUMOUR_LIKE,
        Tissue.TUMOUR: (2.0, 3.0),
    },
    "flair": {
        Tissue.FAT: (1.2, 1.4),
        Tissue.SKIN: (0.8, 1.0),
        Tissue.MUSCLE: (0.5, 0.65),
        Tissue.VESSEL: TUMOUR_LIKE,
        Tissue.TUMOUR: (1.4, 1.9),
    },
}
SUPPORTED_MODALITIES = tuple(CONTRAST_RANGES)


@dataclass(frozen=True)
class PhantomCase:
    """One synthetic case.

    Attributes:
        images: float32 array of shape (X, Y, Z) per modality, in the order requested.
        label: uint8 tumour mask of shape (X, Y, Z), values 0 and 1.
        tissue_map: uint8 array of shape (X, Y, Z) with ``Tissue`` codes.
        affine: (4, 4) voxel-to-world matrix in RAS millimetres, spacing on the
            diagonal and the volume centred on the world origin.
        spacing_mm: voxel size (X, Y, Z) in mm.
        tumour_diameter_mm: sampled mean diameter of the tumour ellipsoid.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    tissue_map: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    tumour_diameter_mm: float

    @property
    def tumour_volume_cc(self) -> float:
        """Tumour volume in cubic centimetres, counted from the label voxels."""
        voxel_volume_mm3 = float(np.prod(self.spacing_mm))
        return float(self.label.sum()) * voxel_volume_mm3 / 1000.0


def _validate_arguments(
    modalities: Sequence[str],
    shape_xy: Sequence[int],
    num_slices: int | None,
    spacing_mm: Sequence[float],
) -> None:
    if isinstance(modalities, str) or len(modalities) == 0:
        raise ValueError(f"modalities must be a non-empty list of names, got {modalities!r}.")
    unknown = [name for name in modalities if name not in CONTRAST_RANGES]
    if unknown:
        raise ValueError(f"modalities {unknown} have no phantom contrast; choose from {list(SUPPORTED_MODALITIES)}.")
    if len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities {list(modalities)} contain a duplicate; list each modality once.")

    if len(shape_xy) != 2 or any(int(size) != size or size < 32 for size in shape_xy):
        raise ValueError(f"shape_xy must be two integers of at least 32 voxels, got {shape_xy!r}.")
    if num_slices is not None and (int(num_slices) != num_slices or num_slices < 4):
        raise ValueError(
            f"num_slices must be None (random in {SLICE_COUNT_RANGE}) or an integer >= 4, got {num_slices!r}."
        )
    if len(spacing_mm) != 3 or any(not spacing > 0 for spacing in spacing_mm):
        raise ValueError(f"spacing_mm must be three positive voxel sizes in mm, got {spacing_mm!r}.")

    field_of_view_mm = min(shape_xy[0] * spacing_mm[0], shape_xy[1] * spacing_mm[1])
    if field_of_view_mm < MIN_FIELD_OF_VIEW_MM:
        raise ValueError(
            f"the in-plane field of view shape_xy * spacing_mm = {field_of_view_mm:.1f} mm is too small for the "
            f"phantom's anatomy; increase shape_xy or spacing_mm to give at least {MIN_FIELD_OF_VIEW_MM} mm."
        )


def _world_coordinates(shape: tuple[int, int, int], spacing_mm: Sequence[float]) -> list[np.ndarray]:
    """Return the voxel-centre coordinates in mm along X, Y and Z, centred on 0, as broadcastable arrays."""
    axes = []
    for axis, (size, spacing) in enumerate(zip(shape, spacing_mm)):
        coordinates = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * spacing
        view_shape = [1, 1, 1]
        view_shape[axis] = size
        axes.append(coordinates.reshape(view_shape))
    return axes


def _ellipsoid_radius(
    coordinates: list[np.ndarray],
    centre: Sequence[float],
    semi_axes: Sequence[float],
    angle: float = 0.0,
) -> np.ndarray:
    """Return the normalised radius (1 on the surface) of an ellipsoid rotated by ``angle`` in-plane."""
    x = coordinates[0] - centre[0]
    y = coordinates[1] - centre[1]
    z = coordinates[2] - centre[2]
    cos_angle, sin_angle = math.cos(angle), math.sin(angle)
    u = x * cos_angle + y * sin_angle
    v = -x * sin_angle + y * cos_angle
    return np.sqrt((u / semi_axes[0]) ** 2 + (v / semi_axes[1]) ** 2 + (z / semi_axes[2]) ** 2)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: Sequence[float]) -> np.ndarray:
    """Return Gaussian-filtered white noise rescaled to a maximum absolute value of 1."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=sigma_voxels, mode="reflect")
    return field / max(float(np.abs(field).max()), 1e-12)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Return a smooth multiplicative field between 0.9 and 1.1 (a quadratic polynomial in normalised coordinates)."""
    x = np.linspace(-1.0, 1.0, shape[0]).reshape(-1, 1, 1)
    y = np.linspace(-1.0, 1.0, shape[1]).reshape(1, -1, 1)
    z = np.linspace(-1.0, 1.0, shape[2]).reshape(1, 1, -1)
    terms = [x, y, z, x * x, y * y, x * y]
    coefficients = rng.uniform(-1.0, 1.0, size=len(terms))
    polynomial = np.zeros(shape)
    for coefficient, term in zip(coefficients, terms):
        polynomial = polynomial + coefficient * term
    polynomial /= max(float(np.abs(polynomial).max()), 1e-12)
    strength = rng.uniform(0.05, 0.1)
    return 1.0 + strength * polynomial


def _place_distractor(
    make_mask: Callable[[np.random.Generator, float], np.ndarray],
    rng: np.random.Generator,
    allowed: np.ndarray,
    tumour_distance_mm: np.ndarray,
    min_voxels: int,
    max_tries: int = 200,
) -> np.ndarray | None:
    """Sample masks from ``make_mask(rng, scale)`` until one lies inside ``allowed`` and away from the tumour.

    The size scale shrinks from 1 towards 0.5 over the tries, so crowded cases
    still get a smaller distractor. Returns None when every try fails.
    """
    for attempt in range(max_tries):
        scale = 1.0 - 0.5 * attempt / max_tries
        mask = make_mask(rng, scale) & allowed
        if mask.sum() < min_voxels:
            continue
        if tumour_distance_mm[mask].min() >= DISTRACTOR_MARGIN_MM:
            return mask
    return None


def _sample_contrasts(rng: np.random.Generator, modalities: Sequence[str]) -> dict[str, dict[Tissue, float]]:
    """Draw each tissue's signal per modality, in arbitrary units, with the gland at ``GLAND_SIGNAL`` times a gain."""
    contrasts: dict[str, dict[Tissue, float]] = {}
    for modality in modalities:
        gain = GLAND_SIGNAL * rng.uniform(0.8, 1.25)
        ranges = CONTRAST_RANGES[modality]
        tumour_signal = rng.uniform(*ranges[Tissue.TUMOUR])
        signals = {Tissue.AIR: 0.0, Tissue.GLAND: gain, Tissue.TUMOUR: gain * tumour_signal}
        for tissue in (Tissue.FAT, Tissue.SKIN, Tissue.MUSCLE, Tissue.VESSEL):
            relative = ranges[tissue]
            if relative == TUMOUR_LIKE:
                signals[tissue] = gain * tumour_signal * rng.uniform(0.9, 1.1)
            else:
                signals[tissue] = gain * rng.uniform(*relative)
        contrasts[modality] = signals
    return contrasts


@dataclass(frozen=True)
class _Head:
    """In-plane ellipse of the head (an elliptic cylinder along Z), in mm."""

    centre: tuple[float, float]
    semi_axes: tuple[float, float]
    inner_radius: float  # normalised radius of the fat-skin border
    radius: np.ndarray  # normalised radius per voxel, 1 on the skin surface, shape (X, Y, Z)


@dataclass(frozen=True)
class _Tumour:
    """Tumour and gland geometry."""

    label: np.ndarray  # bool (X, Y, Z)
    membership: np.ndarray  # soft tumour membership in [0, 1], shape (X, Y, Z)
    diameter_mm: float
    gland_centre: list[float]
    gland_semi_axes: list[float]


def _draw_head(
    rng: np.random.Generator, coordinates: list[np.ndarray], half_extent_mm: list[float], tissue_map: np.ndarray
) -> _Head:
    """Draw the head as fat inside a skin rim into ``tissue_map``."""
    semi_axes = (half_extent_mm[0] * rng.uniform(0.82, 0.92), half_extent_mm[1] * rng.uniform(0.82, 0.92))
    centre = (rng.uniform(-0.03, 0.03) * half_extent_mm[0], rng.uniform(-0.03, 0.03) * half_extent_mm[1])
    radius = np.sqrt(
        ((coordinates[0] - centre[0]) / semi_axes[0]) ** 2 + ((coordinates[1] - centre[1]) / semi_axes[1]) ** 2
    ) + np.zeros(tissue_map.shape)
    skin_thickness_mm = rng.uniform(1.5, 2.5)
    inner_radius = 1.0 - skin_thickness_mm / min(semi_axes)
    tissue_map[radius <= 1.0] = Tissue.SKIN
    tissue_map[radius <= inner_radius] = Tissue.FAT
    return _Head(centre=centre, semi_axes=semi_axes, inner_radius=inner_radius, radius=radius)


def _draw_gland_and_tumour(
    rng: np.random.Generator,
    coordinates: list[np.ndarray],
    half_extent_mm: list[float],
    spacing: tuple[float, float, float],
    head: _Head,
    tissue_map: np.ndarray,
) -> _Tumour:
    """Draw the gland into ``tissue_map`` and return the tumour inside it (not yet drawn)."""
    # Tumour size and shape: log-uniform mean diameter, at most 55 % of the head's inner width.
    max_diameter_mm = min(TUMOUR_DIAMETER_RANGE_MM[1], 0.55 * 2.0 * min(head.semi_axes) * head.inner_radius)
    min_diameter_mm = min(TUMOUR_DIAMETER_RANGE_MM[0], max_diameter_mm)
    diameter_mm = float(math.exp(rng.uniform(math.log(min_diameter_mm), math.log(max_diameter_mm))))
    elongation = rng.uniform(0.8, 1.25, size=3)
    elongation /= np.prod(elongation) ** (1.0 / 3.0)
    semi_axes = diameter_mm / 2.0 * elongation
    semi_axes[2] = min(semi_axes[2], max(half_extent_mm[2] - 2.0 * spacing[2], spacing[2]))

    # Gland: an ellipsoid large enough to hold the tumour, inside the head.
    gland_semi_axes = [
        max(rng.uniform(14.0, 20.0), 1.2 * semi_axes.max() + 3.0),
        max(rng.uniform(12.0, 18.0), 1.2 * semi_axes.max() + 3.0),
        rng.uniform(18.0, 28.0),
    ]
    for axis in range(2):
        gland_semi_axes[axis] = min(gland_semi_axes[axis], 0.8 * head.semi_axes[axis] * head.inner_radius)
    room_mm = [max(head.semi_axes[axis] * head.inner_radius - gland_semi_axes[axis], 0.0) for axis in range(2)]
    gland_centre = [head.centre[axis] + rng.uniform(-0.5, 0.5) * room_mm[axis] for axis in range(2)]
    gland_centre.append(rng.uniform(-0.2, 0.2) * half_extent_mm[2])
    gland_angle = rng.uniform(0.0, math.pi)
    gland = _ellipsoid_radius(coordinates, gland_centre, gland_semi_axes, gland_angle) <= 1.0
    tissue_map[gland & (head.radius <= head.inner_radius)] = Tissue.GLAND

    # Position: inside the gland, the centre on a slice centre so that the label is never empty.
    offset = rng.uniform(-0.35, 0.35, size=2) * (np.array(gland_semi_axes[:2]) - semi_axes[:2]).clip(min=0.0)
    z_room_mm = max(half_extent_mm[2] - semi_axes[2] - spacing[2], 0.0)
    slice_z_mm = coordinates[2].ravel()
    centre_z_mm = float(slice_z_mm[np.argmin(np.abs(slice_z_mm - rng.uniform(-z_room_mm, z_room_mm)))])
    centre = [gland_centre[0] + offset[0], gland_centre[1] + offset[1], centre_z_mm]
    radius = _ellipsoid_radius(coordinates, centre, semi_axes, rng.uniform(0.0, math.pi))

    # Lobulation: the surface radius varies with the in-plane azimuth.
    azimuth = np.arctan2(coordinates[1] - centre[1], coordinates[0] - centre[0])
    lobes = int(rng.integers(2, 5))
    lobulation = 1.0 + rng.uniform(0.0, 0.15) * np.cos(lobes * azimuth + rng.uniform(0.0, 2.0 * math.pi))
    radius = radius / lobulation

    # Soft boundary: membership falls from 0.88 to 0.12 over about 4 * boundary_width_mm across the surface.
    boundary_width_mm = rng.uniform(0.3, 0.8)
    signed_depth = (1.0 - radius) * float(np.mean(semi_axes)) / boundary_width_mm
    inside_skin = head.radius <= 1.0
    membership = inside_skin / (1.0 + np.exp(-np.clip(signed_depth, -50.0, 50.0)))
    return _Tumour(
        label=(radius <= 1.0) & inside_skin,
        membership=membership,
        diameter_mm=diameter_mm,
        gland_centre=gland_centre,
        gland_semi_axes=gland_semi_axes,
    )


def _draw_distractors(
    rng: np.random.Generator,
    coordinates: list[np.ndarray],
    half_extent_mm: list[float],
    spacing: tuple[float, float, float],
    head: _Head,
    tumour: _Tumour,
    tissue_map: np.ndarray,
    seed: int,
) -> None:
    """Draw 1-3 muscle-like ellipsoids and 2-4 vessel-like tubes into ``tissue_map``, away from the tumour."""
    tumour_distance_mm = ndimage.distance_transform_edt(~tumour.label, sampling=spacing)
    inside_head = head.radius <= head.inner_radius
    inner_semi_axes = [head.semi_axes[axis] * head.inner_radius for axis in range(2)]

    def make_muscle(generator: np.random.Generator, scale: float) -> np.ndarray:
        semi_axes = [
            generator.uniform(4.0, 10.0) * scale,
            generator.uniform(3.0, 7.0) * scale,
            generator.uniform(15.0, 40.0),
        ]
        centre = [
            head.centre[0] + generator.uniform(-0.8, 0.8) * inner_semi_axes[0],
            head.centre[1] + generator.uniform(-0.8, 0.8) * inner_semi_axes[1],
            generator.uniform(-0.5, 0.5) * half_extent_mm[2],
        ]
        return _ellipsoid_radius(coordinates, centre, semi_axes, generator.uniform(0.0, math.pi)) <= 1.0

    def make_vessel(generator: np.random.Generator, scale: float) -> np.ndarray:
        radius_mm = generator.uniform(1.2, 3.0) * scale
        sway_mm = generator.uniform(0.0, 3.0, size=2)
        period_mm = generator.uniform(40.0, 120.0)
        phase = generator.uniform(0.0, 2.0 * math.pi, size=2)
        if generator.uniform() < 0.6:
            # Most vessels run through the gland, like the retromandibular vein.
            base = [
                tumour.gland_centre[axis] + generator.uniform(-0.8, 0.8) * tumour.gland_semi_axes[axis]
                for axis in range(2)
            ]
        else:
            base = [head.centre[axis] + generator.uniform(-0.85, 0.85) * inner_semi_axes[axis] for axis in range(2)]
        path_x = base[0] + sway_mm[0] * np.sin(2.0 * math.pi * coordinates[2] / period_mm + phase[0])
        path_y = base[1] + sway_mm[1] * np.sin(2.0 * math.pi * coordinates[2] / period_mm + phase[1])
        return ((coordinates[0] - path_x) ** 2 + (coordinates[1] - path_y) ** 2) <= radius_mm**2

    # A distractor needs at least the voxels of a 1 mm radius disc on two slices.
    min_voxels = 2 * int(math.ceil(math.pi / (spacing[0] * spacing[1])))
    for tissue, make_mask, count in (
        (Tissue.MUSCLE, make_muscle, int(rng.integers(1, 4))),
        (Tissue.VESSEL, make_vessel, int(rng.integers(2, 5))),
    ):
        for _ in range(count):
            mask = _place_distractor(make_mask, rng, inside_head, tumour_distance_mm, min_voxels)
            if mask is None:
                # NOTE: fields of view near the 25 mm minimum reach this (3 of 40 seeds at 64 x 64 voxels of 0.4 mm).
                logger.warning("seed %d: no room for a %s distractor away from the tumour", seed, tissue.name.lower())
                continue
            tissue_map[mask] = tissue


def _render_images(
    rng: np.random.Generator,
    modalities: Sequence[str],
    tissue_map: np.ndarray,
    tumour: _Tumour,
    spacing: tuple[float, float, float],
) -> dict[str, np.ndarray]:
    """Render each modality from the tissue signals, with a textured soft-edged tumour, blur, bias field and noise."""
    shape = tissue_map.shape
    contrasts = _sample_contrasts(rng, modalities)
    texture = _smooth_noise(rng, shape, sigma_voxels=(1.5 / spacing[0], 1.5 / spacing[1], 0.5))
    texture_strength = rng.uniform(0.03, 0.08)
    noise_fraction = rng.uniform(0.02, 0.04)

    # The tumour is blended over gland signal, so its soft edge fades into the gland.
    surrounding_map = np.where(tumour.label, Tissue.GLAND, tissue_map)
    in_plane_blur = (0.3 / spacing[0], 0.3 / spacing[1], 0.0)
    images: dict[str, np.ndarray] = {}
    for modality in modalities:
        signals = contrasts[modality]
        lookup = np.array([signals[Tissue(code)] for code in range(len(Tissue))])
        tumour_signal = signals[Tissue.TUMOUR] * (1.0 + texture_strength * texture)
        clean = lookup[surrounding_map] * (1.0 - tumour.membership) + tumour_signal * tumour.membership
        clean = ndimage.gaussian_filter(clean, sigma=in_plane_blur) * _bias_field(rng, shape)

        # Magnitude of a complex signal with Gaussian noise in both channels (Rician noise).
        sigma = noise_fraction * signals[Tissue.GLAND]
        real = clean + rng.normal(0.0, sigma, size=shape)
        imaginary = rng.normal(0.0, sigma, size=shape)
        images[modality] = np.sqrt(real * real + imaginary * imaginary).astype(np.float32)
    return images


def generate_phantom_case(
    seed: int,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    shape_xy: Sequence[int] = DEFAULT_SHAPE_XY,
    num_slices: int | None = None,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
) -> PhantomCase:
    """Generate one synthetic parotid case with a tumour and tumour-like distractors.

    Args:
        seed: seed of the case. The same seed and arguments give byte-identical arrays.
        modalities: modalities to simulate, any of ``SUPPORTED_MODALITIES``
            (t1, t2, stir, flair). The label and tissue map do not depend on this list.
        shape_xy: in-plane size (X, Y) in voxels, at least 32 each.
        num_slices: number of slices Z, or None for a random count in 12-24.
        spacing_mm: voxel size (X, Y, Z) in mm.

    Returns:
        A ``PhantomCase`` with images, label and tissue map of shape (X, Y, Z).

    Raises:
        ValueError: on an unknown modality, a grid smaller than the minimum or a
            field of view under 25 mm.
    """
    _validate_arguments(modalities, shape_xy, num_slices, spacing_mm)
    rng = np.random.default_rng(seed)
    spacing = (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2]))
    if num_slices is None:
        num_slices = int(rng.integers(SLICE_COUNT_RANGE[0], SLICE_COUNT_RANGE[1] + 1))
    shape = (int(shape_xy[0]), int(shape_xy[1]), int(num_slices))
    coordinates = _world_coordinates(shape, spacing)
    half_extent_mm = [size * s / 2.0 for size, s in zip(shape, spacing)]

    # Anatomy: later tissues overwrite earlier ones in the tissue map.
    tissue_map = np.zeros(shape, dtype=np.uint8)
    head = _draw_head(rng, coordinates, half_extent_mm, tissue_map)
    tumour = _draw_gland_and_tumour(rng, coordinates, half_extent_mm, spacing, head, tissue_map)
    _draw_distractors(rng, coordinates, half_extent_mm, spacing, head, tumour, tissue_map, seed)
    tissue_map[tumour.label] = Tissue.TUMOUR

    images = _render_images(rng, modalities, tissue_map, tumour, spacing)
    affine = np.diag([spacing[0], spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [-(size - 1) / 2.0 * s for size, s in zip(shape, spacing)]
    return PhantomCase(
        images=images,
        label=tumour.label.astype(np.uint8),
        tissue_map=tissue_map,
        affine=affine,
        spacing_mm=spacing,
        tumour_diameter_mm=tumour.diameter_mm,
    )


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI file through a temporary name in the same folder, then rename it."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    temporary = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        nib.save(image, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_phantom_case(case: PhantomCase, case_dir: str | os.PathLike) -> Path:
    """Write ``<case_dir>/<modality>.nii.gz`` (float32) and ``label.nii.gz`` (uint8) and return the folder."""
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    for modality, image in case.images.items():
        _save_nifti(image, case.affine, case_dir / f"{modality}.nii.gz")
    _save_nifti(case.label, case.affine, case_dir / "label.nii.gz")
    return case_dir


def case_seed(seed: int, index: int) -> int:
    """Derive the seed of case ``index`` from the dataset seed, independent of the number of cases."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def generate_phantom_dataset(
    output_dir: str | os.PathLike,
    num_cases: int = DEFAULT_NUM_CASES,
    seed: int = 0,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
    shape_xy: Sequence[int] = DEFAULT_SHAPE_XY,
    num_slices: int | None = None,
    spacing_mm: Sequence[float] = DEFAULT_SPACING_MM,
) -> list[Path]:
    """Write ``num_cases`` phantom cases as ``<output_dir>/phantom_<NNN>/`` and return their folders.

    Case ``i`` uses the seed ``case_seed(seed, i)``, so a dataset seed gives the
    same cases whatever ``num_cases`` is. Existing files of the same name are
    replaced. The default of 10 cases is the fewest that gives each of 5 folds
    2 validation cases, and keeps CPU epochs short. Writing them took 6 s and
    69 MB at the default grid (2-core AMD EPYC).

    Args:
        output_dir: folder to write into; created when absent.
        num_cases: number of cases, at least 1.
        seed: dataset seed.
        modalities, shape_xy, num_slices, spacing_mm: see ``generate_phantom_case``.
    """
    if int(num_cases) != num_cases or num_cases < 1:
        raise ValueError(f"num_cases must be a positive integer, got {num_cases!r}.")
    _validate_arguments(modalities, shape_xy, num_slices, spacing_mm)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    case_dirs = []
    for index in range(int(num_cases)):
        case = generate_phantom_case(
            case_seed(seed, index),
            modalities=modalities,
            shape_xy=shape_xy,
            num_slices=num_slices,
            spacing_mm=spacing_mm,
        )
        case_dir = write_phantom_case(case, output_dir / f"phantom_{index:03d}")
        logger.debug(
            "wrote %s: shape %s, tumour %.1f mm, %.2f cc",
            case_dir,
            case.label.shape,
            case.tumour_diameter_mm,
            case.tumour_volume_cc,
        )
        case_dirs.append(case_dir)
    return case_dirs


def ensure_phantom_dataset(dataset_dir: str | os.PathLike, **kwargs) -> Path:
    """Generate the phantom dataset in ``dataset_dir`` when that folder is absent or empty, and return the folder.

    A folder that contains anything is left unchanged. The cases are written to
    a temporary sibling folder that is then renamed, so two processes that call
    this at the same time end with one complete dataset.

    Args:
        dataset_dir: dataset folder.
        kwargs: passed to ``generate_phantom_dataset`` (num_cases, seed, modalities, ...).
    """
    dataset_dir = Path(dataset_dir).expanduser().absolute()
    if dataset_dir.is_dir() and any(dataset_dir.iterdir()):
        logger.info("dataset folder %s is not empty, no phantom generated", dataset_dir)
        return dataset_dir
    if dataset_dir.exists() and not dataset_dir.is_dir():
        raise ValueError(f"dataset_dir {dataset_dir} is a file, not a folder; remove it or choose another dataset_dir.")

    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary_dir = Path(tempfile.mkdtemp(prefix=f".{dataset_dir.name}.tmp-", dir=dataset_dir.parent))
    try:
        case_dirs = generate_phantom_dataset(temporary_dir, **kwargs)

        # rename(2) replaces an empty folder but fails on a non-empty one, which another process may have filled.
        try:
            os.replace(temporary_dir, dataset_dir)
        except OSError:
            if dataset_dir.is_dir() and any(dataset_dir.iterdir()):
                logger.info("another process generated the phantom dataset in %s first; keeping its cases", dataset_dir)
                return dataset_dir
            raise
    finally:
        if temporary_dir.exists():
            shutil.rmtree(temporary_dir, ignore_errors=True)

    logger.info("generated %d phantom cases in %s", len(case_dirs), dataset_dir)
    return dataset_dir


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command-line interface that writes a phantom dataset."""
    parser = argparse.ArgumentParser(description="Write a synthetic multi-modality parotid tumour MRI dataset.")
    parser.add_argument("--output_dir", required=True, help="folder that receives phantom_<NNN>/<modality>.nii.gz")
    parser.add_argument("--num_cases", type=int, default=DEFAULT_NUM_CASES, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; the same seed writes the same arrays")
    parser.add_argument(
        "--modalities", nargs="+", default=list(DEFAULT_MODALITIES), help=f"any of {list(SUPPORTED_MODALITIES)}"
    )
    parser.add_argument(
        "--shape_xy", type=int, nargs=2, default=list(DEFAULT_SHAPE_XY), help="in-plane size X Y in voxels"
    )
    parser.add_argument("--num_slices", type=int, default=None, help="slices per case (default: random in 12-24)")
    parser.add_argument(
        "--spacing_mm", type=float, nargs=3, default=list(DEFAULT_SPACING_MM), help="voxel size X Y Z in mm"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    case_dirs = generate_phantom_dataset(
        args.output_dir,
        num_cases=args.num_cases,
        seed=args.seed,
        modalities=args.modalities,
        shape_xy=args.shape_xy,
        num_slices=args.num_slices,
        spacing_mm=args.spacing_mm,
    )
    logger.info("wrote %d cases to %s", len(case_dirs), args.output_dir)


if __name__ == "__main__":
    main()
