"""Reading volumes from real files: NIfTI, NRRD, MetaImage, DICOM series, and every kind of bad input."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA, write_dicom_series

from ASFDALib.data.volumes import (
    content_hash,
    discover_volumes,
    passed_over,
    passed_over_summary,
    read_volume,
    write_nifti,
)
from ASFDALib.errors import ASFDAError, VolumeError


def _array(shape=(10, 12, 8)):
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


def test_nifti_reads_array_and_ras_affine(tmp_path):
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 7]
    path = write_nifti(tmp_path / "a.nii.gz", _array(), affine)
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, _array())
    np.testing.assert_allclose(volume.affine, affine)
    np.testing.assert_allclose(volume.spacing, [1.5, 2.0, 3.0])


def test_nrrd_and_mha_are_converted_from_lps_to_ras(tmp_path):
    array = _array()
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))  # sitk wants (k, j, i)
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    for name in ("a.nrrd", "b.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        volume = read_volume(tmp_path / name)
        np.testing.assert_array_equal(volume.array, array)
        np.testing.assert_allclose(volume.affine[:3, 3], [-10.0, -20.0, 30.0])  # LPS origin -> RAS
        np.testing.assert_allclose(np.diag(volume.affine)[:3], [-1.5, -2.0, 3.0])


def test_nifti_and_nrrd_of_one_image_agree_in_world_space(tmp_path):
    """The same voxel lands on the same RAS point whichever format carried it."""
    array = _array()
    ras = np.diag([-1.5, -2.0, 3.0, 1.0])
    ras[:3, 3] = [-10.0, -20.0, 30.0]
    nifti = read_volume(write_nifti(tmp_path / "x.nii", array, ras))
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))
    image.SetSpacing((1.5, 2.0, 3.0))
    image.SetOrigin((10.0, 20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "x.nrrd"))
    nrrd = read_volume(tmp_path / "x.nrrd")
    np.testing.assert_allclose(nifti.affine, nrrd.affine, atol=1e-6)


def test_dicom_series_folder_is_one_volume(tmp_path):
    array = _array((16, 14, 6))
    folder = write_dicom_series(tmp_path / "pool" / "series1", array, spacing=(0.8, 0.8, 2.5))
    assert discover_volumes(tmp_path / "pool") == [folder]
    volume = read_volume(folder)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, [0.8, 0.8, 2.5], rtol=1e-4)


def test_vendored_tptbox_files_read_with_their_geometry():
    ct = read_volume(DATA / "tptbox" / "sub-ct_label-22_ct.nii.gz")
    mri = read_volume(DATA / "tptbox" / "sub-mri_label-6_T2w.nii.gz")
    assert ct.array.shape == (73, 47, 73)
    assert mri.array.shape == (68, 52, 67)
    np.testing.assert_allclose(ct.spacing, 1.5, rtol=1e-3)
    assert ct.array.min() < -900 and ct.array.max() > 1500


def test_discovery_finds_each_format_sorted_and_skips_hidden(tmp_path):
    for name in ("b.nii.gz", "a.nrrd", "c.mha", ".hidden.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.nii").write_bytes(b"x")
    assert [p.name for p in discover_volumes(tmp_path)] == ["a.nrrd", "b.nii.gz", "c.mha"]
    assert [p.name for p in discover_volumes(tmp_path, recursive=True)] == ["a.nrrd", "b.nii.gz", "c.mha", "d.nii"]


def test_discovery_names_the_files_it_passes_over_but_not_sidecars_header_data_or_browser_files(tmp_path):
    for name in (
        "a.nii.gz",
        "a.json",
        "b.mhd",
        "b.raw",
        "c.bval",
        "brain.mgz",
        "x.png",
        "y.png",
        "Thumbs.db",
        ".DS_Store",
    ):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "b.mhd").write_text("ObjectType = Image\nElementDataFile = b.raw\n")
    others = passed_over(tmp_path)
    # a.json is a.nii.gz's sidecar, b.raw b.mhd's data; c.bval is the sidecar of no volume here
    assert [p.name for p in others] == ["brain.mgz", "c.bval", "x.png", "y.png"]
    assert passed_over_summary(others) == ".png 2, .bval 1, .mgz 1: e.g. x.png"


def test_discovery_survives_a_symlink_loop(tmp_path):
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path, tmp_path / "sub" / "loop")
    (tmp_path / "sub" / "a.nii").write_bytes(b"x")
    assert [p.name for p in discover_volumes(tmp_path, recursive=True)] == ["a.nii"]


def test_discovery_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(ASFDAError, match="not a folder"):
        discover_volumes(tmp_path / "nope")


def test_content_hash_follows_content_not_name(tmp_path):
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    (tmp_path / "c").write_bytes(b"other")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "b") != content_hash(tmp_path / "c")


def _good_nifti_bytes():
    return gzip.compress(nib.Nifti1Image(_array(), np.eye(4)).to_bytes())


BAD_INPUTS = {
    "truncated.nii.gz": (lambda: _good_nifti_bytes()[:300], "unreadable or corrupt"),
    "magic.nii": (lambda: b"\x00" * 400, "unreadable or corrupt"),
    "empty.nii.gz": (lambda: b"", "empty file"),
    "text.nii.gz": (lambda: b"this is not an image\n" * 10, "unreadable or corrupt"),
    "flat.nii": (
        lambda: nib.Nifti1Image(
            (np.ones((8, 8, 1)) * np.arange(8)[:, None, None]).astype(np.int16), np.eye(4)
        ).to_bytes(),
        "2D image",
    ),
    "movie.nii": (
        lambda: nib.Nifti1Image(np.random.rand(6, 6, 6, 3).astype(np.float32), np.eye(4)).to_bytes(),
        "4D image",
    ),
    "nan.nii": (
        lambda: nib.Nifti1Image(
            np.where(np.eye(6)[..., None] > 0, np.nan, 1.0) * np.ones((6, 6, 4)), np.eye(4)
        ).to_bytes(),
        "NaN/Inf voxels",
    ),
    "inf.nii": (
        lambda: nib.Nifti1Image(np.full((5, 5, 5), np.inf, np.float32), np.eye(4)).to_bytes(),
        "NaN/Inf voxels",
    ),
    "constant.nii": (lambda: nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4)).to_bytes(), "constant image"),
    "bad.nrrd": (
        lambda: b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n" + b"\0" * 10,
        "unreadable or corrupt",
    ),
    "sizes.nrrd": (  # ITK's cause, its last line, not the first (its source file and line)
        lambda: b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4\nencoding: raw\n\n",
        "unreadable or corrupt .*_nrrdReadNrrdParse_sizes: parsed 2 values, but dimension is 3",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_a_reason_naming_the_file(tmp_path, name):
    make, reason = BAD_INPUTS[name]
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(VolumeError, match=reason) as info:
        read_volume(path)
    assert name in str(info.value)
    assert info.value.path == path


def test_singleton_fourth_axis_is_accepted(tmp_path):
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti1Image(_array()[..., None], np.eye(4)), str(path))
    assert read_volume(path).array.shape == (10, 12, 8)


def test_unreadable_permissions_are_reported(tmp_path):
    """Run the read as an unprivileged user (root reads everything), so the real OS refusal is tested."""
    import subprocess
    import sys

    path = write_nifti(tmp_path / "locked.nii.gz", _array(), np.eye(4))
    path.chmod(0)
    code = (
        "import sys; from ASFDALib.data.volumes import read_volume; from ASFDALib.errors import VolumeError\n"
        "try:\n    read_volume(sys.argv[1])\nexcept VolumeError as e:\n    print(e.reason)"
    )
    as_nobody = (lambda: os.setuid(65534)) if os.geteuid() == 0 else None
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            preexec_fn=as_nobody,
            cwd="/",
            timeout=120,
        )
    except PermissionError:
        pytest.skip("the unprivileged user cannot run this environment's Python")
    finally:
        path.chmod(0o644)
    if "No module named" in out.stderr:
        pytest.skip("the unprivileged user cannot import the package from this environment")
    assert "permission denied" in out.stdout, out.stderr


def test_unicode_and_spaces_in_names(tmp_path):
    path = write_nifti(tmp_path / "Patient Ä 01 – scan.nii.gz", _array(), np.eye(4))
    assert discover_volumes(tmp_path) == [path]
    assert read_volume(path).array.shape == (10, 12, 8)


@pytest.mark.parametrize("header", ["scan.mhd", "scan.nhdr"])
def test_a_detached_headers_hash_holds_its_data_file_so_a_replaced_scan_shows(tmp_path, header):
    """The voxels of a .mhd or .nhdr are in the file its header names: replacing them changes the scan's hash,
    by which a session knows the image a label was drawn on."""
    from ASFDALib.data.volumes import content_hash

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(64, dtype=np.int16).reshape(4, 4, 4)), str(tmp_path / header))
    before = content_hash(tmp_path / header)
    data = tmp_path / "scan.raw"
    data.write_bytes(bytes(reversed(data.read_bytes())))
    assert content_hash(tmp_path / header) != before
