"""The MRML bridge against real Slicer MRML (slicer-core): geometry, segmentations and files."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (real Slicer MRML) is needed for the bridge tests")

from ASFDALib.app import mrml  # noqa: E402
from ASFDALib.data.volumes import read_volume, write_nifti  # noqa: E402

CLASSES = ["background", "liver", "kidney", "gallbladder"]


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _oblique_affine() -> np.ndarray:
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-40.0, 12.5, 100.0]
    return affine


def test_oblique_volume_round_trips_through_a_node(scene):
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    node = mrml.volume_to_node(scene, array, _oblique_affine(), "oblique")
    back, affine = mrml.node_to_volume(node)
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(affine, _oblique_affine(), atol=1e-9)
    assert node.GetImageData().GetDimensions() == (5, 6, 7)  # i, j, k as Slicer sees them


def test_nifti_geometry_is_the_same_in_slicer_and_in_asfdalib(scene, tmp_path):
    """Slicer reads files as LPS and shows RAS; ASFDALib reads RAS: one voxel, one point, both ways."""
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    path = write_nifti(tmp_path / "oblique.nii.gz", array, _oblique_affine())
    node = mrml.load_volume(scene, path)
    from_slicer, affine = mrml.node_to_volume(node)
    ours = read_volume(path)
    np.testing.assert_array_equal(from_slicer, ours.array)
    np.testing.assert_allclose(affine, ours.affine, atol=1e-4)


def test_labelmap_to_segmentation_keeps_names_and_values(scene):
    label = np.zeros((10, 10, 10), np.uint8)
    label[1:4, 1:4, 1:4] = 1
    label[6:9, 6:9, 6:9] = 3  # class 2 (kidney) absent: it must still get an empty segment to paint into
    volume = mrml.volume_to_node(scene, np.random.rand(10, 10, 10).astype(np.float32), _oblique_affine())
    seg = mrml.labelmap_to_segmentation(scene, label, _oblique_affine(), CLASSES, volume)
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(names) == sorted(CLASSES[1:])
    back = mrml.segmentation_to_labelmap(seg, volume, CLASSES)
    np.testing.assert_array_equal(back, label)


def _segmentation(scene):
    label = np.zeros((10, 10, 10), np.uint8)
    label[1:4, 1:4, 1:4] = 1
    label[6:9, 6:9, 6:9] = 3
    volume = mrml.volume_to_node(scene, np.zeros((10, 10, 10), np.float32), _oblique_affine())
    return label, volume, mrml.labelmap_to_segmentation(scene, label, _oblique_affine(), CLASSES, volume)


def test_a_round_trip_leaves_no_helper_node_in_the_scene(scene):
    """Left behind, Slicer's export color tables and display nodes show in the Data module and the Save dialog."""
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)  # the application's scenes always hold one
    _, volume, seg = _segmentation(scene)
    before = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    for _ in range(3):
        mrml.segmentation_to_labelmap(seg, volume, CLASSES)
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == before
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


def test_a_segment_renamed_by_a_terminology_entry_keeps_its_class(scene):
    """Choosing "Liver" from Slicer's terminology list renames the segment; its voxels are still class 1."""
    label, volume, seg = _segmentation(scene)
    segmentation = seg.GetSegmentation()
    liver = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    liver.SetName("Liver")
    # the entry the Segment Editor's terminology dialog writes (Slicer tries it before the name)
    liver.SetTerminology(
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    assert liver.HasTerminology()
    np.testing.assert_array_equal(mrml.segmentation_to_labelmap(seg, volume, CLASSES), label)


def test_a_segment_of_no_class_is_refused_not_dropped_from_the_label(scene):
    _, volume, seg = _segmentation(scene)
    seg.GetSegmentation().AddEmptySegment("tumour", "tumour", [1.0, 0.0, 0.0])
    with pytest.raises(mrml.SegmentNameError, match=r"segments 'tumour' are no class of the model \(liver, kidney"):
        mrml.segmentation_to_labelmap(seg, volume, CLASSES)
    seg.GetSegmentation().AddEmptySegment("Kidney", "Kidney", [1.0, 0.0, 0.0])
    seg.GetSegmentation().RemoveSegment("tumour")
    with pytest.raises(mrml.SegmentNameError, match="two segments are kidney .*'Kidney'.*merge them"):
        mrml.segmentation_to_labelmap(seg, volume, CLASSES)


def test_seg_nrrd_is_written_and_read_back(scene, tmp_path):
    label = np.zeros((8, 9, 10), np.uint8)
    label[2:5, 2:6, 3:7] = 2
    volume = mrml.volume_to_node(scene, np.zeros((8, 9, 10), np.float32) + np.arange(10), np.eye(4))
    seg = mrml.labelmap_to_segmentation(scene, label, np.eye(4), CLASSES, volume)
    path = mrml.save_segmentation(seg, tmp_path / "case.seg.nrrd")
    other_scene = slicer.vtkMRMLScene()
    loaded = mrml.load_segmentation(other_scene, path)
    other_scene_volume = mrml.volume_to_node(other_scene, np.zeros((8, 9, 10), np.float32), np.eye(4))
    np.testing.assert_array_equal(mrml.segmentation_to_labelmap(loaded, other_scene_volume, CLASSES), label)
    assert loaded.GetSegmentation().GetSegmentIdBySegmentName("kidney")


def test_prediction_prefill_gives_an_editable_segment_per_class(scene, default_model):
    """A model prediction becomes the segmentation a clinician corrects, with the model's class names."""
    from ASFDALib.bench.phantoms import make_phantom
    from ASFDALib.data.preprocess import labels_to_native, preprocess
    from ASFDALib.data.volumes import Volume
    from ASFDALib.inference.predict import predict_label

    image, truth, affine = make_phantom(4)
    volume_node = mrml.volume_to_node(scene, image, affine, "case")
    array, node_affine = mrml.node_to_volume(volume_node)
    x = preprocess(Volume(array, node_affine, "case"), default_model.card)
    label = predict_label(default_model.network, x, default_model.card, "cpu").astype(np.uint8)
    native = labels_to_native(label, x.affine.numpy(), array.shape, node_affine)
    seg = mrml.labelmap_to_segmentation(scene, native, node_affine, default_model.card.class_names, volume_node)
    back = mrml.segmentation_to_labelmap(seg, volume_node, default_model.card.class_names)
    np.testing.assert_array_equal(back, native)
    dice = 2 * np.logical_and(back == 1, truth == 1).sum() / ((back == 1).sum() + (truth == 1).sum())
    assert dice > 0.8  # the source model on a source-domain phantom: a useful starting point
