"""Shared pytest fixtures: the location of the real MRI sets used by some tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]

# The real MRI sets live beside the repository (``../shared/data``); set
# PAROTID_SHARED_DATA to use another copy.
SHARED_DATA_DIR = Path(os.environ.get("PAROTID_SHARED_DATA", BUNDLE_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Return the folder of real MRI sets, or skip the test when it is absent."""
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real MRI folder not found at {SHARED_DATA_DIR}; set PAROTID_SHARED_DATA to run this test")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def brats_dir(shared_data_dir: Path) -> Path:
    """Return the three-modality MSD BraTS crops (t1, t2, flair, label)."""
    path = shared_data_dir / "msd_brats_patches"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def sts_dir(shared_data_dir: Path) -> Path:
    """Return the single-modality soft-tissue sarcoma T1 set (t1, label)."""
    path = shared_data_dir / "ibsi_sts_t1"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path
