"""TypiClust and ClaSP PE on small arrays whose answers are known by construction, and through `select`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ASFDALib.query.baselines import (
    clasp_beta,
    clasp_pe_order,
    clasp_slots,
    kmeans,
    typicality,
    typiclust_order,
)
from ASFDALib.query.class_entropy import class_entropy_from_probabilities
from ASFDALib.query.features import FeatureSummary
from ASFDALib.query.selection import STRATEGIES, Pool, select


def _blob(centre, radius, count):
    """A centre point and ``count - 1`` points evenly on a circle around it: the centre is the most typical."""
    angles = np.linspace(0, 2 * np.pi, count - 1, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1) * radius + centre
    return np.concatenate([[centre], ring])


def test_kmeans_separates_two_far_blobs_whatever_the_seed():
    x = np.concatenate([_blob([0.0, 0.0], 1.0, 7), _blob([20.0, 0.0], 1.0, 5)])
    for seed in range(3):
        labels = kmeans(x, 2, seed)
        assert len(set(labels[:7])) == 1 and len(set(labels[7:])) == 1 and labels[0] != labels[7]


def test_typicality_is_the_inverse_mean_distance_to_the_nearest_neighbours():
    x = np.array([[0.0], [1.0], [3.0]])
    # k = 1: nearest distances 1, 1, 2
    np.testing.assert_allclose(typicality(x, 1), [1 / (1 + 1e-5), 1 / (1 + 1e-5), 1 / (2 + 1e-5)])
    # k = 2: mean of (1, 3), (1, 2), (2, 3)
    np.testing.assert_allclose(typicality(x, 2), [1 / (2 + 1e-5), 1 / (1.5 + 1e-5), 1 / (2.5 + 1e-5)])


def test_typiclust_takes_the_centre_of_the_largest_cluster_first_then_of_the_next():
    big, small = _blob([0.0, 0.0], 1.0, 6), _blob([20.0, 0.0], 1.0, 4)
    x = np.concatenate([small, big])  # the big blob's centre is index 4
    order = typiclust_order(x, np.zeros((0, 2)), budget=2)
    assert order[:2] == [4, 0]
    assert sorted(order) == list(range(10))


def test_typiclust_visits_the_cluster_without_labels_first():
    big, small = _blob([0.0, 0.0], 1.0, 6), _blob([20.0, 0.0], 1.0, 4)
    x = np.concatenate([big, small])
    labelled = np.array([[0.5, 0.5]])  # covers the big blob
    assert typiclust_order(x, labelled, budget=1)[0] == 6  # the small blob's centre


def test_typiclust_drops_singleton_outliers_to_the_end():
    x = np.concatenate([_blob([0.0, 0.0], 1.0, 5), [[100.0, 100.0]]])
    order = typiclust_order(x, np.zeros((0, 2)), budget=2)
    assert order[0] == 0 and order[-1] == 5


def test_clasp_slots_keep_the_reference_quota_in_every_prefix():
    slots = clasp_slots(40, 4, np.random.default_rng(0))
    for b in range(1, 41):
        prefix = slots[:b]
        assert sum(s > 0 for s in prefix) == int(b * 0.66)
        counts = [prefix.count(c) for c in (1, 2, 3)]
        assert max(counts) - min(counts) <= 1  # round-robin over the classes
    assert slots[:4] == [0, slots[1], 0, slots[3]] and slots[1] != slots[3]


def test_clasp_pe_without_noise_takes_each_class_and_the_overall_entropy_in_turn():
    # columns: overall H, H*p_1, H*p_2; volume 0 best overall, 1 best for class 1, 2 best for class 2
    scores = np.array(
        [
            [0.9, 0.01, 0.01],
            [0.2, 0.50, 0.02],
            [0.3, 0.02, 0.40],
            [0.5, 0.03, 0.03],
            [0.1, 0.04, 0.05],
        ]
    )
    order = clasp_pe_order(scores, seed=0, beta=1e9)  # β → ∞: no noise
    slots = clasp_slots(5, 3, np.random.default_rng(0))
    assert slots[0] == 0 and order[0] == 0
    expected_second = 1 if slots[1] == 1 else 2
    assert order[1] == expected_second
    assert order[2] == 3  # an overall slot: the best remaining overall entropy
    assert sorted(order) == list(range(5))


def test_clasp_pe_noise_is_seeded_and_shrinks_with_beta():
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.01, 1.0, (30, 4))
    assert clasp_pe_order(scores, seed=1) == clasp_pe_order(scores, seed=1)
    assert clasp_pe_order(scores, seed=1) != clasp_pe_order(scores, seed=2)
    assert clasp_beta(0, 5) == 1.0 and clasp_beta(4, 5) == pytest.approx(100.0)
    assert clasp_beta(2, 5) == pytest.approx(10.0)


def test_class_entropy_of_a_known_probability_map():
    p = torch.zeros(3, 2, 1, 1)
    p[:, 0, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # certain background: H = 0
    p[:, 1, 0, 0] = torch.tensor([0.0, 0.5, 0.5])  # H = log 2 / log 3
    h = np.log(2) / np.log(3)
    np.testing.assert_allclose(class_entropy_from_probabilities(p), [h / 2, h * 0.5 / 2, h * 0.5 / 2], rtol=1e-6)


def _pool(n=6):
    rng = np.random.default_rng(0)
    summaries = [FeatureSummary({"stage:0": (rng.normal(size=4), np.ones(4))}) for _ in range(n)]
    zeros = np.zeros(n)
    return Pool(summaries, zeros, zeros, zeros, np.ones(n), class_entropy=rng.uniform(0.01, 1, (n, 3)))


@pytest.mark.parametrize("strategy", ["typiclust", "clasp-pe"])
def test_new_strategies_order_the_whole_pool_through_select(strategy):
    assert strategy in STRATEGIES
    selection = select(_pool(), strategy, seed=0, budget=2)
    assert sorted(selection.order) == list(range(6))
    assert selection.score[selection.order[0]] == 1.0


def test_clasp_pe_without_its_scores_says_how_to_get_them():
    pool = _pool()
    pool.class_entropy = None
    with pytest.raises(ValueError, match="--strategy clasp-pe"):
        select(pool, "clasp-pe")
