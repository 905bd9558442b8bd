"""Low-budget query baselines the field now compares against: TypiClust and ClaSP PE, on whole volumes.

Both return the whole pool in query order (the first ``budget`` are the query), like every strategy of
:mod:`ASFDALib.query.selection`, which dispatches to them.

* **TypiClust** (Hacohen, Dekel & Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High
  and Low Budgets", ICML 2022; reference code github.com/avihu111/TypiClust,
  ``deep-al/pycls/al/typiclust.py``): k-means of the embedding of labelled + unlabelled items into
  ``|labelled| + budget`` clusters; clusters are visited by fewest labelled members first, then largest
  first; from each the most *typical* unlabelled member is taken, typicality being the inverse mean
  Euclidean distance to its k nearest neighbours in the cluster (k = min(20, members // 2)).
* **ClaSP PE** (class-stratified, scheduled power predictive entropy; Lüth et al., the nnActive follow-up,
  openreview.net/forum?id=UamXueEaYW; reference code github.com/MIC-DKFZ/nnActive,
  ``nnactive/strategies/entropy_balanced.py``, strategy ``class_power_pe66_exp``): per-class scores
  H(x)·p_c(x) next to the class-agnostic H(x); each score is "power noised", log s + Gumbel(0, 1/β),
  with β scheduled exponentially from 1 to 100 over the query rounds; 66 % of the query is split evenly
  over the foreground classes (the remainder to classes in a shuffled order), the rest taken by the
  noised class-agnostic entropy.

Where a volume (not a patch) is the unit of labelling we changed, and say so:
TypiClust drops clusters of fewer than ``min_cluster_size`` members (the reference drops those of
≤ 5 images from a pool of tens of thousands; a pool here has tens of volumes, so only singletons go,
and if every cluster is a singleton none is dropped); a cluster whose unlabelled members are all taken
is skipped instead of failing. ClaSP PE aggregates the voxel scores by the mean over the volume (the
reference takes the mean over patch windows and queries patches), and lays its quota out as one
round-robin sequence whose every prefix of length b has the reference's quota for a query of size b
(int(0.66 b) class slots), so one ranking serves every budget.
"""

from __future__ import annotations

import numpy as np

TYPICLUST_KNN = 20
MAX_CLUSTERS = 500
CLASP_FOREGROUND_RATIO = 0.66
CLASP_BETA_RANGE = (1.0, 100.0)


def kmeans(features: np.ndarray, k: int, seed: int = 0, restarts: int = 10, iterations: int = 100) -> np.ndarray:
    """Cluster labels of Lloyd's k-means with k-means++ seeding, the best of ``restarts`` (fixed RNG)."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(n, int), np.inf
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
            total = d2.sum()
            centres.append(x[rng.choice(n, p=d2 / total)] if total > 0 else x[rng.integers(n)])
        c = np.asarray(centres)
        labels = np.full(n, -1)
        for _ in range(iterations):
            new = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
            if np.array_equal(new, labels):
                break
            labels = new
            c = np.stack([x[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
        inertia = float(((x - c[labels]) ** 2).sum())
        if inertia < best_inertia - 1e-12:
            best, best_inertia = labels, inertia
    return best


def typicality(features: np.ndarray, neighbours: int) -> np.ndarray:
    """1 / (mean Euclidean distance to the ``neighbours`` nearest others + 1e-5), as TypiClust defines it."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        return np.ones(len(x))
    k = max(1, min(neighbours, len(x) - 1))
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(d, np.inf)
    return 1.0 / (np.sort(d, axis=1)[:, :k].mean(axis=1) + 1e-5)


def typiclust_order(
    embeddings: np.ndarray,
    labelled: np.ndarray,
    budget: int,
    seed: int = 0,
    min_cluster_size: int = 2,
    knn: int = TYPICLUST_KNN,
) -> list[int]:
    """TypiClust's query order over the unlabelled ``embeddings`` (indices into them).

    ``labelled`` (m, d) are the embeddings of volumes labelled already: they take part in the clustering
    and make their clusters "covered". The first ``budget`` entries are TypiClust's query; the order
    then keeps cycling through the clusters, and members of dropped clusters come last, most typical first.
    """
    unl = np.asarray(embeddings, dtype=np.float64)
    n = len(unl)
    if n == 0:
        return []
    lab = np.asarray(labelled, dtype=np.float64).reshape(-1, unl.shape[1]) if len(labelled) else unl[:0]
    features = np.concatenate([lab, unl])
    m = len(lab)
    clusters = kmeans(features, min(m + max(1, budget), MAX_CLUSTERS, len(features)), seed)
    ids, sizes = np.unique(clusters, return_counts=True)
    covered = np.bincount(clusters[:m], minlength=ids.max() + 1)[ids] if m else np.zeros(len(ids), int)
    keep = sizes >= min_cluster_size
    if not keep.any():
        keep[:] = True
    visit = [int(ids[j]) for j in sorted(np.flatnonzero(keep), key=lambda j: (covered[j], -sizes[j], ids[j]))]
    cluster_of = clusters[m:]
    taken = np.zeros(n, bool)
    order: list[int] = []
    while True:
        progressed = False
        for cluster in visit:
            members = np.flatnonzero((cluster_of == cluster) & ~taken)
            if members.size == 0:
                continue
            typical = typicality(unl[members], min(knn, members.size // 2))
            pick = int(members[int(np.argmax(typical))])
            order.append(pick)
            taken[pick] = True
            progressed = True
        if not progressed:
            break
    rest = np.flatnonzero(~taken)
    if rest.size:
        typical = typicality(unl[rest], min(knn, rest.size // 2))
        order += [int(rest[j]) for j in np.argsort(-typical, kind="stable")]
    return order


def clasp_beta(round_index: int = 0, rounds: int = 1) -> float:
    """β of ClaSP PE's exponential noise schedule: 1 at the first query round, 100 at the last."""
    low, high = CLASP_BETA_RANGE
    if rounds <= 1:
        return low
    return float(low * (high / low) ** (min(max(round_index, 0), rounds - 1) / (rounds - 1)))


def power_noise(scores: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    """log(score) + Gumbel(0, 1/β) (nnActive's power noising; a zero score stays last, at log 1e-12)."""
    noise = rng.gumbel(0.0, 1.0 / beta, np.shape(scores))
    return np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12)) + noise


def clasp_slots(n: int, classes: int, rng: np.random.Generator) -> list[int]:
    """Column of the score matrix that fills each query slot: 0 = class-agnostic, c ≥ 1 = class c.

    Slot b (1-based) is a class slot when int(0.66 b) grows at b, so every prefix of length b has the
    reference's int(0.66 b) class slots; class slots go round-robin over the classes in a shuffled order.
    """
    order = [int(c) for c in rng.permutation(np.arange(1, classes))] if classes > 1 else []
    slots, used = [], 0
    for b in range(1, n + 1):
        if order and int(b * CLASP_FOREGROUND_RATIO) > int((b - 1) * CLASP_FOREGROUND_RATIO):
            slots.append(order[used % len(order)])
            used += 1
        else:
            slots.append(0)
    return slots


def clasp_pe_order(scores: np.ndarray, seed: int = 0, beta: float = 1.0) -> list[int]:
    """ClaSP PE's query order of a pool with ``scores`` (n, C): column 0 the class-agnostic predictive
    entropy, column c ≥ 1 the mean of H·p_c. Each slot takes the untaken volume with the highest noised
    score of its column."""
    s = np.asarray(scores, dtype=np.float64)
    n, classes = s.shape
    rng = np.random.default_rng(seed)
    slots = clasp_slots(n, classes, rng)
    noised = power_noise(s, beta, rng)
    taken = np.zeros(n, bool)
    order: list[int] = []
    for column in slots:
        k = int(np.argmax(np.where(taken, -np.inf, noised[:, column])))
        order.append(k)
        taken[k] = True
    return order
