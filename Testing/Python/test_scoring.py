"""Known answers for every formula of the method (docs/method.md)."""

from __future__ import annotations

import numpy as np
import pytest

from ASFDALib.query import scoring
from ASFDALib.query.features import FeatureSummary


def test_entropy_of_uniform_prediction_is_one():
    probs = np.full((4, 3, 3, 3), 0.25)
    np.testing.assert_allclose(scoring.normalized_entropy(probs), 1.0)


def test_entropy_of_certain_prediction_is_zero():
    probs = np.zeros((3, 5))
    probs[1] = 1.0
    np.testing.assert_allclose(scoring.normalized_entropy(probs), 0.0, atol=1e-9)


def test_otsu_splits_two_modes_between_them():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.8, 0.02, 1000)])
    hist, edges = np.histogram(values, bins=256, range=(0, 1))
    threshold = scoring.otsu_threshold(hist, (edges[:-1] + edges[1:]) / 2)
    assert 0.2 < threshold < 0.7


def test_adaptive_foreground_is_the_otsu_region_dilated_by_one_voxel():
    fg = np.zeros((9, 9, 9), np.float32)
    fg[4, 4, 4] = 0.9
    region, threshold = scoring.adaptive_foreground(fg)
    assert 0.05 <= threshold <= 0.5
    assert region.sum() == 27  # the voxel and its 3x3x3 neighbourhood
    assert region[3:6, 3:6, 3:6].all()


def test_adaptive_foreground_threshold_is_clamped():
    fg = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    _, threshold = scoring.adaptive_foreground(fg)
    assert 0.05 <= threshold <= 0.5


def test_adaptive_foreground_on_uint8_matches_float():
    rng = np.random.default_rng(1)
    fg = rng.random((12, 12, 12)).astype(np.float32) ** 3
    quantised = (fg * 255 + 0.5).astype(np.uint8)
    region_f, _ = scoring.adaptive_foreground(fg, margin=0)
    region_q, _ = scoring.adaptive_foreground(quantised, margin=0, scale=255)
    assert (region_f != region_q).mean() < 0.02


def test_adaptive_foreground_from_a_histogram_gathered_piece_by_piece_matches_the_map():
    rng = np.random.default_rng(2)
    quantised = (rng.random((16, 12, 12)) ** 3 * 255 + 0.5).astype(np.uint8)
    hist = sum(np.bincount(part.ravel(), minlength=256) for part in np.split(quantised, 4))
    region_map, t_map = scoring.adaptive_foreground(quantised, scale=255)
    region_hist, t_hist = scoring.adaptive_foreground(quantised, scale=255, hist=hist)
    assert t_hist == t_map
    np.testing.assert_array_equal(region_hist, region_map)


def test_empty_foreground_falls_back_to_the_top_percent():
    fg = np.zeros((10, 10, 10), np.float32)
    fg[0, 0, :] = 0.01  # nothing passes even the lowest clamp
    region, _ = scoring.adaptive_foreground(fg, margin=0)
    assert region.any()


def test_class_balanced_asd_counts_a_small_organ():
    """A small, uncertain organ must move ASD as much as a large, confident one."""
    shape = (20, 20, 20)
    fg_class = np.ones(shape, np.uint8)
    entropy = np.full(shape, 0.1, np.float32)
    fg_class[:3, :3, :3] = 2  # 27 voxels of a small organ among 8000
    entropy[:3, :3, :3] = 0.9
    region = np.ones(shape, bool)
    balanced = scoring.class_balanced_entropy(entropy, region, fg_class)
    voxel_mean = entropy.mean()
    assert balanced == pytest.approx((0.1 * (8000 - 27) / (8000 - 27) + 0.9) / 2, abs=1e-6)
    assert balanced > 4 * voxel_mean


def test_class_with_a_few_stray_voxels_does_not_count():
    fg_class = np.ones((10, 10, 10), np.uint8)
    entropy = np.full((10, 10, 10), 0.2, np.float32)
    fg_class[0, 0, 0] = 3
    entropy[0, 0, 0] = 1.0
    value = scoring.class_balanced_entropy(entropy, np.ones_like(fg_class, bool), fg_class)
    assert value == pytest.approx(0.2, abs=1e-6)


def test_free_energy_of_equal_logits():
    logits = np.zeros((4, 2, 2))
    np.testing.assert_allclose(scoring.free_energy(logits), -np.log(4))


def test_skl_of_equal_summaries_is_zero():
    summary = FeatureSummary({"a": (np.array([0.3, -1.0]), np.array([2.0, 0.5]))})
    assert scoring.pairwise_skl([summary, summary], ["a"])[0, 1] == pytest.approx(0.0)
    assert scoring.skl_to_reference([summary], summary, ["a"])[0] == pytest.approx(0.0)


def test_skl_is_symmetric_and_has_the_closed_form():
    # N(0,1) vs N(1,1): KL = 0.5 each way, so the symmetric mean is 0.5
    assert scoring.gaussian_skl(np.array(0.0), np.array(1.0), np.array(1.0), np.array(1.0)) == pytest.approx(0.5)
    a = scoring.gaussian_skl(np.array(0.2), np.array(0.7), np.array(-1.0), np.array(3.0))
    b = scoring.gaussian_skl(np.array(-1.0), np.array(3.0), np.array(0.2), np.array(0.7))
    assert a == pytest.approx(b)


def test_temperature_makes_scores_invariant_to_scaling_divergences():
    d = np.array([0.1, 0.5, 2.0, 7.0])
    s1 = scoring.temperature_score(d, scoring.dynamic_temperature(d))
    s2 = scoring.temperature_score(1000 * d, scoring.dynamic_temperature(1000 * d))
    np.testing.assert_allclose(s1, s2)
    assert np.all((s1 >= 0) & (s1 < 1))


def test_temperature_is_the_median():
    assert scoring.dynamic_temperature(np.array([1.0, 2.0, 10.0])) == 2.0
    assert scoring.dynamic_temperature(np.array([0.0, 0.0, 0.0])) == 1.0


def test_percentile_rank_spans_zero_to_one_and_shares_ties():
    np.testing.assert_allclose(scoring.percentile_rank(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])
    np.testing.assert_allclose(scoring.percentile_rank(np.array([1.0, 1.0, 5.0])), [0.25, 0.25, 1.0])
    np.testing.assert_allclose(scoring.percentile_rank(np.array([4.0])), [1.0])


def test_dilate_grows_by_radius_in_every_direction():
    mask = np.zeros((7, 7, 7), bool)
    mask[3, 3, 3] = True
    assert scoring.dilate(mask, 2).sum() == 125
