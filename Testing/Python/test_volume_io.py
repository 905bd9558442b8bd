"""Reading volumes from real files: NIfTI, NRRD, MetaImage, DICOM series, and every kind of bad input."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import DATA, copy_dicom_series, save_part10, write_dicom_series

from ASFDALib.data.volumes import (
    content_hash,
    discover_volumes,
    passed_over,
    passed_over_summary,
    read_volume,
    write_nifti,
    write_volume,
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


@pytest.mark.parametrize("name", ["map.nrrd", "map.mha"])
def test_a_label_map_write_stopped_by_ctrl_c_leaves_no_scratch_file_and_the_earlier_map(tmp_path, monkeypatch, name):
    """Ctrl-C while SimpleITK writes an NRRD or MetaImage map (predict's outputs): the earlier map of that name is
    as it was, and neither atomic_write's scratch file nor SimpleITK's (named with the format's suffix) is left."""
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    write_volume(tmp_path / name, _array(), affine)
    before = content_hash(tmp_path / name)
    written = sitk.WriteImage

    def stopped(image, path, *args, **kwargs):
        written(image, path, *args, **kwargs)  # the file is on disk when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(sitk, "WriteImage", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_volume(tmp_path / name, _array() + 1, affine)
    assert [p.name for p in tmp_path.iterdir()] == [name] and content_hash(tmp_path / name) == before


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


def test_a_walk_keeps_out_an_asfda_session_kept_in_the_pool(tmp_path):
    """A session folder (it holds session.json) among the pool's sub-folders: its label versions are no scans, its
    records no files to convert, with or without --recursive; the session given as the folder itself is walked."""
    from ASFDALib.data.volumes import discover

    for name in ("a.nii.gz", "site1/b.nii.gz", "sess/labels/a.v1.nii.gz", "sess/ranking.csv"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sess" / "session.json").write_text("{}")
    assert discover(tmp_path, recursive=True) == ([tmp_path / "a.nii.gz", tmp_path / "site1" / "b.nii.gz"], [])
    assert discover(tmp_path) == ([tmp_path / "a.nii.gz"], [])
    assert discover_volumes(tmp_path / "sess", recursive=True) == [tmp_path / "sess" / "labels" / "a.v1.nii.gz"]


def test_the_no_volumes_refusal_names_the_first_sub_folders_with_volumes_without_walking_the_whole_tree(tmp_path):
    """Given a large tree (a home folder) without --recursive, the refusal stops at the first few sub-folders
    holding volumes and says "such as"; a small tree is walked whole and counted, as before."""
    from ASFDALib.data.volumes import no_volumes_message

    for site in ("site1", "site2", "site3", "site4", "site5"):
        (tmp_path / "big" / site).mkdir(parents=True)
        (tmp_path / "big" / site / "a.nii.gz").write_bytes(b"x")
    (tmp_path / "small" / "site1").mkdir(parents=True)
    (tmp_path / "small" / "site1" / "a.nii.gz").write_bytes(b"x")
    said = "no volumes found (looked for .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd and DICOM folders)"
    assert no_volumes_message(tmp_path / "big", [], False, "rank") == (
        f"{tmp_path / 'big'}: {said}; found volumes only in sub-folders such as site1, site2, site3: add "
        "--recursive to rank them"
    )
    assert no_volumes_message(tmp_path / "small", [], False, "rank") == (
        f"{tmp_path / 'small'}: {said}; found volumes only in 1 sub-folder (site1): add --recursive to rank them"
    )


def test_the_no_volumes_refusal_looks_only_a_few_levels_down_and_then_points_at_recursive(tmp_path):
    """A volume deeper than the refusal's short look: it says it saw none near the top, and that --recursive
    searches them all (which finds it)."""
    from ASFDALib.data.volumes import no_volumes_message

    deep = tmp_path / "top" / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    (deep / "scan.nii.gz").write_bytes(b"x")
    assert no_volumes_message(tmp_path / "top", [], False, "segment").endswith(
        "; its sub-folders hold none near the top either (add --recursive to search them all), or give --images "
        "the folder that holds the scans to segment"
    )
    assert discover_volumes(tmp_path / "top", recursive=True) == [deep / "scan.nii.gz"]


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


# --- DICOM as a PACS or CD export hands it over ------------------------------------------------------------
def _slices(paths) -> list:
    """pydicom's own reading of a series: its datasets ordered along z (the truth the tests compare with)."""
    import pydicom

    return sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))


def _hounsfield(paths) -> np.ndarray:
    """pydicom's pixel_array * slope + intercept of each slice, as an (i, j, k) array."""
    return np.stack(
        [
            ds.pixel_array.T * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            for ds in _slices(paths)
        ],
        axis=2,
    )


def test_a_cd_export_is_found_below_its_dicomdir_and_the_dicomdir_is_no_series(tmp_path):
    """A CD or PACS export: DICOMDIR at the top, DICOM/ST000000/SE000000/IM000000..., no file extensions. The
    DICOMDIR (a DICOM file itself) made the top folder a series that read as nothing; now the series are
    found below it with --recursive, and without it nothing is found and nothing passed over."""
    import pydicom
    from pydicom.fileset import FileSet

    from ASFDALib.data.volumes import discover

    fileset = FileSet()
    for series in ("a", "b"):
        for path in copy_dicom_series(tmp_path / "src" / series, count=4):
            fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    assert discover(tmp_path / "cd") == ([], [])
    found, passed = discover(tmp_path / "cd", recursive=True)
    assert len(found) == 2 and passed == []
    assert all(not p.name.lower().endswith(".dcm") for series in found for p in series.iterdir())
    volume = read_volume(found[0])
    np.testing.assert_array_equal(volume.array, _hounsfield(list(found[0].iterdir())))


def _jpeg_lossless_source(folder) -> str:
    """MR_small.dcm's pixels and header in JPEG Lossless (process 14, 1.2.840.10008.1.2.4.70), which pydicom
    ships no file of: SimpleITK writes the pixels so, pydicom puts the header's tags back."""
    import pydicom
    from pydicom.data import get_testdata_file

    original = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    writer = sitk.ImageFileWriter()
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.SetFileName(str(folder / "jpeg_lossless.dcm"))
    writer.Execute(sitk.GetImageFromArray(original.pixel_array[None]))
    encoded = pydicom.dcmread(folder / "jpeg_lossless.dcm")
    assert encoded.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    original.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
    original.PixelData = encoded.PixelData
    original["PixelData"].VR = "OB"
    original["PixelData"].is_undefined_length = True
    original.save_as(folder / "jpeg_lossless.dcm")
    return str(folder / "jpeg_lossless.dcm")


@pytest.mark.parametrize(
    "source",
    [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "jpeg-lossless",
    ],
)
def test_a_compressed_or_big_endian_series_reads_the_values_of_the_uncompressed_one(tmp_path, source):
    """The transfer syntaxes a PACS exports in: SimpleITK's GDCM decodes each, JPEG-LS too, which pydicom
    cannot without plugins; the values are MR_small.dcm's, slice for slice."""
    import pydicom
    from pydicom.data import get_testdata_file

    if source == "jpeg-lossless":
        source = _jpeg_lossless_source(tmp_path)
    copy_dicom_series(tmp_path / "series", source, count=4)
    volume = read_volume(tmp_path / "series")
    expected = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.T
    assert volume.array.shape == (64, 64, 4)
    for k in range(4):
        np.testing.assert_array_equal(volume.array[:, :, k], expected)


def test_a_localizer_in_the_axial_series_folder_is_refused_naming_both_series_and_their_files(tmp_path):
    """Two series in one folder are refused, each named by number, description and files, so the user knows
    which files to move (GDCM's own refusal named neither)."""
    folder = tmp_path / "study"
    copy_dicom_series(folder, count=5, SeriesDescription="AX T2", SeriesNumber=2)
    copy_dicom_series(folder, count=3, step=20, name="SC{:04d}", SeriesDescription="LOCALIZER", SeriesNumber=1)
    with pytest.raises(VolumeError) as error:
        read_volume(folder)
    assert error.value.reason.startswith("2 image series in one folder: ")
    assert "series 2 'AX T2' (5 files: IM000000 ... IM000004)" in error.value.reason
    assert "series 1 'LOCALIZER' (3 files: SC0000 ... SC0002)" in error.value.reason
    assert "a folder of its own" in error.value.fix


def _non_image(path, modality: str, sop_class: str) -> None:
    """A minimal DICOM object with no pixels (a presentation state, say), as a viewer saves one into a study."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality, ds.SeriesInstanceUID = modality, generate_uid()
    ds.preamble = b"\0" * 128
    save_part10(ds, path)


def test_structures_segmentations_reports_and_dose_beside_a_series_are_left_out_of_it(tmp_path):
    """RTSTRUCT, SEG, SR, a presentation state, RT plan and dose in the series' folder (pydicom's own files; the
    SEG and the dose have pixels): the scan is read without them. A folder holding only such objects is
    refused, saying what it holds."""
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    paths = copy_dicom_series(tmp_path / "series", count=5)
    others = tmp_path / "others"
    others.mkdir()
    for name in ("rtstruct.dcm", "liver_1frame.dcm", "test-SR.dcm", "rtplan.dcm", "rtdose.dcm"):
        # as an export writes them: Part 10 files (pydicom's rtstruct.dcm has no preamble), no extension
        save_part10(pydicom.dcmread(get_testdata_file(name), force=True), others / name.replace(".dcm", ""))
    _non_image(others / "PR000001", "PR", "1.2.840.10008.5.1.4.1.1.11.1")
    for path in others.iterdir():
        shutil.copy(path, tmp_path / "series" / path.name)
    np.testing.assert_array_equal(read_volume(tmp_path / "series").array, _hounsfield(paths))
    with pytest.raises(VolumeError) as error:
        read_volume(others)
    assert error.value.reason == (
        "no DICOM image series in this folder: only PR (1), RTDOSE (1), RTPLAN (1), RTSTRUCT (1), SEG (1), SR (1)"
    )


def test_slices_in_random_file_order_are_stacked_by_their_position(tmp_path):
    import pydicom

    order = [4, 0, 5, 2, 1, 3]  # the k-th file written lies at position order[k]: names say nothing
    paths = copy_dicom_series(
        tmp_path / "series", count=6, step=0, ImagePositionPatient=lambda k: [0.0, 0.0, 3.0 * order[k]]
    )
    for path, k in zip(paths, order):
        ds = pydicom.dcmread(path)
        ds.PixelData = (ds.pixel_array + 100 * k).astype(np.int16).tobytes()
        ds.save_as(path)
    volume = read_volume(tmp_path / "series")
    np.testing.assert_array_equal(volume.array, _hounsfield(paths))
    assert [int(volume.array[0, 0, k] - volume.array[0, 0, 0]) for k in range(6)] == [0, 100, 200, 300, 400, 500]
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 3.0])


def test_a_slope_and_intercept_that_change_from_slice_to_slice_give_each_slice_its_own_hounsfield_units(tmp_path):
    """SimpleITK casts every slice to the first one's pixel type: with slope 1 there, a later slice's slope 0.25
    lost its fractions (up to 0.75 HU off). Every value is pydicom's pixel_array * slope + intercept."""
    paths = copy_dicom_series(
        tmp_path / "series",
        "CT_small.dcm",
        count=4,
        RescaleSlope=lambda k: 1.0 if k == 0 else 0.25,
        RescaleIntercept=lambda k: -1024.0 if k == 0 else -1000.5,
    )
    volume = read_volume(tmp_path / "series")
    expected = _hounsfield(paths)
    assert expected[:, :, 1:].ravel().tolist() != np.round(expected[:, :, 1:]).ravel().tolist()  # fractions to lose
    np.testing.assert_array_equal(volume.array, expected)


def test_a_gantry_tilted_series_is_refused_naming_the_tilt(tmp_path):
    """Slices whose positions drift across their plane were stacked square to it (the anatomy shifted by the
    drift, the spacing the oblique distance): now refused, with the angle and the way to resample."""
    tilt = np.tan(np.radians(20.0))
    copy_dicom_series(
        tmp_path / "series", count=6, step=0, ImagePositionPatient=lambda k: [0.0, 2.0 * k * tilt, 2.0 * k]
    )
    with pytest.raises(VolumeError, match=r"slices tilted by 20.0 degrees \(gantry tilt: IM000005 lies 3.6 mm"):
        read_volume(tmp_path / "series")


def test_a_sagittal_series_of_oblong_pixels_lands_where_its_headers_say(tmp_path):
    """Columns along the row direction at the second PixelSpacing value, rows along the column direction at the
    first, slices along the normal: the RAS affine computed by hand from the tags."""
    paths = copy_dicom_series(
        tmp_path / "series",
        count=4,
        step=0,
        ImageOrientationPatient=[0, 1, 0, 0, 0, -1],
        PixelSpacing=[0.5, 0.8],
        ImagePositionPatient=lambda k: [10.0 + 3.0 * k, -20.0, 30.0],
    )
    volume = read_volume(tmp_path / "series")
    # the normal, row x column, is -x (LPS): the volume runs from the last file to the first, 3 mm apart
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = [0, 0.8, 0], [0, 0, -0.5], [-3.0, 0, 0], [19.0, -20.0, 30.0]
    np.testing.assert_allclose(volume.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-6)
    for path, ds in zip(paths, _slices(paths)):  # each file's first pixel lies at its ImagePositionPatient
        ras = np.diag([-1, -1, 1]) @ np.asarray(ds.ImagePositionPatient, dtype=float)
        i, j, k = np.round(np.linalg.solve(volume.affine[:3, :3], ras - volume.affine[:3, 3])).astype(int)
        assert (i, j) == (0, 0), path
        np.testing.assert_array_equal(volume.array[:, :, k], ds.pixel_array.T)


def _enhanced_mr(path, positions, rescales) -> np.ndarray:
    """An Enhanced MR file (one file, one frame per position, stored in the given order) made of MR_small.dcm's
    pixels, each frame's own position and slope/intercept in its functional groups; returns the frames' stored
    values in file order."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frames = np.stack([ds.pixel_array + 10 * k for k in range(len(positions))]).astype(np.int16)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    ds.NumberOfFrames = len(positions)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.3125, 0.3125]
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence()
    for position, (slope, intercept) in zip(positions, rescales):
        item = Dataset()
        item.PlanePositionSequence = Sequence([Dataset()])
        item.PlanePositionSequence[0].ImagePositionPatient = position
        item.PixelValueTransformationSequence = Sequence([Dataset()])
        item.PixelValueTransformationSequence[0].RescaleSlope = slope
        item.PixelValueTransformationSequence[0].RescaleIntercept = intercept
        item.PixelValueTransformationSequence[0].RescaleType = "US"
        ds.PerFrameFunctionalGroupsSequence.append(item)
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    return frames


def test_an_enhanced_multiframe_file_is_one_volume_its_frames_placed_and_scaled_by_their_own_groups(tmp_path):
    """One file, four frames stored top to bottom, each with its own slope: it was refused as 'a single slice';
    GDCM alone applies the first frame's slope to all. The volume runs bottom to top, each frame in its units."""
    (tmp_path / "enhanced").mkdir()
    positions = [[-83.9, -91.2, 10.0 - 2.5 * k] for k in range(4)]
    rescales = [(1.0 + k, -5.0 * k) for k in range(4)]
    frames = _enhanced_mr(tmp_path / "enhanced" / "IM000000", positions, rescales)
    volume = read_volume(tmp_path / "enhanced")
    for k in range(4):  # the volume's slice k is the file's frame 3 - k
        slope, intercept = rescales[3 - k]
        np.testing.assert_allclose(volume.array[:, :, k], frames[3 - k].T * slope + intercept)
    np.testing.assert_allclose(volume.affine[:3, 2:], [[0, 83.9], [0, 91.2], [2.5, 2.5]], atol=1e-6)


def test_a_slice_that_cannot_be_decoded_is_named(tmp_path):
    paths = copy_dicom_series(tmp_path / "series", count=5)
    paths[2].write_bytes(paths[2].read_bytes()[:5000])  # a copy cut short: header whole, pixels not
    with pytest.raises(VolumeError, match="IM000002 could not be decoded: damaged or cut short"):
        read_volume(tmp_path / "series")


def test_a_missing_slice_is_named_by_the_slices_around_it_even_in_a_three_slice_series(tmp_path):
    copy_dicom_series(tmp_path / "series", count=4)[1].unlink()
    with pytest.raises(VolumeError, match=r"uneven slice spacing \(2.00 to 4.00 mm; between IM000000 and IM000002\)"):
        read_volume(tmp_path / "series")


def test_a_colour_capture_beside_a_series_is_left_out_and_alone_is_named_as_no_scan(tmp_path):
    """A CT dose report is a screenshot (RGB) saved into the study: beside the slices it is no second series;
    alone it is refused as what it is (it read as a '4D image' to split into 3D volumes)."""
    paths = copy_dicom_series(tmp_path / "series", count=3)
    copy_dicom_series(tmp_path / "series", "SC_rgb_rle_16bit.dcm", count=1, name="DOSE{:02d}")
    np.testing.assert_array_equal(read_volume(tmp_path / "series").array, _hounsfield(paths))
    copy_dicom_series(tmp_path / "captures", "SC_rgb_rle_16bit.dcm", count=3)
    with pytest.raises(VolumeError) as error:
        read_volume(tmp_path / "captures")
    assert error.value.reason == "no DICOM image series in this folder: only colour screen capture or photo (3)"


def test_a_series_in_folders_and_files_named_with_spaces_and_umlauts_is_read(tmp_path):
    paths = copy_dicom_series(tmp_path / "Patient Müller" / "CT Thorax ä", count=4, name="Bild {:03d} ß.dcm")
    assert discover_volumes(tmp_path, recursive=True) == [tmp_path / "Patient Müller" / "CT Thorax ä"]
    np.testing.assert_array_equal(read_volume(paths[0].parent).array, _hounsfield(paths))


@pytest.mark.parametrize("recursive", [False, True])
def test_a_dicom_series_given_as_the_images_folder_itself_is_planned_as_one_map_named_by_it(tmp_path, recursive):
    """predict --images SERIES (--recursive or not): the series is the images folder itself, at the top of it, so
    its map is SERIES.nii.gz under --out and its name is the series folder's, not a ValueError's traceback."""
    from ASFDALib.adaptation.pipeline import plan_predictions

    copy_dicom_series(tmp_path / "series", count=4)
    plan = plan_predictions(tmp_path / "series", tmp_path / "out", claim=False, recursive=recursive)
    assert plan.targets == [tmp_path / "out" / "series.nii.gz"]
    assert plan.names == ["series"]
