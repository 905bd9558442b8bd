"""Selective pseudo-labels: a volume gate (reliability) and a voxel gate, as the method says.

``confidence`` (the method's): r(u) = (1 - ASD(u)) * exp(-d_min(u, L) / tau), confident and close to what
was labelled; inside a kept volume, voxels whose highest probability is below ``confidence`` get the ignore
index, so they teach nothing rather than teaching background.

``flips`` and ``rounds`` do not rest on the model's confidence, which a model trained on two volumes
overstates: a volume's reliability is how well two views of it agree (class-balanced Dice), and only the
voxels where every view agrees are labelled. ``flips`` compares the prediction with those of the volume
flipped along each axis; ``rounds`` with the prediction of the model the round started from (the source
model in round 1). Either way the top ``keep_fraction`` of the pool is kept, and none below ``min_agreement``.

A gate that keeps no volume hands over to its ``fallback``: a source model that segments nothing on a new
modality cannot vouch for any volume, so ``rounds`` then asks the flipped views instead (the default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ASFDALib.adaptation.loss import IGNORE_INDEX
from ASFDALib.adaptation.recipe import FALLBACKS, RELIABILITY
from ASFDALib.query import scoring
from ASFDALib.query.features import FeatureSummary

Scored = Callable[[int, int], None]  # told (volumes judged, volumes in the pool) as a gate goes


@dataclass
class PseudoLabels:
    """What a gate made: the kept names (most reliable first), every candidate's reliability by the gate
    that judged, the kept volumes' labels, and which gate judged (``asked``'s fallback when it kept none)."""

    kept: list[str]
    reliability: dict[str, float]
    labels: dict[str, np.ndarray]
    gate: str
    asked: str = ""  # the gate asked for, when its fallback judged instead
    asked_best: float = 0.0  # the best reliability the asked gate found, below its floor


def reliability(asd: np.ndarray, d_min: np.ndarray) -> np.ndarray:
    """r = (1 - ASD) * exp(-d_min / tau), tau = median d_min over the unlabeled pool."""
    tau = scoring.dynamic_temperature(d_min)
    return (1.0 - np.asarray(asd, dtype=np.float64)) * np.exp(-np.asarray(d_min, dtype=np.float64) / tau)


def distance_to_labelled(unlabelled: list[FeatureSummary], labelled: list[FeatureSummary]) -> np.ndarray:
    """d_min(u, L): the smallest SKL from each unlabeled volume to any labelled one."""
    everything = unlabelled + labelled
    layers = scoring.common_layers(everything)
    full = scoring.pairwise_skl(everything, layers)
    return full[: len(unlabelled), len(unlabelled) :].min(axis=1)


def keep_reliable(scores: np.ndarray, keep_fraction: float) -> list[int]:
    """Indices of the top ``keep_fraction`` (at least one), most reliable first."""
    count = max(1, int(round(len(scores) * keep_fraction))) if len(scores) else 0
    return [int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:count]]


def pseudo_label(probs: torch.Tensor | np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Argmax of (C, ...) probabilities; voxels below ``confidence`` become IGNORE_INDEX."""
    probs = torch.as_tensor(probs)
    best, label = probs.max(dim=0)
    out = label.to(torch.uint8)
    out[best < confidence] = IGNORE_INDEX
    return out.numpy()


def class_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """Mean Dice over the foreground classes either label map holds.

    0.0 when neither holds one: two views that both find no organ are no evidence of a right label (scored
    1.0, such a volume would pass the gate with an all-background label).
    """
    classes = [int(c) for c in np.union1d(np.unique(first), np.unique(second)) if c > 0 and c != IGNORE_INDEX]
    if not classes:
        return 0.0
    dice = [2.0 * np.sum((first == c) & (second == c)) / (np.sum(first == c) + np.sum(second == c)) for c in classes]
    return float(np.mean(dice))


def agreed_label(views: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """The first view where every view agrees (IGNORE_INDEX elsewhere), and its least agreement with another."""
    first = views[0]
    label = first.astype(np.uint8)
    for other in views[1:]:
        label[other != first] = IGNORE_INDEX
    return label, min(class_agreement(first, other) for other in views[1:])


def flipped_views(network: torch.nn.Module, image: np.ndarray, card, device: str = "auto") -> list[np.ndarray]:
    """Label maps of a (C, X, Y, Z) image as it is and flipped along each spatial axis (each flipped back)."""
    from ASFDALib.inference.predict import predict_label

    views = [predict_label(network, image, card, device)]
    for axis in range(3):
        flipped = np.ascontiguousarray(np.flip(image, axis + 1))
        views.append(np.ascontiguousarray(np.flip(predict_label(network, flipped, card, device), axis)))
    return views


def agreement_pseudo_labels(
    network: torch.nn.Module,
    card,
    pool: list[tuple[str, np.ndarray]],
    keep_fraction: float,
    min_agreement: float,
    reference: torch.nn.Module | None = None,
    device: str = "auto",
    scored: Scored | None = None,
) -> tuple[list[str], dict[str, float], dict[str, np.ndarray]]:
    """Pseudo-labels where two views agree: the flipped volume's (``reference`` None) or ``reference``'s.
    ``scored(done, total)`` hears each volume judged."""
    from ASFDALib.inference.predict import predict_label

    agreed = {}
    for done, (name, image) in enumerate(pool, 1):
        if reference is None:
            views = flipped_views(network, image, card, device)
        else:
            views = [predict_label(network, image, card, device), predict_label(reference, image, card, device)]
        agreed[name] = agreed_label(views)
        if scored:
            scored(done, len(pool))
    scores = np.array([agreed[name][1] for name, _ in pool])
    # no agreement at all (no organ in either view, included) never passes, whatever the floor
    kept = [i for i in keep_reliable(scores, keep_fraction) if scores[i] >= min_agreement and scores[i] > 0]
    names = [pool[i][0] for i in kept]
    return names, {name: float(s) for (name, _), s in zip(pool, scores)}, {n: agreed[n][0] for n in names}


def selective_pseudo_labels(
    network: torch.nn.Module,
    card,
    labelled_images: list[np.ndarray],
    pool: list[tuple[str, np.ndarray]],
    keep_fraction: float = 0.5,
    confidence: float = 0.9,
    device: str = "auto",
    gate: str = "confidence",
    min_agreement: float = 0.5,
    reference: torch.nn.Module | None = None,
    fallback: str = "none",
    progress: Callable[[str, int, int], None] | None = None,
) -> PseudoLabels:
    """Score ``pool`` (name, model-space image) with the current model, keep the reliable part and label it.

    The pseudo-labels are uint8, IGNORE_INDEX where the model is not confident, or where the views disagree.
    ``gate`` is one of RELIABILITY; ``rounds`` needs ``reference``, the model the round started from. Where
    it keeps no volume, ``fallback`` (a gate, or "none") judges the pool instead. ``progress(gate, done,
    total)`` hears each volume a gate has judged.
    """
    if gate not in RELIABILITY or fallback not in FALLBACKS:
        raise ValueError(f"unknown pseudo-label gate {gate!r} or fallback {fallback!r}: {RELIABILITY}, {FALLBACKS}")
    if (gate == "rounds") != (reference is not None):
        raise ValueError("the 'rounds' gate, and only it, takes the reference model")

    def judge(name: str, against: torch.nn.Module | None) -> PseudoLabels:
        scored = (lambda done, total: progress(name, done, total)) if progress else None
        return _judge(
            network,
            card,
            labelled_images,
            pool,
            keep_fraction,
            confidence,
            device,
            name,
            min_agreement,
            against,
            scored,
        )

    first = judge(gate, reference)
    if first.kept or not pool or fallback in ("none", gate):
        return first
    then = judge(fallback, None)
    then.asked, then.asked_best = gate, max(first.reliability.values())
    return then


def _judge(
    network: torch.nn.Module,
    card,
    labelled_images: list[np.ndarray],
    pool: list[tuple[str, np.ndarray]],
    keep_fraction: float,
    confidence: float,
    device: str,
    gate: str,
    min_agreement: float,
    reference: torch.nn.Module | None = None,
    scored: Scored | None = None,
) -> PseudoLabels:
    """One gate's judgement of the pool (``selective_pseudo_labels`` without the fallback)."""
    from ASFDALib.inference.predict import predict_probabilities
    from ASFDALib.inference.sweep import SweepConfig, sweep

    if not pool:
        return PseudoLabels([], {}, {}, gate)
    if gate != "confidence":
        kept, scores, labels = agreement_pseudo_labels(
            network, card, pool, keep_fraction, min_agreement, reference, device, scored
        )
        return PseudoLabels(kept, scores, labels, gate)
    sweep_config = SweepConfig(device=device)
    results = []
    for done, (_, image) in enumerate(pool, 1):
        results.append(sweep(network, torch.as_tensor(image), card, sweep_config))
        if scored:
            scored(done, len(pool))
    labelled = [sweep(network, torch.as_tensor(image), card, sweep_config).summary for image in labelled_images]
    scores = reliability(
        np.array([r.asd for r in results]), distance_to_labelled([r.summary for r in results], labelled)
    )
    kept = keep_reliable(scores, keep_fraction)
    labels = {
        pool[i][0]: pseudo_label(predict_probabilities(network, pool[i][1], card, device), confidence) for i in kept
    }
    return PseudoLabels(
        [pool[i][0] for i in kept], {name: float(s) for (name, _), s in zip(pool, scores)}, labels, gate
    )
