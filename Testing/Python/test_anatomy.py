"""The rich phantom anatomy: its classes, the thin pancreas, the small gallbladder, body size moving organs
and sizes together, smooth deformations, partial-volume edges, the rare subgroups; and that the default
(ellipsoid) phantoms the shipped model was trained on are unchanged."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from ASFDALib.bench.anatomy import RICH_CLASS_NAMES, displacement_field
from ASFDALib.bench.phantoms import PhantomConfig, make_phantom, site_config, write_pool

RICH_CT = PhantomConfig("ct", anatomy="rich", contrast="ct_portal")


@pytest.fixture(scope="module")
def rich_cases():
    return [make_phantom(seed, RICH_CT) for seed in range(4)]


def test_five_organ_classes_each_one_connected_shape(rich_cases):
    assert RICH_CLASS_NAMES == ["background", "liver", "spleen", "kidney", "pancreas", "gallbladder"]
    for _, label, _ in rich_cases:
        assert set(np.unique(label)) == set(range(6))
        for c, name in enumerate(RICH_CLASS_NAMES[1:], start=1):
            _, parts = ndimage.label(label == c)
            assert parts == (2 if name == "kidney" else 1), name  # smooth shapes do not shatter


def _elongation(mask: np.ndarray) -> float:
    """sqrt of the largest over the smallest eigenvalue of the voxel coordinates' covariance."""
    eig = np.linalg.eigvalsh(np.cov(np.argwhere(mask).T.astype(float)))
    return float(np.sqrt(eig[-1] / eig[0]))


def test_the_pancreas_is_thin_and_elongated_and_the_gallbladder_small(rich_cases):
    for _, label, _ in rich_cases:
        assert _elongation(label == 4) > 4.0
        assert _elongation(label == 1) < 2.5  # the liver is a compact organ
        assert (label == 5).sum() < 0.05 * (label == 1).sum()


def test_a_bigger_body_has_bigger_organs_further_apart():
    small = replace(RICH_CT, body_scale=0.85, body_size_sd=0.0)
    large = replace(RICH_CT, body_scale=1.15, body_size_sd=0.0)
    for seed in (0, 1):
        _, ls, _ = make_phantom(seed, small)
        _, ll, _ = make_phantom(seed, large)
        assert (ll == 1).sum() > 1.3 * (ls == 1).sum() and (ll == 2).sum() > 1.3 * (ls == 2).sum()
        gap = [
            np.linalg.norm(np.argwhere(lab == 1).mean(0) - np.argwhere(lab == 2).mean(0)) for lab in (ls, ll)
        ]  # liver-spleen distance
        assert gap[1] > 1.1 * gap[0]


def test_the_deformation_field_is_smooth_and_bounded():
    field = displacement_field((72, 72, 56), 5.0, np.random.default_rng(0))
    assert np.abs(field).max() == pytest.approx(5.0)
    gradient = max(np.abs(np.diff(field, axis=a)).max() for a in (1, 2, 3)) / 2.0  # mm per mm (2 mm voxels)
    assert gradient < 0.5  # well below 1: the warp never folds a surface onto itself
    field2 = displacement_field((72, 72, 56), 5.0, np.random.default_rng(1))
    assert not np.allclose(field, field2)


def test_organ_edges_have_partial_volume_intensities():
    image, label, _ = make_phantom(3, replace(RICH_CT, noise=0.0, blur=0.0))
    liver, background_fat = 110.0, -100.0  # ct_portal liver; body fat
    edge = (label == 1) & ~ndimage.binary_erosion(label == 1)
    interior = ndimage.binary_erosion(label == 1, iterations=2)
    assert np.std(image[interior]) < 1.0  # no noise, no texture: one value inside
    between = (image[edge] < image[interior].mean() - 5).mean()
    assert between > 0.2  # many edge voxels are mixtures with their neighbours
    assert liver > background_fat


def test_rare_subgroups_in_the_rich_anatomy():
    _, normal, _ = make_phantom(5, RICH_CT)
    _, missing, _ = make_phantom(5, replace(RICH_CT, subgroup="missing_kidney"))
    image_lesion, lesion, _ = make_phantom(5, replace(RICH_CT, subgroup="lesion"))
    _, parts = ndimage.label(missing == 3)
    assert parts == 1 and (missing == 3).sum() < 0.7 * (normal == 3).sum()
    assert (lesion == 1).sum() == (normal == 1).sum()  # the cyst is still liver in the label


def test_a_rich_pool_has_ten_percent_rare_cases_at_every_site(tmp_path):
    cases = write_pool(tmp_path, 20, seed=2, anatomy="rich")
    assert sum(c["subgroup"] != "none" for c in cases) == 2
    assert json.loads((tmp_path / "cases.json").read_text())["cases"] == cases
    from ASFDALib.data.volumes import read_volume

    label = read_volume(tmp_path / "labels" / cases[0]["name"], allow_constant=True).array
    assert int(label.max()) == 5


def test_default_phantoms_are_still_the_ellipsoid_anatomy():
    a, la, _ = make_phantom(3)
    b, lb, _ = make_phantom(3, replace(PhantomConfig("ct"), anatomy="ellipsoid"))
    np.testing.assert_array_equal(la, lb)
    np.testing.assert_array_equal(a, b)
    assert int(la.max()) == 3
    _, site_label, _ = make_phantom(3, site_config("A"))
    assert int(site_label.max()) == 3
