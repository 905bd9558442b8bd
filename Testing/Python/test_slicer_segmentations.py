"""Slicer segmentations (.seg.nrrd) as label files: read by their segments' names, never by the order the
segments were made in. The files are written by Slicer's own storage node (slicer-core), as a clinician's
Slicer writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core writes the segmentations as Slicer does")

from ASFDALib.app import mrml  # noqa: E402
from ASFDALib.data.labels import LabelError, parse_mapping, read_label, validate_label  # noqa: E402
from ASFDALib.data.volumes import write_nifti  # noqa: E402
from ASFDALib.evaluation.evaluate import evaluate_folders  # noqa: E402

CLASSES = ["background", "liver", "kidney", "gallbladder"]
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (12, 12, 8)
BOXES = {  # made in this order: Slicer numbers them 1, 2, 3
    "Gallbladder": np.s_[1:3, 1:3, 1:3],
    "Liver": np.s_[5:9, 5:9, 2:6],
    "kidney": np.s_[1:3, 8:10, 4:6],
}


def _expected() -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    for name, box in BOXES.items():
        out[box] = CLASSES.index(name.lower())
    return out


def _segmentation(path: Path, boxes: dict) -> Path:
    """A segmentation made segment by segment in a scene, saved by Slicer's segmentation storage node."""
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_to_node(scene, np.zeros(SHAPE, np.float32), AFFINE, "scan")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "labels")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, box in boxes.items():
        mask = np.zeros(SHAPE, np.uint8)
        mask[box] = 1
        node = mrml.volume_to_node(scene, mask, AFFINE, name, labelmap=True)
        before = seg.GetSegmentation().GetNumberOfSegments()
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(node, seg)
        seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetNthSegmentID(before)).SetName(name)
        scene.RemoveNode(node)
    return mrml.save_segmentation(seg, path)


@pytest.fixture
def scan(tmp_path) -> Path:
    return write_nifti(tmp_path / "case.nii.gz", np.random.default_rng(0).normal(size=SHAPE).astype(np.float32), AFFINE)


def test_a_slicer_segmentation_is_read_by_its_segment_names_not_their_order(tmp_path, scan):
    path = _segmentation(tmp_path / "case.seg.nrrd", BOXES)
    assert read_label(path)[1] == {1: "Gallbladder", 2: "Liver", 3: "kidney"}  # Slicer's numbers: creation order
    notes: list[str] = []
    label, _ = validate_label(path, scan, CLASSES, notes=notes)
    np.testing.assert_array_equal(label, _expected())  # gallbladder is class 3, not 1
    assert notes == ["segments read by name: Gallbladder=3, Liver=1, kidney=2"]
    # a --map given for the file's values is the user's word on them, before the names
    label, _ = validate_label(path, scan, CLASSES, parse_mapping("1=3,2=1,3=2"))
    np.testing.assert_array_equal(label, _expected())


def test_a_segment_of_no_class_is_refused_naming_it_and_the_classes(tmp_path, scan):
    path = _segmentation(tmp_path / "case.seg.nrrd", {**BOXES, "tumour": np.s_[9:11, 1:3, 1:3]})
    with pytest.raises(LabelError, match=r"segments 'tumour' \(value 4\) are no class of the model .*--map 4=1"):
        validate_label(path, scan, CLASSES)
    # the term the refusal names maps that segment; the others keep their names' classes
    for given in ("4=0", "*=0"):
        label, _ = validate_label(path, scan, CLASSES, parse_mapping(given))
        np.testing.assert_array_equal(label, _expected())
    # a --map meant for another folder's files (values 7-9) leaves a named segmentation to its names
    label, _ = validate_label(
        _segmentation(tmp_path / "b.seg.nrrd", BOXES), scan, CLASSES, parse_mapping("7=1,8=2,*=0")
    )
    np.testing.assert_array_equal(label, _expected())


def test_overlapping_segments_in_layers_are_refused_naming_both(tmp_path, scan):
    boxes = {**BOXES, "kidney": np.s_[6:8, 6:8, 3:5]}  # inside the liver: Slicer stores it in a second layer
    path = _segmentation(tmp_path / "case.seg.nrrd", boxes)
    with pytest.raises(LabelError, match=r"segments 'Liver' and 'kidney' overlap \(8 voxels\)"):
        validate_label(path, scan, CLASSES)


def _layered(path: Path, names: list[str]) -> Path:
    """A segmentation as Slicer before 4.11 kept it: each segment in its own layer (a 4D file, each at value 1)."""
    import SimpleITK as sitk

    layers = np.zeros((*SHAPE, len(BOXES)), np.uint8)
    for index, box in enumerate(BOXES.values()):
        layers[(*box, index)] = 1
    image = sitk.GetImageFromArray(layers.transpose(2, 1, 0, 3), isVector=True)  # (k, j, i, layer)
    image.SetSpacing((1.5, 1.5, 2.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # LPS on disk: the scan's RAS axes
    for index, name in enumerate(names):
        image.SetMetaData(f"Segment{index}_Name", name)
    sitk.WriteImage(image, str(path))
    return path


def test_a_segmentation_in_layers_without_overlap_is_merged(tmp_path, scan):
    label, _ = validate_label(_layered(tmp_path / "case.seg.nrrd", list(BOXES)), scan, CLASSES)
    np.testing.assert_array_equal(label, _expected())


def test_segments_named_as_no_class_are_read_with_the_map_the_refusal_shows(tmp_path, scan):
    """Slicer's default names (Segment_1, ...): the refusal's values are the ones a --map for the file reads."""
    path = _layered(tmp_path / "case.seg.nrrd", ["Segment_1", "Segment_2", "Segment_3"])
    with pytest.raises(LabelError, match=r"'Segment_1' \(value 1\), 'Segment_2' \(value 2\).*--map 1=1,2=2,3=3"):
        validate_label(path, scan, CLASSES)
    label, _ = validate_label(path, scan, CLASSES, parse_mapping("1=gallbladder,2=liver,3=kidney", CLASSES))
    np.testing.assert_array_equal(label, _expected())


def test_evaluate_reads_a_slicer_segmentation_reference_by_its_names(tmp_path):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    _segmentation(tmp_path / "gt" / "case.seg.nrrd", {**BOXES, "tumour": np.s_[9:11, 1:3, 1:3]})
    write_nifti(tmp_path / "pred" / "case.nii.gz", _expected(), AFFINE)
    (score,) = evaluate_folders(tmp_path / "pred", tmp_path / "gt", CLASSES, parse_mapping("4=0"))
    assert score.reason == "" and score.dice == [1.0, 1.0, 1.0]
