"""Label import: each kind of mismatch is refused with its own message; good labels are stored as versions.

The pure parts are pinned here (name pairing, --map parsing, grid comparison in world space); the user's path
on the real tptbox files is in test_labels_tptbox.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from ASFDALib.data.labels import (
    LabelError,
    LabelMapError,
    align_to_image,
    check_grid,
    match_labels,
    name_key,
    pair_mirrored,
    pair_names,
    parse_mapping,
    validate_label,
    value_ranges,
)
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
    with pytest.raises(LabelMapError, match=r"--map term 'seven': 'seven' is not a label value \(7\)"):
        parse_mapping("seven")
    with pytest.raises(ValueError):  # callers that caught ValueError still do
        parse_mapping("seven")


# --- name pairing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("case7.nii.gz", "case7"),
        ("case7_0000.nii.gz", "case7"),  # nnU-Net channel
        ("case7_seg.nii.gz", "case7"),
        ("Case7_Mask.nrrd", "case7"),
        ("case7_msk.nii", "case7"),
        ("case7_labels.nii.gz", "case7"),
        ("case7.seg.nrrd", "case7"),
        ("patient_001_label.mha", "patient_001"),
        ("sub-mri_label-6_T2w.nii.gz", "sub-mri_label-6"),
        ("sub-mri_seg-subreg_label-6_msk.nii.gz", "sub-mri_label-6"),
        ("sub-01_ses-2_desc-tumor_dseg.nii.gz", "sub-01_ses-2"),
        ("sub-01_ses-2_run-1_T1w.nii.gz", "sub-01_ses-2_run-1"),
        ("sub-mri_label-6_T2w_seg.nii.gz", "sub-mri_label-6"),  # an asfda prediction of a BIDS scan
        # BIDS-like but not BIDS (free words after the entities): the segmentation suffix still goes
        ("sub-0001_ses-01_T1w_fat_suppressed_dseg.nii.gz", "sub-0001_ses-01_t1w_fat_suppressed"),
        # a BIDS derivative named after its source file: the entities after the source's suffix are its own
        ("sub-01_ses-1_T1w_desc-brain_dseg.nii.gz", "sub-01_ses-1"),
        ("sub-01_T1w_label-GM_mask.nii.gz", "sub-01"),
        # as the specification names a mask: label- kept (a TPTBox scan's own), dropped only where nothing fits
        ("sub-01_ses-1_label-GM_mask.nii.gz", "sub-01_ses-1_label-gm"),
    ],
)
def test_a_file_name_reduces_to_its_case(name, key):
    assert name_key(name)[0] == key


def test_labels_pair_with_scans_across_naming_schemes():
    images = ["a_0000.nii.gz", "sub-01_ses-1_T1w.nii.gz", "sub-01_ses-2_T1w.nii.gz", "p1.nrrd"]
    labels = ["a.nii.gz", "sub-01_ses-2_desc-lesion_mask.nii.gz", "p1.seg.nrrd"]
    pairing = pair_names(labels, images)
    assert pairing.pairs == {
        "a_0000.nii.gz": "a.nii.gz",
        "sub-01_ses-2_T1w.nii.gz": "sub-01_ses-2_desc-lesion_mask.nii.gz",
        "p1.nrrd": "p1.seg.nrrd",
    }
    assert pairing.problems == {}


def test_an_exact_case_name_wins_over_a_looser_match():
    pairing = pair_names(["x_seg.nii.gz"], ["x_seg.nii.gz", "x.nii.gz"])
    assert pairing.pairs == {"x_seg.nii.gz": "x_seg.nii.gz"}


def test_a_label_that_fits_two_scans_is_refused_not_guessed():
    pairing = pair_names(["sub-01_mask.nii.gz"], ["sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz"])
    assert pairing.pairs == {}
    assert pairing.problems["sub-01_mask.nii.gz"] == (
        "fits several images (sub-01_T1w.nii.gz, sub-01_T2w.nii.gz); import it alone with --from FILE --cases IMAGE"
    )


def test_two_labels_for_one_scan_are_both_refused_naming_each_other():
    pairing = pair_names(["c_seg.nii.gz", "c_mask.nii.gz"], ["c.nii.gz"])
    assert pairing.pairs == {}
    assert "several label files fit image c.nii.gz (also c_mask.nii.gz)" in pairing.problems["c_seg.nii.gz"]
    assert "(also c_seg.nii.gz)" in pairing.problems["c_mask.nii.gz"]


def test_an_unpaired_label_names_the_expected_scan_and_the_closest_ones():
    pairing = pair_names(["liver_12_seg.nii.gz", "zzz.nrrd"], ["liver_13.nii.gz", "liver_21.nii.gz", "brain.nii.gz"])
    assert pairing.problems["liver_12_seg.nii.gz"] == (
        "no image has this case name (expected 'liver_12.nii.gz' (or 'liver_12_0000.nii.gz'); "
        "closest: liver_21.nii.gz, liver_13.nii.gz)"  # difflib's order, best first
    )
    assert pairing.problems["zzz.nrrd"].endswith("no similar name among 3 images)")


def test_an_unpaired_label_shows_the_name_it_expected_in_its_own_case_and_a_scan_its_name_is_part_of():
    images = ["sub-0001_ses-01_T1w_fat_suppressed.nii.gz", "sub-0002_ses-01_T1w.nii.gz", "Liver_13.nii.gz"]
    pairing = pair_names(["sub-0001_ses-01_dseg.nii.gz", "Liver_12_SEG.nii.gz"], images)
    assert pairing.problems["sub-0001_ses-01_dseg.nii.gz"] == (
        "no image has this case name (expected 'sub-0001_ses-01_<modality>.nii.gz'; "
        "closest: sub-0001_ses-01_T1w_fat_suppressed.nii.gz)"  # not sub-0002's, which is one letter off
    )
    assert "expected 'Liver_12.nii.gz' (or 'Liver_12_0000.nii.gz')" in pairing.problems["Liver_12_SEG.nii.gz"]


# --- --map ----------------------------------------------------------------------------------------------------


def test_a_map_takes_ranges_shared_classes_names_and_a_default():
    mapping = parse_mapping("41-43=2; 49,50=Vertebral_Body, 7=1 ,*=0", ["background", "vertebral body", "arch"])
    assert mapping.values == {41: 2, 42: 2, 43: 2, 49: 1, 50: 1, 7: 1}
    assert mapping.default == 0
    assert [mapping.target(v) for v in (0, 7, 42, 50, 60)] == [0, 1, 2, 1, 0]


def test_without_a_default_unlisted_values_keep_their_number():
    mapping = parse_mapping("7=1,8=2")
    assert [mapping.target(v) for v in (0, 3, 7, 8)] == [0, 3, 1, 2]
    assert not parse_mapping("") and not parse_mapping(None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("7=1,8", "--map term '8': has no '=CLASS'"),
        ("9-3=1", "--map term '9-3=1': range 9-3 runs backwards; write 3-9"),
        ("7=1=2", "--map term '7=1=2': more than one '='"),
        ("7=", "--map term '7=': no class after '='"),
        ("0-99999=1", "spans more than 65536 values"),
        ("7=1,7=0", "--map term '7=0': value 7 is mapped twice (to 1 and 0)"),
        ("*=0,*=1", "--map term '*=1': '*' is mapped twice (to 0 and 1)"),
        ("7=5", "--map term '7=5': class 5 is not a class of the model (0=background, 1=liver)"),
        ("7=kidney", "--map term '7=kidney': 'kidney' is not a class of the model; classes: 0=background, 1=liver"),
    ],
)
def test_a_malformed_map_names_the_term_and_shows_an_example(text, message):
    with pytest.raises(LabelMapError) as caught:
        parse_mapping(text, ["background", "liver"])
    assert message in str(caught.value)
    assert str(caught.value).endswith('(example: --map "7-9=liver,*=0")')  # in the model's own classes
    assert "\n" not in str(caught.value)


def test_class_names_need_the_card():
    with pytest.raises(LabelMapError, match="needs the model's classes \\(give --session or --card\\)"):
        parse_mapping("7=liver")


def test_names_that_differ_only_in_letters_beyond_ascii_pair_with_their_own_images():
    images = ["Patient 07 Müller.nii.gz", "Patient 07 Möller.nii.gz"]
    labels = ["Patient 07 Möller.nii.gz", "Patient 07 Müller_seg.nii.gz"]
    pairing = pair_names(labels, images)
    assert pairing.problems == {}
    assert pairing.pairs == {images[0]: labels[1], images[1]: labels[0]}


def test_value_ranges_are_written_as_a_user_would():
    assert value_ranges([100, 41, 42, 43, 45, 60, 61]) == "41-43,45,60-61,100"


def test_a_label_of_foreign_values_suggests_a_map_with_ranges(tmp_path, image):
    path, affine = image
    values = np.zeros((10, 12, 8), np.uint8)
    values[0, 0, :4] = [41, 42, 43, 100]
    with pytest.raises(LabelError, match=r"values \[41-43,100\] are not classes .*--map 41-43=1,100=2,\*=0 \("):
        validate_label(_label(tmp_path, values, affine), path, CLASSES)


def test_as_many_foreign_values_as_classes_are_suggested_one_class_each(tmp_path, image):
    """7, 8 and 9 for three organs: 7-9=1 would merge all three into liver."""
    path, affine = image
    values = np.zeros((10, 12, 8), np.uint8)
    values[0, 0, :3] = [7, 8, 9]
    with pytest.raises(LabelError, match=r"--map 7=1,8=2,9=3,\*=0 \(VALUE=CLASS"):
        validate_label(_label(tmp_path, values, affine), path, CLASSES)


# --- geometry in world space ----------------------------------------------------------------------------------


def test_header_rounding_well_under_the_tolerance_is_the_same_grid(tmp_path):
    affine = np.array([[0, 0, 1.5, -55.729], [-1.5, 0, 0, 116.731], [0, -1.5, 0, 152.136], [0, 0, 0, 1]])
    noisy = affine + np.float32(1e-6) * np.sign(affine)  # a float32 header's rounding
    check_grid((68, 52, 67), noisy, (68, 52, 67), affine, tmp_path / "l.nii")


def test_a_small_rotation_moves_far_voxels_and_is_refused(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    angle = 1e-3  # 0.06 degrees: the affine barely changes, the far corner moves ~0.2 mm
    rotated = affine.copy()
    rotated[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    with pytest.raises(LabelError, match=r"voxel centres up to 0\.2\d* mm apart"):
        check_grid((200, 200, 10), rotated, (200, 200, 10), affine, tmp_path / "l.nii")


def test_a_flipped_and_transposed_label_comes_back_in_the_images_order(tmp_path):
    image_affine = np.array([[0, 0, 2.0, 10], [-1.0, 0, 0, 20], [0, -3.0, 0, 30], [0, 0, 0, 1]])
    values = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    # the same voxels stored as RAS (axes permuted, two flipped)
    import nibabel as nib

    ras = nib.as_closest_canonical(nib.Nifti1Image(values.astype(np.int32), image_affine))
    assert ras.shape != values.shape
    back, note = align_to_image(np.asarray(ras.dataobj), ras.affine, values.shape, image_affine, tmp_path / "l.nii")
    np.testing.assert_array_equal(back, values)
    assert note == "reoriented from RAS to the image's PIR storage order"


def test_a_label_named_by_a_nested_series_path_pairs_with_it_where_the_series_folders_share_a_name():
    """A CD export's series are PT000000/ST000000/SE000000, PT000000/ST000001/SE000000, ...: by folder name
    every label fitted every series. The whole name, / as _, pairs; the shared name is refused with that fix."""
    images = ["PT000000/ST000000/SE000000", "PT000000/ST000001/SE000000", "b/ct.nii.gz"]
    pairing = pair_names(["PT000000_ST000001_SE000000_seg.nii.gz", "SE000000.nii.gz", "b_ct.nii.gz"], images)
    assert pairing.pairs == {
        "PT000000/ST000001/SE000000": "PT000000_ST000001_SE000000_seg.nii.gz",
        "b/ct.nii.gz": "b_ct.nii.gz",
    }
    assert pairing.problems["SE000000.nii.gz"] == (
        "fits several images (PT000000/ST000000/SE000000, PT000000/ST000001/SE000000); import it alone with "
        "--from FILE --cases IMAGE, or name it by its scan's path, / as _ (PT000000_ST000000_SE000000)"
    )
    unpaired = pair_names(["PT000000_ST000001.nii.gz"], images).problems["PT000000_ST000001.nii.gz"]  # no series
    assert unpaired.endswith("(a scan in a sub-folder pairs with its path, / as _: PT000000_ST000001_SE000000))")


BIDS_SCANS = ["sub-01/anat/sub-01_T1w.nii.gz", "sub-02/anat/sub-02_T1w.nii.gz", "sub-02/anat/sub-02_T2w.nii.gz"]


def test_bids_derivatives_pair_with_the_scan_of_their_own_sub_folder_by_entities_and_source_suffix():
    """A derivatives/<pipeline> tree mirrors the dataset: _dseg, desc- and label- (a mask's structure) are the
    derivative's; a label naming its source's suffix is that scan's (sub-02's T1w, not the T2w beside it); a
    file under another subject's folder pairs with nothing there."""
    labels = [
        "sub-01/anat/sub-01_label-liver_mask.nii.gz",
        "sub-02/anat/sub-02_T1w_desc-tumor_dseg.nii.gz",
        "sub-02/anat/sub-01_T1w_dseg.nii.gz",
    ]
    pairing = pair_mirrored(labels, BIDS_SCANS)
    assert pairing.pairs == {
        "sub-01/anat/sub-01_T1w.nii.gz": "sub-01/anat/sub-01_label-liver_mask.nii.gz",
        "sub-02/anat/sub-02_T1w.nii.gz": "sub-02/anat/sub-02_T1w_desc-tumor_dseg.nii.gz",
    }
    assert pairing.problems == {  # its folder named, the scan of its case shown wherever it lies
        "sub-02/anat/sub-01_T1w_dseg.nii.gz": "no image has this case name in the pool's sub-folder sub-02/anat/, "
        "and a label in a sub-folder pairs with the scans of the same sub-folder or of the pool's top; closest in "
        "the whole pool: sub-01/anat/sub-01_T1w.nii.gz"
    }


def test_a_bids_derivative_that_fits_two_scans_or_two_derivatives_of_one_scan_are_refused_naming_the_files():
    """A derivative named by entities alone (the specification's sub-02_desc-tumor_dseg) fits both of sub-02's
    scans; two derivatives of sub-01's one scan (a dseg and a mask) fit it both: each refused in one line naming
    the files, nothing guessed."""
    labels = [
        "sub-02/anat/sub-02_desc-tumor_dseg.nii.gz",
        "sub-01/anat/sub-01_T1w_dseg.nii.gz",
        "sub-01/anat/sub-01_label-liver_mask.nii.gz",
    ]
    pairing = pair_mirrored(labels, BIDS_SCANS)
    assert pairing.pairs == {}
    assert pairing.problems == {
        "sub-02/anat/sub-02_desc-tumor_dseg.nii.gz": "fits several images (sub-02/anat/sub-02_T1w.nii.gz, "
        "sub-02/anat/sub-02_T2w.nii.gz); import it alone with --from FILE --cases IMAGE, or name it by its scan's "
        "path, / as _ (sub-02_anat_sub-02_T1w)",
        "sub-01/anat/sub-01_T1w_dseg.nii.gz": "several label files fit image sub-01/anat/sub-01_T1w.nii.gz (also "
        "sub-01/anat/sub-01_label-liver_mask.nii.gz); keep one in the folder or import one with --from FILE",
        "sub-01/anat/sub-01_label-liver_mask.nii.gz": "several label files fit image sub-01/anat/sub-01_T1w.nii.gz "
        "(also sub-01/anat/sub-01_T1w_dseg.nii.gz); keep one in the folder or import one with --from FILE",
    }
    assert pairing.contested == set(BIDS_SCANS)


@pytest.mark.parametrize(
    ("label", "images", "image"),
    [
        ("sub-01_brain_mask.nii.gz", ["sub-01_T1w.nii.gz"], "sub-01_T1w.nii.gz"),
        ("sub-01_lesion_seg.nii.gz", ["sub-01_FLAIR.nii.gz"], "sub-01_FLAIR.nii.gz"),
        ("sub-01_lesion-mask.nii.gz", ["sub-01_FLAIR.nii.gz"], "sub-01_FLAIR.nii.gz"),
        # the word is a suffix where a scan is named by it: the brain's mask, not the T1w's
        ("sub-01_brain_mask.nii.gz", ["sub-01_T1w.nii.gz", "sub-01_brain.nii.gz"], "sub-01_brain.nii.gz"),
        ("sub-01_brain_mask.nii.gz", ["sub-01_brain.nii.gz"], "sub-01_brain.nii.gz"),
        # evaluate's way round: a map named as its scan, the reference by a free word
        ("sub-01_T1w.nii.gz", ["sub-01_brain_mask.nii.gz"], "sub-01_brain_mask.nii.gz"),
        # in a BIDS tree's sub-folder alike
        ("sub-01/anat/sub-01_brain_mask.nii.gz", ["sub-01/anat/sub-01_T1w.nii.gz"], "sub-01/anat/sub-01_T1w.nii.gz"),
    ],
)
def test_a_free_word_after_sub_xx_that_no_scan_is_named_by_is_no_source_suffix_and_the_label_pairs(
    label, images, image
):
    """sub-01_brain_mask, sub-01_lesion_seg: a word no scan of the pool ends in is the label's own, not the suffix
    of the scan it segments (a T1w, a FLAIR), as before BIDS derivatives paired by their source's suffix."""
    pairing = pair_mirrored([label], images)
    assert pairing.pairs == {image: label}
    assert pairing.problems == {}


def test_a_derivative_naming_a_suffix_the_pool_has_is_refused_for_another_scan_of_its_case_naming_both():
    """A T2w's derivative is no T1w's label where the pool has T2w scans (sub-02's), even where sub-01 has only a
    T1w: the reason names the scan its name says and the one of its case it is not."""
    reason = (
        "no image has this case name (expected 'sub-01_T2w.nii.gz': its name says its scan's suffix T2w; "
        "sub-01_T1w.nii.gz is of another)"
    )
    pairing = pair_names(["sub-01_T2w_dseg.nii.gz"], ["sub-01_T1w.nii.gz", "sub-02_T2w.nii.gz"])
    assert (pairing.pairs, pairing.problems) == ({}, {"sub-01_T2w_dseg.nii.gz": reason})
    nested = pair_mirrored(["sub-01/anat/sub-01_T2w_dseg.nii.gz"], BIDS_SCANS)  # sub-02's T2w: the pool's suffix
    assert nested.pairs == {}
    assert nested.problems == {
        "sub-01/anat/sub-01_T2w_dseg.nii.gz": reason.replace("sub-01_T1w.nii.gz", "sub-01/anat/sub-01_T1w.nii.gz")
    }


def test_a_label_in_a_sub_folder_the_pool_lacks_says_its_folder_does_not_mirror_the_pools_and_the_closest_scans():
    """labels/case01_seg is compared with no scan of labels/ (the pool has none); its one line names the folder,
    the pool's folders and the scans of its case wherever they lie, not 'no similar name among 0 images'; a
    folder above the mirroring one (derivatives/ for derivatives/manual) is named as such."""
    pairing = pair_mirrored(["labels/case01_seg.nii.gz"], ["site1/case01.nii.gz", "site2/case02.nii.gz"])
    assert pairing.pairs == {}
    assert pairing.problems == {
        "labels/case01_seg.nii.gz": "no image has this case name: its sub-folder labels/ does not mirror the pool's "
        "sub-folders (site1/, site2/), and a label in a sub-folder pairs with the scans of the same sub-folder "
        "or of the pool's top; closest in the whole pool: site1/case01.nii.gz"
    }
    above = pair_mirrored(["manual/sub-01/anat/sub-01_T1w_dseg.nii.gz"], BIDS_SCANS)
    assert above.pairs == {}
    assert above.problems == {
        "manual/sub-01/anat/sub-01_T1w_dseg.nii.gz": "no image has this case name: its sub-folder "
        "manual/sub-01/anat/ does not mirror the pool's sub-folders but ends in the pool's sub-01/anat/: give its "
        "folder manual/ (under the one given) instead, as a label in a sub-folder pairs with the scans of the same "
        "sub-folder or of the pool's top; closest in the whole pool: sub-01/anat/sub-01_T1w.nii.gz"
    }


def test_a_label_whose_sub_folder_lacks_its_scan_pairs_with_the_one_of_its_case_at_the_pools_top_never_two():
    """site1/case01_seg where site1/ holds case02 only and case01 lies at the pool's top: that scan, the one of its
    case with no folder to mirror (as any label pairs with a pool all at the top); a scan of its case in another
    sub-folder never, two at the top or a second label for it refused, naming the files."""
    images = ["case01.nii.gz", "site1/case02.nii.gz", "site2/case03.nii.gz"]
    pairing = pair_mirrored(["site1/case01_seg.nii.gz", "site1/case02_seg.nii.gz"], images)
    assert pairing.pairs == {
        "case01.nii.gz": "site1/case01_seg.nii.gz",
        "site1/case02.nii.gz": "site1/case02_seg.nii.gz",
    }
    assert pairing.problems == {}
    assert pair_mirrored(["site1/case03_seg.nii.gz"], images).problems == {
        "site1/case03_seg.nii.gz": "no image has this case name in the pool's sub-folder site1/, and a label in a "
        "sub-folder pairs with the scans of the same sub-folder or of the pool's top; closest in the whole pool: "
        "site2/case03.nii.gz"
    }
    twice = pair_mirrored(
        ["site1/sub-01_mask.nii.gz", "site1/case01_seg.nii.gz", "case01_seg.nii.gz"],
        ["sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz", *images],
    )
    assert twice.pairs == {}
    assert twice.problems == {
        "site1/sub-01_mask.nii.gz": "fits several images (sub-01_T1w.nii.gz, sub-01_T2w.nii.gz); import it alone "
        "with --from FILE --cases IMAGE",
        "site1/case01_seg.nii.gz": "several label files fit image case01.nii.gz (also case01_seg.nii.gz); keep one "
        "in the folder or import one with --from FILE",
        "case01_seg.nii.gz": "several label files fit image case01.nii.gz (also site1/case01_seg.nii.gz); keep one "
        "in the folder or import one with --from FILE",
    }
