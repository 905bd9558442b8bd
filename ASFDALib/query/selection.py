"""Query strategies: ASFDA's greedy DKD + ASD batch selection and the baselines behind one interface.

Every strategy returns a :class:`Selection`: the whole pool in query order (the first ``budget`` are
the query), with the per-volume quantities that explain the order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ASFDALib.query import scoring
from ASFDALib.query.config import DEFAULT_FUSION, FUSIONS, STRATEGIES
from ASFDALib.query.features import BN_PREFIX, LOGITS, STAGE_PREFIX, FeatureSummary

KNOWLEDGE = ("bn", "stats", "prototype", "energy")
LAYER_CHOICES = ("auto", "bn", "stages", "logits", "all")
DUPLICATE_EPS = 1e-9


@dataclass
class Pool:
    """What the strategies know about each candidate volume (index i everywhere)."""

    summaries: list[FeatureSummary]
    asd: np.ndarray
    entropy: np.ndarray
    energy: np.ndarray
    fg_ml: np.ndarray
    epistemic: np.ndarray | None = None
    labelled: list[FeatureSummary] = field(default_factory=list)
    # ClaSP PE's scores, (n, C): column 0 the class-agnostic mean entropy, column c the mean of H * p_c
    # (ASFDALib.query.class_entropy); only computed when that strategy is asked for.
    class_entropy: np.ndarray | None = None
    # PrototypeAlignment gaps (ASFDALib.query.features), when the knowledge is "prototype".
    prototype: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.summaries)


@dataclass
class Knowledge:
    """Where the source knowledge K_s comes from: BatchNorm statistics, a statistics file, the head's class
    prototypes, energy, or ``none`` (a new head and no statistics: DKD is its diversity term alone)."""

    kind: str
    reference: FeatureSummary | None = None
    note: str = ""  # why this kind, when it is a fallback
    head: str = ""  # the pointwise output layer whose weight rows are the prototypes ("prototype")

    def describe(self) -> str:
        text = {
            "bn": "the source model's BatchNorm running statistics (in its weights), in every round",
            "stats": "source-statistics file",
            "prototype": "the pre-trained head's class prototypes (feature alignment with its weight rows)",
            "energy": "free-energy fallback (no feature statistics available)",
            "none": "none: no feature statistics, and a new head's free energy measures nothing the model learnt, "
            "so DKD is its diversity term alone (the first pick is the pool's most typical volume); a "
            "source-statistics file (asfda stats) gives DKD its knowledge gap",
        }[self.kind]
        return f"{text}; {self.note}" if self.note else text


@dataclass
class Selection:
    order: list[int]
    score: np.ndarray
    dkd: np.ndarray
    s_src: np.ndarray
    s_div: np.ndarray
    d_src: np.ndarray


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def divergence_layers(pool: Pool, knowledge: Knowledge, choice: str = "auto") -> list[str]:
    """Layers over which SKL is averaged.

    ``auto``: those K_s describes (BatchNorm inputs for ``bn``), or every tapped layer for energy;
    ``bn``, ``stages``, ``logits``: only that kind of tap; ``all``: every tap the summaries share.
    """
    if choice not in LAYER_CHOICES:
        raise ValueError(f"unknown feature layers {choice!r}; choose from {', '.join(LAYER_CHOICES)}")
    everything = pool.summaries + pool.labelled
    if choice != "auto":
        shared = scoring.common_layers(everything)
        prefix = {"bn": BN_PREFIX, "stages": STAGE_PREFIX, "logits": LOGITS, "all": ""}[choice]
        return [n for n in shared if n.startswith(prefix)] or shared
    if knowledge.reference is not None:
        layers = scoring.common_layers(everything, knowledge.reference)
        if knowledge.kind == "bn":
            layers = [n for n in layers if n.startswith(BN_PREFIX)]
        if layers:
            return layers
    return scoring.common_layers(everything)


def _from_zero(values: np.ndarray | None, n: int) -> np.ndarray:
    """Per-volume gaps shifted so the pool's smallest is 0 (unknown values count as 0)."""
    values = np.full(n, np.nan) if values is None else np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    return np.where(finite, values - (values[finite].min() if finite.any() else 0.0), 0.0)


def knowledge_gap(pool: Pool, knowledge: Knowledge, layers: list[str]) -> np.ndarray:
    """d_src: SKL to K_s over those of ``layers`` it describes (all it describes if none); the prototype
    misalignment; or the free energy (fallback) — the last two shifted to start at zero."""
    if knowledge.kind == "prototype":
        return _from_zero(pool.prototype, len(pool))
    if knowledge.reference is not None and knowledge.kind != "energy":
        described = [n for n in layers if n in knowledge.reference.layers]
        layers = described or [n for n in divergence_layers(pool, knowledge) if n in knowledge.reference.layers]
    if knowledge.kind == "energy" or knowledge.reference is None or not layers:
        return _from_zero(pool.energy, len(pool))
    return scoring.skl_to_reference(pool.summaries, knowledge.reference, layers)


def greedy_dkd_asd(
    d_src: np.ndarray | None,
    pair: np.ndarray,
    d_labelled: np.ndarray,
    asd: np.ndarray,
    alpha: float,
    dynamic: bool = True,
    diversity: bool = True,
    fusion: str = DEFAULT_FUSION,
) -> Selection:
    """Greedy batch selection: pick the best score, add it to S, recompute diversity and temperatures.

    ``fusion`` combines the terms: ``"sum"`` (the paper) ranks α·pct(DKD) + (1 − α)·pct(ASD), where the
    diversity s_div sits inside DKD only, so a near-duplicate of a pick can come back on its ASD alone;
    ``"gated"`` scores s_div · (α·pct(s_src) + (1 − α)·pct(ASD)): a volume close to one already picked
    or labelled is held back whichever term favours it (docs/method.md "How DKD and ASD are combined");
    ``"gap-first"`` is gated, except that a first pick with nothing labelled goes by DKD alone (for α > 0):
    with nothing yet to be diverse from, the query is anchored where the pre-trained model knows least, and
    ASD joins from the second pick (in a later round, with labels to be diverse from, it is gated throughout).

    A candidate at zero divergence from a picked or labelled volume (a duplicate) adds nothing and is
    only picked once every other candidate is. ``d_src=None`` (no source knowledge) sets s_src = 1: DKD is
    s_div alone, and a first pick with nothing picked or labelled goes to the most typical volume (smallest
    mean divergence to the rest of the pool) rather than to whichever file comes first.

    The ablations: ``dynamic=False`` fixes each temperature at its value over the whole pool before the
    first pick; ``diversity=False`` sets s_div = 1 (DKD is then the knowledge gap alone, and only exact
    duplicates are held back).
    """
    n = len(asd)
    remaining = list(range(n))
    d_min = d_labelled.astype(np.float64).copy()
    have_reference = bool(np.isfinite(d_min).any())
    known = d_src is not None
    d_src = np.asarray(d_src, dtype=np.float64) if known else np.zeros(n)
    out = Selection([], _nan(n), _nan(n), _nan(n), _nan(n), d_src if known else _nan(n))
    typical = 1.0 - scoring.percentile_rank(pair.mean(axis=1)) if n > 1 else np.ones(n)
    if not dynamic:  # the ablation's static temperatures, over the whole pool before the first pick
        tau_src = scoring.dynamic_temperature(d_src)
        off_diagonal = pair[~np.eye(n, dtype=bool)]
        tau_div = scoring.dynamic_temperature(off_diagonal) if off_diagonal.size else 1.0
    while remaining:
        r = np.asarray(remaining)
        if known:
            s_src = scoring.temperature_score(d_src[r], scoring.dynamic_temperature(d_src[r]) if dynamic else tau_src)
        else:
            s_src = np.ones(len(r))
        if have_reference:
            d_div = d_min[r]
            tau = scoring.dynamic_temperature(d_div) if dynamic else tau_div
            s_div = scoring.temperature_score(d_div, tau) if diversity else np.ones(len(r))
            duplicate = d_div <= DUPLICATE_EPS
        elif known:
            s_div = np.ones(len(r))
            duplicate = np.zeros(len(r), bool)
        else:  # nothing to be diverse from and no gap: start from the most typical volume
            s_div = typical[r]
            duplicate = np.zeros(len(r), bool)
        dkd = s_src * s_div
        if fusion == "gap-first" and not have_reference and alpha > 0:  # alpha 0 asks for ASD alone
            score = dkd
        elif fusion in ("gated", "gap-first"):
            score = s_div * (alpha * scoring.percentile_rank(s_src) + (1 - alpha) * scoring.percentile_rank(asd[r]))
        else:
            score = alpha * scoring.percentile_rank(dkd) + (1 - alpha) * scoring.percentile_rank(asd[r])
        eligible = np.where(duplicate & ~duplicate.all(), -np.inf, score)
        k = int(np.argmax(eligible))
        pick = int(r[k])
        out.order.append(pick)
        out.score[pick], out.dkd[pick], out.s_src[pick], out.s_div[pick] = score[k], dkd[k], s_src[k], s_div[k]
        if not known:  # no knowledge gap was measured, and a typicality pick had nothing to be diverse from
            out.s_src[pick] = np.nan
            if not have_reference:
                out.s_div[pick] = np.nan
        d_min = np.minimum(d_min, pair[pick])
        have_reference = True
        remaining.remove(pick)
    return out


def k_center_greedy(embeddings: np.ndarray, labelled: np.ndarray) -> list[int]:
    """Core-set: repeatedly take the volume farthest from every chosen and labelled one."""
    n = len(embeddings)
    if labelled.size:
        dist = np.min(np.linalg.norm(embeddings[:, None] - labelled[None], axis=2), axis=1)
    else:
        dist = np.linalg.norm(embeddings - embeddings.mean(axis=0), axis=1)
    order: list[int] = []
    chosen = np.zeros(n, bool)
    for _ in range(n):
        k = int(np.argmax(np.where(chosen, -np.inf, dist)))
        order.append(k)
        chosen[k] = True
        dist = np.minimum(dist, np.linalg.norm(embeddings - embeddings[k], axis=1))
    return order


def _by_value(values: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")]


def select(
    pool: Pool,
    strategy: str = "asfda",
    knowledge: Knowledge | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    layers: str = "auto",
    dynamic: bool = True,
    diversity: bool = True,
    budget: int | None = None,
    fusion: str = DEFAULT_FUSION,
) -> Selection:
    """Order the pool by ``strategy``; ASFDA-family strategies also report DKD and its parts.

    ``layers``, ``dynamic``, ``diversity`` and ``fusion`` are the method's ablation switches (see
    :func:`divergence_layers` and :func:`greedy_dkd_asd`); the defaults are the method. ``budget`` is
    read only by TypiClust, whose clusters number |labelled| + budget (default: the whole pool).
    """
    n = len(pool)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
    if strategy in ("asfda", "dkd", "asd"):
        knowledge = knowledge or Knowledge("energy")
        chosen = divergence_layers(pool, knowledge, layers)
        everything = pool.summaries + pool.labelled
        full = scoring.pairwise_skl(everything, chosen) if chosen else np.zeros((len(everything),) * 2)
        pair = full[:n, :n]
        d_lab = full[:n, n:].min(axis=1) if pool.labelled else np.full(n, np.inf)
        weight = {"asfda": alpha, "dkd": 1.0, "asd": 0.0}[strategy]
        d_src = None if knowledge.kind == "none" else knowledge_gap(pool, knowledge, chosen)
        # DKD only and ASD only are one term each, ordered as the method defines that term; the fusion is how
        # the asfda strategy combines the two
        combine = fusion if strategy == "asfda" else "sum"
        return greedy_dkd_asd(d_src, pair, d_lab, np.asarray(pool.asd), weight, dynamic, diversity, combine)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        order = [int(i) for i in rng.permutation(n)]
    elif strategy == "fg-random":
        has_fg = np.flatnonzero(np.asarray(pool.fg_ml) > 0)
        empty = np.flatnonzero(np.asarray(pool.fg_ml) <= 0)
        order = [int(i) for i in np.concatenate([rng.permutation(has_fg), rng.permutation(empty)])]
    elif strategy == "entropy":
        order = _by_value(np.asarray(pool.entropy))
    elif strategy == "epistemic":
        if pool.epistemic is None:
            raise ValueError("the epistemic strategy needs MC-dropout scores (run it with --strategy epistemic)")
        order = _by_value(np.asarray(pool.epistemic))
    elif strategy == "typiclust":
        from ASFDALib.query.baselines import typiclust_order

        embeddings = np.stack([s.embedding() for s in pool.summaries])
        labelled = np.stack([s.embedding() for s in pool.labelled]) if pool.labelled else np.zeros((0, 1))
        order = typiclust_order(embeddings, labelled, n if budget is None else budget, seed)
    elif strategy == "clasp-pe":
        from ASFDALib.query.baselines import clasp_pe_order

        if pool.class_entropy is None:
            raise ValueError("the clasp-pe strategy needs class-wise entropy scores (run it with --strategy clasp-pe)")
        order = clasp_pe_order(np.asarray(pool.class_entropy), seed)
    else:
        embeddings = np.stack([s.embedding() for s in pool.summaries])
        labelled = np.stack([s.embedding() for s in pool.labelled]) if pool.labelled else np.zeros((0, 1))
        order = k_center_greedy(embeddings, labelled)
    score = _nan(n)
    score[order] = 1.0 - np.arange(n) / max(n, 1)
    return Selection(order, score, _nan(n), _nan(n), _nan(n), _nan(n))
