"""Label import: each kind of mismatch is refused with its own message; good labels are stored as versions."""

from __future__ import annotations

import numpy as np
import pytest

from ASFDALib.data.labels import LabelError, match_labels, parse_mapping, validate_label
from ASFDALib.data.volumes import write_nifti
from ASFDALib.errors import VolumeError

CLASSES = ["background", "liver", "kidney", "gallbladder"]


@pytest.fixture
def image(tmp_path):
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    array = np.arange(10 * 12 * 8, dtype=np.int16).reshape(10, 12, 8)
    return write_nifti(tmp_path / "case.nii.gz", array, affine), affine


def _label(tmp_path, values, affine, name="case_seg.nii.gz"):
    return write_nifti(tmp_path / name, values, affine)


def test_a_matching_label_is_accepted(tmp_path, image):
    path, affine = image
    values = np.zeros((10, 12, 8), np.uint8)
    values[2:5, 2:5, 2:5] = 3
    label, out_affine = validate_label(_label(tmp_path, values, affine), path, CLASSES)
    np.testing.assert_array_equal(label, values)
    np.testing.assert_allclose(out_affine, affine)


def test_another_shape_is_refused_naming_the_axis(tmp_path, image):
    path, affine = image
    with pytest.raises(LabelError, match=r"label grid \(10, 12, 9\) differs .*axis 2: 9 vs 8"):
        validate_label(_label(tmp_path, np.zeros((10, 12, 9), np.uint8), affine), path, CLASSES)


def test_another_geometry_is_refused_with_the_size_of_the_difference(tmp_path, image):
    path, affine = image
    shifted = affine.copy()
    shifted[0, 3] += 1.5
    with pytest.raises(LabelError, match="origin by 1.5 mm"):
        validate_label(_label(tmp_path, np.zeros((10, 12, 8), np.uint8), shifted), path, CLASSES)


def test_unknown_values_are_refused_with_a_mapping_hint(tmp_path, image):
    path, affine = image
    values = np.zeros((10, 12, 8), np.uint8)
    values[0, 0, 0] = 7
    with pytest.raises(LabelError, match=r"values \[7\] are not classes .*--map 7=1"):
        validate_label(_label(tmp_path, values, affine), path, CLASSES)
    label, _ = validate_label(tmp_path / "case_seg.nii.gz", path, CLASSES, parse_mapping("7=2"))
    assert label[0, 0, 0] == 2


def test_nan_and_fractional_labels_are_refused(tmp_path, image):
    path, affine = image
    values = np.zeros((10, 12, 8), np.float32)
    values[1, 1, 1] = np.nan
    with pytest.raises(VolumeError, match="NaN/Inf"):
        validate_label(_label(tmp_path, values, affine, "a.nii"), path, CLASSES)
    values[1, 1, 1] = 0.5
    with pytest.raises(LabelError, match="fractional"):
        validate_label(_label(tmp_path, values, affine, "b.nii"), path, CLASSES)


def test_an_all_background_label_is_valid(tmp_path, image):
    path, affine = image
    label, _ = validate_label(_label(tmp_path, np.zeros((10, 12, 8), np.uint8), affine), path, CLASSES)
    assert not label.any()


def test_label_files_pair_with_images_by_case_name(tmp_path):
    files = [tmp_path / n for n in ("a.nii.gz", "b_seg.nrrd", "c-label.nii", "zzz.nii.gz")]
    pairs = match_labels(files, ["a.nii.gz", "b.nii.gz", "c.mha"])
    assert pairs == {"a.nii.gz": files[0], "b.nii.gz": files[1], "c.mha": files[2]}


def test_bad_mapping_text_is_explained():
    with pytest.raises(ValueError, match="7=1"):
        parse_mapping("seven")
