"""The benchmark's statistics: per-row summaries, paired differences to random with a bootstrap interval,
and Dice per site and subgroup.

**Paired difference to random.** For a row at a budget and each training seed s that both it and random
have, d_s = Dice(row, s) − Dice(random, s): the same seed means the same patch order and augmentation
draws, the same test set means the same cases, so what is left of d_s is the effect of the query (plus
the interaction of query and training noise). A deterministic query (entropy, Core-set, ASFDA) is the
same on every seed, so its sd over seeds is training noise only and is not comparable with random's;
d_s is.

**Interval.** A percentile bootstrap over seeds: draw the n paired differences with replacement
``resamples`` times (10 000) from a generator seeded with ``seed`` (0), take the mean of each draw, and
report the 2.5th and 97.5th percentiles of those means (numpy's linear interpolation). With fewer than
three seeds the interval is ``None``: one seed has no spread, and two give resampled means of only three
values, an "interval" that is just the two seeds' range. With few seeds a percentile
bootstrap is too narrow (it cannot see beyond the seeds drawn); with 5 seeds read it as a rough guide,
with 10 or more as a usable one.

Dice is in percent everywhere here; a class absent from both prediction and reference (NaN) is left
out of that case's mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MIN_INTERVAL_VALUES = 3


def case_mean(per_class: Sequence[float]) -> float:
    """Mean over the foreground classes of one case (or run), NaN classes left out; NaN if all are."""
    values = np.asarray(per_class, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[float] | None:
    """Percentile-bootstrap interval of the mean of ``values`` (see the module docstring); None below 3 values."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
    if x.size < MIN_INTERVAL_VALUES:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.percentile(means, [100 * tail, 100 * (1 - tail)])
    return [float(low), float(high)]


def paired_differences(row: Mapping[int, float], reference: Mapping[int, float]) -> dict[int, float]:
    """d_s = row[s] − reference[s] for every seed s both have (and both finite), in seed order."""
    return {
        s: float(row[s] - reference[s])
        for s in sorted(set(row) & set(reference))
        if np.isfinite(row[s]) and np.isfinite(reference[s])
    }


def group_means(case_dice: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """Mean Dice of the cases of each group (``groups``: case name -> site or subgroup); cases without a group
    are left out."""
    buckets: dict[str, list[float]] = {}
    for name, value in case_dice.items():
        if name in groups and np.isfinite(value):
            buckets.setdefault(groups[name], []).append(value)
    return {g: float(np.mean(v)) for g, v in sorted(buckets.items())}


def _sd(values: np.ndarray) -> float:
    """Sample sd over seeds (ddof = 1); 0 for a single seed."""
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


def summarise(
    runs: Iterable,
    rows: Sequence[str],
    budgets: Sequence[int],
    groupings: Mapping[str, Mapping[str, str]] | None = None,
    reference: str = "random",
    fixed_rows: Sequence[str] = ("source", "full"),
    controls: Mapping[str, str] | None = None,
    challenger: str | None = None,
    rivals: Sequence[str] = (),
) -> list[dict]:
    """summary.json: one entry per (row, budget) that has runs, Dice in percent.

    Each entry: ``row``, ``budget``, ``seeds`` (the seeds run), ``mean_dice`` and ``sd_dice`` (over seeds of
    each run's class-mean Dice), ``per_class`` (mean over seeds), ``per_group`` ({"site": {...},
    "subgroup": {...}} when the cases carry them), ``validation_mean_dice`` (when a validation split was
    evaluated) and ``diff_vs_random``: {"mean", "ci95", "seeds", "per_seed"} paired on seeds with random at
    the same budget (None for rows without a budget, and for random itself). A row with a control in
    ``controls`` (row -> control row) also gets ``diff_vs_control``: the same paired difference to that row,
    plus ``"row"`` naming it. The ``challenger`` row (the method) also gets ``diff_vs_queries``: {rival row:
    the challenger minus that row, paired on seeds at the same budget} for every row of ``rivals`` that ran
    at that budget — the question "is the method at or above every other query?" answered by seed.
    """
    runs = list(runs)
    groupings = groupings or {}
    out: list[dict] = []
    for row in rows:
        for budget in (0,) if row in fixed_rows else budgets:
            mine = sorted((r for r in runs if r.row == row and r.budget == budget), key=lambda r: r.seed)
            if not mine:
                continue
            overall = {r.seed: 100 * case_mean(r.dice) for r in mine}
            values = np.array(list(overall.values()))
            per_class = np.array([r.dice for r in mine], dtype=np.float64) * 100
            with np.errstate(all="ignore"):
                class_means = [
                    float(np.nanmean(per_class[:, c])) if np.isfinite(per_class[:, c]).any() else math.nan
                    for c in range(per_class.shape[1])
                ]
            entry: dict = {
                "row": row,
                "budget": budget,
                "seeds": [r.seed for r in mine],
                "mean_dice": float(np.nanmean(values)),
                "sd_dice": _sd(values[np.isfinite(values)]),
                "per_class": class_means,
            }
            if groupings and all(r.cases for r in mine):
                entry["per_group"] = {
                    kind: _group_summary(mine, groups) for kind, groups in groupings.items() if groups
                }
            if all(getattr(r, "validation", None) for r in mine):
                entry["validation_mean_dice"] = float(np.nanmean([100 * case_mean(r.validation) for r in mine]))
            entry["diff_vs_random"] = None
            if row != reference and row not in fixed_rows:
                entry["diff_vs_random"] = _paired(overall, runs, reference, budget)
            control = (controls or {}).get(row)
            if control and (paired := _paired(overall, runs, control, budget)):
                entry["diff_vs_control"] = {"row": control, **paired}
            if row == challenger:
                versus = {other: _paired(overall, runs, other, budget) for other in rivals if other != row}
                entry["diff_vs_queries"] = {other: d for other, d in versus.items() if d}
            out.append(entry)
    return out


def _paired(overall: Mapping[int, float], runs: list, other: str, budget: int) -> dict | None:
    """Mean, interval and per-seed values of the paired difference of a row's seeds to row ``other``'s."""
    ref = {r.seed: 100 * case_mean(r.dice) for r in runs if r.row == other and r.budget == budget}
    diffs = paired_differences(overall, ref)
    if not diffs:
        return None
    values = list(diffs.values())
    return {"mean": float(np.mean(values)), "ci95": bootstrap_ci(values), "seeds": list(diffs), "per_seed": values}


def _group_summary(runs: list, groups: Mapping[str, str]) -> dict[str, dict]:
    """Per group: mean and sd over seeds of the group's mean case Dice (percent)."""
    per_seed = [group_means({n: 100 * case_mean(d) for n, d in r.cases.items()}, groups) for r in runs]
    names = sorted({g for seed in per_seed for g in seed})
    result = {}
    for g in names:
        v = np.array([seed[g] for seed in per_seed if g in seed])
        result[g] = {
            "mean": float(v.mean()),
            "sd": _sd(v),
            "cases": sum(1 for n in runs[0].cases if groups.get(n) == g),
        }
    return result
