"""Query strategies: greedy DKD+ASD selection and the baselines."""

from __future__ import annotations

import numpy as np
import pytest

from ASFDALib.query import scoring
from ASFDALib.query.features import FeatureSummary
from ASFDALib.query.selection import STRATEGIES, Knowledge, Pool, greedy_dkd_asd, select


def _summary(mean: float, var: float = 1.0, channels: int = 4) -> FeatureSummary:
    return FeatureSummary({"bn:x": (np.full(channels, mean), np.full(channels, var))})


def _pool(means, asd=None, **kwargs) -> Pool:
    n = len(means)
    return Pool(
        summaries=[_summary(m) for m in means],
        asd=np.asarray(asd if asd is not None else np.linspace(0.1, 0.2, n)),
        entropy=np.linspace(0.3, 0.1, n),
        energy=np.linspace(-2, -1, n),
        fg_ml=np.array([0.0] + [10.0] * (n - 1)),
        **kwargs,
    )


SOURCE = Knowledge("bn", _summary(0.0))


def test_greedy_diversity_never_picks_a_duplicate_volume_twice():
    # volumes 0 and 1 are identical and farthest from the source; 2-4 differ from them
    pool = _pool([3.0, 3.0, 1.0, 1.5, 2.0], asd=[0.9, 0.9, 0.1, 0.1, 0.1])
    selection = select(pool, "asfda", SOURCE, alpha=0.5)
    first_four = selection.order[:4]
    assert not {0, 1} <= set(first_four)
    assert sorted(selection.order) == list(range(5))


def test_first_pick_has_no_diversity_penalty():
    selection = select(_pool([1.0, 2.0, 3.0]), "dkd", SOURCE)
    assert selection.s_div[selection.order[0]] == 1.0
    assert selection.order[0] == 2  # the largest knowledge gap


def test_alpha_zero_orders_by_asd():
    pool = _pool([1.0, 2.0, 3.0, 4.0], asd=[0.4, 0.1, 0.3, 0.2])
    assert select(pool, "asfda", SOURCE, alpha=0.0).order == [0, 2, 3, 1]
    assert select(pool, "asd", SOURCE).order == [0, 2, 3, 1]


def test_labelled_volumes_count_in_diversity():
    labelled = [_summary(3.0)]
    pool = _pool([3.0, 2.0, 1.0], labelled=labelled)
    selection = select(pool, "dkd", SOURCE)
    assert selection.order[0] != 0  # identical to an already-labelled volume
    assert selection.order[-1] == 0


def test_without_diversity_dkd_is_the_knowledge_gap_alone():
    # 0 and 1 are near-twins far from the source: diversity puts 2 between them, its absence does not
    pool = _pool([3.0, 2.9, 1.0])
    assert select(pool, "dkd", SOURCE).order == [0, 2, 1]
    plain = select(pool, "dkd", SOURCE, diversity=False)
    assert plain.order == [0, 1, 2]
    assert np.all(plain.s_div == 1.0)


def test_static_temperature_is_fixed_before_the_first_pick():
    pool = _pool([1.0, 2.0, 3.0, 4.0])
    static = select(pool, "dkd", SOURCE, dynamic=False)
    d_src = static.d_src
    tau = np.median(d_src)
    first = static.order[0]
    assert static.s_src[first] == pytest.approx(1 - np.exp(-d_src[first] / tau))
    second = static.order[1]
    assert static.s_src[second] == pytest.approx(1 - np.exp(-d_src[second] / tau))
    dynamic = select(pool, "dkd", SOURCE)
    rest = np.delete(d_src, first)
    assert dynamic.s_src[second] == pytest.approx(1 - np.exp(-d_src[second] / np.median(rest)))


def test_feature_layer_choice_picks_the_taps_that_measure_divergence():
    def summary(bn: float, stage: float) -> FeatureSummary:
        return FeatureSummary({"bn:x": (np.full(2, bn), np.ones(2)), "stage:y": (np.full(2, stage), np.ones(2))})

    # the BatchNorm taps see volume 1 as new, the encoder stages see volume 2 as new
    pool = Pool([summary(0, 0), summary(5, 0), summary(0, 5)], np.zeros(3), np.zeros(3), np.zeros(3), np.ones(3))
    by_layers = {layers: select(pool, "dkd", Knowledge("energy"), layers=layers) for layers in ("bn", "stages")}
    assert by_layers["bn"].order[:2] == [0, 1]
    assert by_layers["stages"].order[:2] == [0, 2]
    with pytest.raises(ValueError, match="feature layers"):
        select(pool, "dkd", Knowledge("energy"), layers="decoder")


def test_energy_fallback_ranks_the_highest_energy_first():
    pool = _pool([0.0, 0.0, 0.0])
    pool.summaries = [_summary(m) for m in (0.0, 1.0, 2.0)]
    pool.energy = np.array([-5.0, -1.0, -3.0])
    selection = select(pool, "dkd", Knowledge("energy"))
    assert selection.order[0] == 1


def test_random_is_seeded():
    pool = _pool(np.arange(10.0))
    assert select(pool, "random", seed=1).order == select(pool, "random", seed=1).order
    assert select(pool, "random", seed=1).order != select(pool, "random", seed=2).order


def test_foreground_random_puts_empty_predictions_last():
    pool = _pool(np.arange(6.0))
    assert select(pool, "fg-random", seed=0).order[-1] == 0


def test_entropy_orders_by_whole_volume_entropy():
    assert select(_pool(np.arange(4.0)), "entropy").order == [0, 1, 2, 3]


def test_epistemic_needs_scores():
    pool = _pool(np.arange(3.0))
    with pytest.raises(ValueError, match="MC-dropout"):
        select(pool, "epistemic")
    pool.epistemic = np.array([0.1, 0.5, 0.3])
    assert select(pool, "epistemic").order == [1, 2, 0]


def test_coreset_spreads_over_the_embedding_space():
    pool = _pool([0.0, 0.01, 5.0])
    pool.summaries = [
        FeatureSummary({"stage:a": (np.array(v), np.ones(2))}) for v in ([1.0, 0.0], [0.99, 0.01], [0.0, 1.0])
    ]
    order = select(pool, "coreset").order
    assert {order[0], order[1]} in ({0, 2}, {1, 2})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_a_permutation(strategy):
    pool = _pool(np.arange(5.0))
    pool.epistemic = np.arange(5.0)
    pool.class_entropy = np.tile(np.arange(1.0, 6.0)[:, None], (1, 3))  # ClaSP PE's per-class scores
    order = select(pool, strategy, SOURCE).order
    assert sorted(order) == list(range(5))


def test_bad_alpha_and_strategy_are_refused():
    with pytest.raises(ValueError, match="alpha"):
        select(_pool([1.0, 2.0]), "asfda", SOURCE, alpha=1.5)
    with pytest.raises(ValueError, match="unknown strategy"):
        select(_pool([1.0, 2.0]), "magic")


def _two_clusters():
    """Volumes 0-2 nearly identical (SKL 0.05), farthest from the source and most uncertain; 3 and 4 apart."""
    d_src = np.array([1.0, 0.95, 0.9, 0.6, 0.3])
    asd = np.array([0.9, 0.85, 0.8, 0.5, 0.1])
    pair = np.full((5, 5), 1.0)
    pair[:3, :3] = 0.05
    pair[3, 4] = pair[4, 3] = 0.3
    np.fill_diagonal(pair, 0.0)
    return d_src, pair, np.full(5, np.inf), asd


def test_summed_fusion_lets_a_near_duplicate_back_in_on_its_asd():
    selection = greedy_dkd_asd(*_two_clusters(), alpha=0.5, fusion="sum")
    assert selection.order[:2] == [0, 1]  # 1 is 0's near-twin: s_div 0.09, but the top ASD rank


def test_gated_fusion_holds_back_near_duplicates_whichever_term_favours_them():
    selection = greedy_dkd_asd(*_two_clusters(), alpha=0.5, fusion="gated")
    assert selection.order[:2] == [0, 3]
    # second pick: tau = median of d_div over {1, 2, 3, 4} = (0.05 + 1.0) / 2; volume 3 ranks 1 of 0..3
    # on both s_src and ASD, so its relevance is 1/3
    s_div = 1.0 - np.exp(-1.0 / 0.525)
    assert selection.s_div[3] == pytest.approx(s_div)
    assert selection.score[3] == pytest.approx(s_div * (0.5 / 3 + 0.5 / 3))


def test_summed_and_gated_fusions_make_the_same_first_pick_and_an_unknown_one_is_refused():
    pool = _pool([1.0, 2.0, 3.0], asd=[0.3, 0.1, 0.2])
    first = {fusion: select(pool, "asfda", SOURCE, fusion=fusion).order[0] for fusion in ("sum", "gated")}
    assert first["sum"] == first["gated"]
    with pytest.raises(ValueError, match="unknown fusion 'product'"):
        select(pool, "asfda", SOURCE, fusion="product")


def test_gap_first_fusion_makes_the_first_pick_by_dkd_alone_then_gates():
    # gated starts at 0 (top on both terms); make 3 the largest knowledge gap with the lowest ASD
    d_src, pair, d_labelled, asd = _two_clusters()
    d_src = np.array([1.0, 0.95, 0.9, 1.2, 0.3])
    gated = greedy_dkd_asd(d_src, pair, d_labelled, asd, alpha=0.5, fusion="gated")
    selection = greedy_dkd_asd(d_src, pair, d_labelled, asd, alpha=0.5, fusion="gap-first")
    assert gated.order[0] == 0 and selection.order[0] == 3
    # the first pick's score is its DKD: s_div = 1 with nothing to be diverse from
    assert selection.s_div[3] == 1.0 and selection.score[3] == pytest.approx(selection.dkd[3])
    # from the second pick on, the gated score: s_div * (a pct(s_src) + (1 - a) pct(ASD)) over {0, 1, 2, 4};
    # 0 is top on both terms and, at SKL 1.0 from 3, as diverse as any
    r = np.array([0, 1, 2, 4])
    s_src = scoring.temperature_score(d_src[r], scoring.dynamic_temperature(d_src[r]))
    s_div = scoring.temperature_score(pair[3, r], scoring.dynamic_temperature(pair[3, r]))
    gated_second = s_div * (0.5 * scoring.percentile_rank(s_src) + 0.5 * scoring.percentile_rank(asd[r]))
    assert selection.order[:2] == [3, 0] and selection.score[0] == pytest.approx(gated_second[0])


def test_gap_first_fusion_is_gated_throughout_once_volumes_are_labelled():
    d_src, pair, _, asd = _two_clusters()
    d_labelled = np.array([0.5, 0.5, 0.5, 0.2, 0.9])
    for_gap = greedy_dkd_asd(d_src, pair, d_labelled, asd, alpha=0.5, fusion="gap-first")
    assert for_gap.order == greedy_dkd_asd(d_src, pair, d_labelled, asd, alpha=0.5, fusion="gated").order


def test_dkd_only_and_asd_only_keep_their_own_order_whatever_the_fusion():
    pool = _pool([3.0, 2.9, 1.0], asd=[0.2, 0.3, 0.1])
    for strategy in ("dkd", "asd"):
        assert (
            select(pool, strategy, SOURCE, fusion="gated").order == select(pool, strategy, SOURCE, fusion="sum").order
        )


def test_without_source_knowledge_dkd_is_diversity_alone_from_the_most_typical_volume():
    # 0 is an outlier; 1-3 sit together with 2 at their centre; nothing is labelled
    pair = np.array(
        [
            [0.0, 2.0, 2.0, 2.0],
            [2.0, 0.0, 0.1, 0.2],
            [2.0, 0.1, 0.0, 0.1],
            [2.0, 0.2, 0.1, 0.0],
        ]
    )
    selection = greedy_dkd_asd(None, pair, np.full(4, np.inf), np.zeros(4), alpha=1.0)
    assert selection.order[:2] == [2, 0]  # the most typical volume, then the farthest from it
    # nothing measured is reported as measured: no gap, and no diversity for the typicality pick
    assert np.all(np.isnan(selection.s_src)) and np.all(np.isnan(selection.d_src))
    assert np.isnan(selection.s_div[2]) and selection.s_div[0] > 0


def test_no_knowledge_is_said_so():
    assert "DKD is its diversity term alone" in Knowledge("none").describe()
