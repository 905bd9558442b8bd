"""Shared fixtures: the shipped default model, small phantom pools, and writers for real file formats."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "Testing" / "Data"


@pytest.fixture(scope="session")
def default_model():
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.loading import load_model

    return load_model(default_model_path())


@pytest.fixture(scope="session")
def mri_pool(tmp_path_factory) -> Path:
    """Six MRI-like target phantoms with labels (images/ and labels/)."""
    from ASFDALib.bench.phantoms import write_phantoms

    folder = tmp_path_factory.mktemp("mri_pool")
    write_phantoms(folder, 6, "mri", seed=3)
    return folder


def write_dicom_series(folder: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write an (i, j, k) array as one DICOM file per k-slice, with real geometry tags."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    for k in range(array.shape[2]):
        slice_image = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, k].T.astype(np.int16))[None])
        slice_image = slice_image[:, :, 0]
        position = (origin[0], origin[1], origin[2] + k * spacing[2])
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1.4241",
            "0020|000e": series_uid,
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0013": str(k + 1),
            "0008|0018": f"{series_uid}.{k + 1}",
            "0028|0030": f"{spacing[1]:.4f}\\{spacing[0]:.4f}",
            "0018|0050": f"{spacing[2]:.4f}",
        }
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        slice_image.SetSpacing(spacing[:2])
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(slice_image)
    return folder


def save_part10(ds, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (128-byte preamble, DICM, file meta), as an export writes it, under
    pydicom 2.x and 3.x alike: 3.0 renamed 2.x's ``write_like_original=False`` to ``enforce_file_format=True``
    (and 4.0 drops the old name), and 3D Slicer brings either, so the fixtures run under the floor pyproject
    states."""
    import pydicom

    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)
    return path


def edit_dicom_slice(folder: Path, index: int, **tags) -> Path:
    """Overwrite DICOM attributes (pydicom keywords) of the ``index``-th slice file of a series folder."""
    import pydicom

    path = sorted(folder.iterdir())[index]
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def copy_dicom_series(
    folder: Path, source: str = "MR_small.dcm", count: int = 6, step: float = 2.0, name: str = "IM{:06d}", **tags
) -> list[Path]:
    """``count`` slices copied from one of pydicom's shipped files (or a file's absolute path), its transfer syntax
    and pixel encoding kept:
    one series UID, positions ``step`` mm apart along the slices' normal, one file per slice named as a PACS
    export names them (no extension). ``tags`` (pydicom keywords) are set on every slice; a callable is called
    with the slice's index for its value."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for k in range(count):
        ds = pydicom.dcmread(source if Path(source).is_absolute() else get_testdata_file(source))
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        x, y, z = (float(v) for v in ds.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
        ds.ImagePositionPatient = [x, y, z + k * step]
        for keyword, value in tags.items():
            setattr(ds, keyword, value(k) if callable(value) else value)
        paths.append(folder / name.format(k))
        ds.save_as(paths[-1])
    return paths
