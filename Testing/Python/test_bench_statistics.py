"""The benchmark's statistics on numbers whose answers are known: paired differences, the bootstrap
interval, per-group means and the summary.json entries."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ASFDALib.bench.benchmark import Run, markdown
from ASFDALib.bench.statistics import bootstrap_ci, case_mean, group_means, paired_differences, summarise


def test_a_constant_difference_has_a_zero_width_interval():
    assert bootstrap_ci([3.0, 3.0, 3.0, 3.0]) == [3.0, 3.0]


def test_two_seeds_give_no_interval():
    # resampled means of (0, 10) take only the values 0, 5 and 10: the "interval" would be the two seeds' range
    assert bootstrap_ci([0.0, 10.0]) is None


def test_the_interval_matches_the_exact_bootstrap_distribution_of_three_seeds():
    values = np.array([1.0, 4.0, 10.0])
    # all 27 equally likely resamples; the exact quantile q is the smallest mean whose CDF reaches q
    exact = np.sort([np.mean(values[list(i)]) for i in itertools.product(range(3), repeat=3)])
    cdf = np.arange(1, 28) / 27

    def quantile(q):
        return exact[np.argmax(cdf >= q)]

    assert quantile(0.025) == 1.0 and quantile(0.975) == 10.0  # each extreme has probability 1/27 > 2.5%
    assert bootstrap_ci(values) == pytest.approx([quantile(0.025), quantile(0.975)])
    # and at 80%: the 10th and 90th percentiles of the exact distribution
    low, high = bootstrap_ci(values, level=0.8)
    assert low == pytest.approx(quantile(0.1), abs=0.2) and high == pytest.approx(quantile(0.9), abs=0.2)


def test_the_interval_is_reproducible_and_needs_three_values():
    assert bootstrap_ci([1.0, 2.0, 5.0]) == bootstrap_ci([1.0, 2.0, 5.0])
    assert bootstrap_ci([4.0]) is None
    assert bootstrap_ci([4.0, 5.0, math.nan]) is None


def test_a_five_point_gain_over_five_seeds_excludes_zero():
    # training noise of +-2 points around a 5-point effect: the interval must not reach 0
    low, high = bootstrap_ci([5.0 + e for e in (-2.0, 1.5, 0.5, -1.0, 2.0)])
    assert 0 < low < 5.2 < high


def test_paired_differences_use_only_shared_seeds():
    assert paired_differences({0: 50.0, 1: 60.0, 2: 70.0}, {1: 55.0, 2: 72.0, 3: 10.0}) == {1: 5.0, 2: -2.0}


def test_case_mean_ignores_absent_classes():
    assert case_mean([0.5, math.nan, 0.7]) == pytest.approx(0.6)
    assert math.isnan(case_mean([math.nan, math.nan]))


def test_group_means_by_site():
    groups = {"a1": "A", "a2": "A", "b1": "B"}
    assert group_means({"a1": 80.0, "a2": 60.0, "b1": 30.0, "x": 5.0}, groups) == {"A": 70.0, "B": 30.0}


def _runs():
    cases = lambda a, b: {"a1": [a, a], "b1": [b, b]}  # noqa: E731
    return [
        Run("source", 0, 0, [0.3, 0.5], cases=cases(0.5, 0.3)),
        Run("random", 2, 0, [0.5, 0.5], cases=cases(0.6, 0.4)),
        Run("random", 2, 1, [0.6, 0.6], cases=cases(0.7, 0.5)),
        Run("asfda", 2, 0, [0.6, 0.6], cases=cases(0.7, 0.5)),
        Run("asfda", 2, 1, [0.8, 0.8], cases=cases(0.9, 0.7)),
        Run("full", 0, 0, [0.9, 0.9], cases=cases(0.9, 0.9)),
    ]


def test_summary_entries_in_percent_with_the_paired_difference():
    summary = summarise(_runs(), ["source", "random", "asfda", "full"], [2], {"site": {"a1": "A", "b1": "B"}})
    by_row = {s["row"]: s for s in summary}
    asfda = by_row["asfda"]
    assert asfda["budget"] == 2 and asfda["seeds"] == [0, 1]
    assert asfda["mean_dice"] == pytest.approx(70.0)
    assert asfda["sd_dice"] == pytest.approx(np.std([60.0, 80.0], ddof=1))
    assert asfda["per_class"] == pytest.approx([70.0, 70.0])
    assert asfda["diff_vs_random"]["mean"] == pytest.approx(15.0)  # seed 0: +10, seed 1: +20
    assert asfda["diff_vs_random"]["per_seed"] == pytest.approx([10.0, 20.0])
    assert asfda["diff_vs_random"]["ci95"] is None  # two seeds: no interval
    assert asfda["per_group"]["site"]["A"]["mean"] == pytest.approx(80.0)
    assert asfda["per_group"]["site"]["B"]["mean"] == pytest.approx(60.0)
    assert by_row["random"]["diff_vs_random"] is None
    assert by_row["source"]["budget"] == 0 and by_row["source"]["mean_dice"] == pytest.approx(40.0)
    assert by_row["full"]["diff_vs_random"] is None
    assert set(asfda) >= {"row", "budget", "seeds", "mean_dice", "sd_dice", "per_class", "diff_vs_random"}


def test_a_row_with_a_control_gets_the_paired_difference_to_it():
    runs = _runs() + [Run("ssft", 2, 0, [0.7, 0.7]), Run("ssft", 2, 1, [0.7, 0.7])]
    summary = summarise(runs, ["random", "asfda", "ssft"], [2], controls={"ssft": "asfda"})
    by_row = {s["row"]: s for s in summary}
    control = by_row["ssft"]["diff_vs_control"]
    assert control["row"] == "asfda"
    assert control["per_seed"] == pytest.approx([10.0, -10.0]) and control["mean"] == pytest.approx(0.0)
    assert "diff_vs_control" not in by_row["asfda"]


def test_the_method_is_paired_against_every_other_query_row_that_ran():
    runs = _runs() + [Run("coreset", 2, 0, [0.7, 0.7]), Run("coreset", 2, 1, [0.7, 0.7])]
    summary = summarise(
        runs, ["random", "coreset", "asfda"], [2], challenger="asfda", rivals=["random", "coreset", "entropy"]
    )
    by_row = {s["row"]: s for s in summary}
    versus = by_row["asfda"]["diff_vs_queries"]
    assert set(versus) == {"random", "coreset"}  # entropy did not run: nothing to pair with
    assert versus["random"]["per_seed"] == pytest.approx([10.0, 20.0])
    assert versus["coreset"]["per_seed"] == pytest.approx([-10.0, 10.0]) and versus["coreset"]["mean"] == 0.0
    assert "diff_vs_queries" not in by_row["coreset"]


def test_the_table_lists_the_method_against_each_query_closest_rival_first():
    runs = _runs() + [Run("coreset", 2, 0, [0.7, 0.7]), Run("coreset", 2, 1, [0.7, 0.7])]
    summary = summarise(runs, ["random", "coreset", "asfda"], [2], challenger="asfda", rivals=["random", "coreset"])
    text = markdown(summary, ["background", "liver", "kidney"])
    assert (
        "- budget 2: Core-set +0.0 [2 seeds: no interval below 3]; random +15.0 [2 seeds: no interval below 3]" in text
    )


def test_a_table_without_a_random_row_has_no_empty_difference_column_and_says_why():
    runs = [Run("asfda", 2, 0, [0.6, 0.8]), Run("asfda", 2, 1, [0.7, 0.9])]
    text = markdown(summarise(runs, ["asfda"], [2]), ["background", "liver", "kidney"])
    assert text.splitlines()[0] == "| method | budget | seeds | liver | kidney | mean Dice |"
    assert text.splitlines()[2] == "| ASFDA (DKD + ASD) | 2 | 2 | 65.0 | 85.0 | **75.0 ± 7.1** |"
    assert "No random row ran, so no difference to random (add `random` to --rows for one)." in text
    # random beside the upper bound alone: it ran, there is just nothing to pair with it
    runs = [Run("random", 2, 0, [0.6, 0.8]), Run("full", 0, 0, [0.8, 0.9])]
    text = markdown(summarise(runs, ["random", "full"], [2]), ["background", "liver", "kidney"])
    assert "No query row ran beside random, so no difference to random." in text
    assert "No random row ran" not in text
