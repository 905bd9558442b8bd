"""Pseudo-labels that would teach more than where the round's start agrees: variants measured on validation.

The ``rounds`` gate labels only the voxels where the stage-1 model and the round's start agree, so on the CT
shift its pseudo-labels rehearse what the start did well, as the handover blend does. Two variants that would
teach beyond that, each run as ``benchmarks/blend_sweep.py`` runs the SSFT row (every option of it is taken):

- ``fill-flips``: inside the kept volumes, the voxels where the two models disagree are labelled too where the
  stage-1 model agrees with itself under flips along each axis (self-training where the labels moved it);
- ``blended-teacher``: the pseudo-labels are made by the stage-1 model blended with ``--teacher-share`` of the
  start (the model a round would hand over), judged by the same gate.

    python benchmarks/pseudo_variants.py --variant fill-flips --scenario ct-shift \\
        --model Resources/BenchmarkModels/ct_source_batch.pt --iterations 400 --lr 1e-3 \\
        --lower-rate-for encoder --budget 4 --seeds 0 1 --shares 0 0.1 0.2 --out bench-fill4-bn

Recorded in benchmarks/results/ablation_ssft_beyond_agreement.json and docs/method.md; neither is an option of
the product (neither beat today's recipe on validation).
"""

from __future__ import annotations

import argparse
import copy
import sys

import numpy as np
import torch

import ASFDALib.adaptation.pseudo as pseudo
import ASFDALib.bench.benchmark as benchmark
from ASFDALib.adaptation.blend import blend_state


def fill_flips(agree):
    """``agreement_pseudo_labels`` with the disagreeing voxels of the kept volumes labelled where the stage-1
    model's flipped views all agree."""

    def filled(network, card, pool, keep_fraction, min_agreement, reference=None, device="auto", scored=None):
        names, scores, labels = agree(network, card, pool, keep_fraction, min_agreement, reference, device, scored)
        if reference is None:
            return names, scores, labels
        images = dict(pool)
        for name in names:
            views = pseudo.flipped_views(network, images[name], card, device)
            consistent = np.all([v == views[0] for v in views[1:]], axis=0)
            fill = (labels[name] == pseudo.IGNORE_INDEX) & consistent
            labels[name][fill] = views[0][fill]
        return names, scores, labels

    return filled


def blended_teacher(select, share: float):
    """``selective_pseudo_labels`` run by the stage-1 model blended with ``share`` of the round's start."""

    def blended(network: torch.nn.Module, *args, **kwargs):
        reference = args[8] if len(args) > 8 else kwargs.get("reference")
        teacher = copy.deepcopy(network)
        if reference is not None:
            teacher.load_state_dict(blend_state(network.state_dict(), reference.state_dict(), share))
        return select(teacher.eval(), *args, **kwargs)

    return blended


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--variant", choices=("fill-flips", "blended-teacher"), required=True)
    parser.add_argument("--teacher-share", type=float, default=0.2)
    args, rest = parser.parse_known_args()
    if args.variant == "fill-flips":
        pseudo.agreement_pseudo_labels = fill_flips(pseudo.agreement_pseudo_labels)
    else:
        benchmark.selective_pseudo_labels = blended_teacher(benchmark.selective_pseudo_labels, args.teacher_share)
    import blend_sweep

    sys.argv = [sys.argv[0], *rest]
    blend_sweep.main()


if __name__ == "__main__":
    main()
