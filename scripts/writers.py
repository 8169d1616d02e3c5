"""Output naming and atomic NIfTI writing for inference."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from monai.data import NibabelWriter
from monai.utils import ImageMetaKey

from scripts.datalist import case_from_path

__all__ = ["AtomicNibabelWriter", "CaseNameFormatter"]


class CaseNameFormatter:
    """Name an output after its case, for ``SaveImaged(output_name_formatter=...)``.

    With ``separate_folder=True`` and ``output_postfix="seg"`` this gives
    ``<output_dir>/<case>/<case>_seg.nii.gz``. The case name is the folder name
    for ``<case>/<modality>.nii.gz`` inputs and the file stem otherwise.

    Args:
        modalities: modality file stems, which name the folder's files rather than the case.
    """

    def __init__(self, modalities: Sequence[str] = ()) -> None:
        self.modalities = tuple(modalities)

    def __call__(self, metadict: dict | None, saver: object) -> dict:
        source = (metadict or {}).get(ImageMetaKey.FILENAME_OR_OBJ)
        if not source:
            return {"subject": f"case_{getattr(saver, '_data_index', 0)}", "idx": None}
        return {"subject": case_from_path(source, self.modalities), "idx": None}


class AtomicNibabelWriter(NibabelWriter):
    """NibabelWriter that writes to a temporary file beside the target, then renames it.

    A reader never sees a half-written mask: either the previous file or the
    complete new one is in place, also when the process stops mid-write.
    """

    def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs) -> None:
        target = Path(filename)
        suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
        temporary = target.with_name(f".{target.name[: -len(suffix) or None]}.partial-{os.getpid()}{suffix}")
        try:
            super().write(temporary, verbose=verbose, **obj_kwargs)
            os.replace(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()
