"""The MRML bridge: the only module of ASFDALib that imports ``slicer``.

Volumes and segmentations cross between MRML nodes and (array, affine) pairs here, with Slicer's
conventions handled once: VTK images are stored [k, j, i] while ASFDALib arrays are [i, j, k]; the
IJK-to-RAS matrix (oblique scans included) becomes the 4x4 RAS affine; segments keep stable label
values through their names. Works in the Slicer application and with ``slicer-core`` (real MRML from
PyPI), which is what the tests use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_COLORS = [
    (0.0, 0.0, 0.0),
    (0.85, 0.40, 0.30),
    (0.40, 0.70, 0.35),
    (0.95, 0.80, 0.25),
    (0.35, 0.55, 0.90),
    (0.75, 0.45, 0.85),
    (0.30, 0.80, 0.80),
    (0.90, 0.55, 0.70),
]


def _slicer():
    import slicer

    return slicer


def _vtk():
    import vtk

    return vtk


def affine_to_matrix(affine: np.ndarray):
    matrix = _vtk().vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(affine[r, c]))
    return matrix


def matrix_to_affine(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_to_node(scene, array: np.ndarray, affine: np.ndarray, name: str = "volume", labelmap: bool = False):
    """A new scalar (or labelmap) volume node holding a copy of ``array`` [i, j, k] at ``affine`` (RAS)."""
    from vtk.util import numpy_support

    vtk = _vtk()
    array = np.asarray(array)
    if array.dtype == np.int64:  # VTK image pipelines and Slicer's editors reject 64-bit labels
        array = array.astype(np.int32)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape)
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(array.dtype))
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(affine_to_matrix(np.asarray(affine, dtype=np.float64)))
    node.CreateDefaultDisplayNodes()
    return node


def node_to_volume(node) -> tuple[np.ndarray, np.ndarray]:
    """A copy of the node's voxels as [i, j, k] and its IJK-to-RAS affine."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = flat.reshape(dims[2], dims[1], dims[0]).transpose(2, 1, 0).copy()
    return array, volume_affine(node)


def color_table(scene, class_names: list[str], colors: list[tuple[float, float, float]] | None = None):
    """A color table whose entry i is class i: names and colours that segments inherit."""
    colors = colors or DEFAULT_COLORS
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "ASFDA classes")
    table.SetTypeToUser()
    table.SetNumberOfColors(len(class_names))
    for index, name in enumerate(class_names):
        r, g, b = colors[index % len(colors)]
        table.SetColor(index, name, r, g, b, 0.0 if index == 0 else 1.0)
    return table


def _remove_with_display(scene, node) -> None:
    """Remove a helper node and the display nodes made for it: left behind, each shows in the Data module and
    in the Save dialog (Slicer makes color tables visible to editors so that they can be saved)."""
    for index in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


def labelmap_to_segmentation(
    scene,
    label: np.ndarray,
    affine: np.ndarray,
    class_names: list[str],
    reference_volume=None,
    name: str = "segmentation",
    segmentation_node=None,
):
    """A segmentation with one segment per foreground class (empty ones included), named as the classes."""
    slicer = _slicer()
    labelmap = volume_to_node(scene, label, affine, "__asfda_labelmap__", labelmap=True)
    table = color_table(scene, class_names)
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    seg = segmentation_node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.GetSegmentation().RemoveAllSegments()
    if reference_volume is not None:
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg)
    segmentation = seg.GetSegmentation()
    for index, class_name in enumerate(class_names[1:], start=1):
        if not segmentation.GetSegmentIdBySegmentName(class_name):
            r, g, b = DEFAULT_COLORS[index % len(DEFAULT_COLORS)]
            segmentation.AddEmptySegment(class_name, class_name, [r, g, b])
    _remove_with_display(scene, labelmap)
    scene.RemoveNode(table)
    return seg


class SegmentNameError(ValueError):
    """A segment whose name is no class of the model: saved without it, the label would lose what it holds."""


def segment_classes(seg, class_names: list[str]) -> dict[str, int]:
    """Segment ID -> class index, by the segment's name (case aside: choosing a terminology entry in the
    Segment Editor renames "liver" to "Liver"). A segment of no class, or two of one class, is refused:
    the label saved must hold every voxel the clinician painted, each as one class."""
    index_of = {name.casefold(): i for i, name in enumerate(class_names) if i > 0}
    segmentation = seg.GetSegmentation()
    found: dict[str, int] = {}
    foreign, twice = [], {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        name = segmentation.GetSegment(segment_id).GetName()
        index = index_of.get(name.casefold())
        if index is None:
            foreign.append(name)
        elif index in found.values():
            twice.setdefault(class_names[index], []).append(name)
        else:
            found[segment_id] = index
    classes = ", ".join(class_names[1:])
    if foreign:
        raise SegmentNameError(
            f"segments {', '.join(repr(f) for f in foreign)} are no class of the model ({classes}): rename each to "
            "the class it is, or delete it (the label would be saved without it)"
        )
    if twice:
        name, names = next(iter(twice.items()))
        raise SegmentNameError(f"two segments are {name} (the second named {names[0]!r}): merge them into one")
    return found


def segmentation_to_labelmap(seg, reference_volume, class_names: list[str]) -> np.ndarray:
    """[i, j, k] labels on the reference volume's grid; each segment's value comes from its class name
    (:func:`segment_classes`), in one export through a color table of the classes."""
    slicer = _slicer()
    vtk = _vtk()
    scene = seg.GetScene()
    dims = reference_volume.GetImageData().GetDimensions()
    classes = segment_classes(seg, class_names)
    if not classes:
        return np.zeros(dims, np.uint8)
    # The table names each class as its segment is named, so Slicer gives each segment its class's value
    # (vtkSlicerSegmentationsModuleLogic::GetLabelValuesFromColorNode matches by name); set on the labelmap's
    # display first, so the export adds no color table of its own to the scene.
    segmentation = seg.GetSegmentation()
    names = list(class_names)
    for segment_id, index in classes.items():
        names[index] = segmentation.GetSegment(segment_id).GetName()
    table = color_table(scene, names)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__asfda_export__")
    labelmap.CreateDefaultDisplayNodes()
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
    ids = vtk.vtkStringArray()
    for segment_id in sorted(classes, key=classes.get):  # class order: where segments overlap, the later wins
        ids.InsertNextValue(segment_id)
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            seg, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, table
        )
        if not ok or labelmap.GetImageData() is None:
            raise RuntimeError(f"{seg.GetName()}: Slicer could not export the segments to a label map")
        out, _ = node_to_volume(labelmap)
    finally:
        _remove_with_display(scene, labelmap)
        scene.RemoveNode(table)
    if out.shape != tuple(dims):
        raise RuntimeError(f"{seg.GetName()}: exported on a {out.shape} grid, not the volume's {tuple(dims)}")
    return out.astype(np.uint8)


def volume_affine(node) -> np.ndarray:
    """The node's IJK-to-RAS affine, without copying its voxels."""
    matrix = _vtk().vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return matrix_to_affine(matrix)


def save_segmentation(seg, path: Path) -> Path:
    """Write ``.seg.nrrd`` (names, colours and terminology kept) through Slicer's own storage node."""
    slicer = _slicer()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    seg.GetScene().AddNode(storage)
    storage.SetFileName(str(path))
    ok = storage.WriteData(seg)
    seg.GetScene().RemoveNode(storage)
    if not ok:
        raise OSError(f"{path}: Slicer could not write the segmentation")
    return Path(path)


def load_segmentation(scene, path: Path, name: str | None = None):
    return _read_node(scene, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", path, name, "segmentation")


def load_volume(scene, path: Path, name: str | None = None):
    """Read a volume file with Slicer's own reader (ITK: NIfTI, NRRD, ...), as Slicer would."""
    return _read_node(scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", path, name, "volume")


def _read_node(scene, node_class: str, storage_class: str, path: Path, name: str | None, what: str):
    """A new ``node_class`` node read from ``path`` by a transient ``storage_class`` storage node."""
    slicer = _slicer()
    node = scene.AddNewNodeByClass(node_class, name or Path(path).name)
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    read = storage.ReadData(node)
    scene.RemoveNode(storage)
    if not read:  # no empty node left in the scene
        scene.RemoveNode(node)
        raise OSError(f"{path}: Slicer could not read the {what}")
    return node
