"""How much of the starting weights the handed-over model should keep: a sweep on the validation split.

Trains the ASFDA query's SSFT row (today's recipe, handed over unblended) once per seed, then scores the model
``(1 - share) * tuned + share * start`` at each ``--shares`` on the validation split, mean Dice and per site
(adaptation/blend.py; share 1 is the source model). ``--control`` trains the labels-only control instead (a
decaying stage 2 on the labels alone), to tell the blend's share of a gain from the pseudo-labels'. Choices are
made here, never on the test split.

    python benchmarks/blend_sweep.py --scenario ct-shift \\
        --model Resources/BenchmarkModels/ct_source_dynunet_instance.pt --iterations 400 --lr 1e-3 \\
        --seeds 0 1 --out bench-blend-in

Results are appended to ``OUT/sweep.json`` as each seed finishes (an interrupted sweep resumes), and a table
per seed is printed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from ablation import METHOD

from ASFDALib.adaptation.blend import blend_state
from ASFDALib.adaptation.recipe import AUGMENTS, LOWER_RATE_FOR, MIXES, TEACHERS
from ASFDALib.atomic import atomic_write_json
from ASFDALib.bench.benchmark import (
    BenchmarkConfig,
    SSFTOptions,
    _class_means,
    _rates,
    case_groups,
    evaluate_cases,
    load_cases,
    train,
    write_data,
)
from ASFDALib.bench.statistics import case_mean, group_means
from ASFDALib.models.loading import ModelSource
from ASFDALib.query.ranking import RankConfig, rank_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="ct-shift")
    parser.add_argument("--model", type=Path, required=True, help="source model")
    parser.add_argument("--validation", type=int, default=12, help="validation volumes")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--lr", type=float, help="the recipe's learning rate (default: asfda finetune's)")
    parser.add_argument("--lower-rate-for", choices=LOWER_RATE_FOR, help="(default: the recipe's)")
    parser.add_argument("--budget", type=int, default=2, help="labels of the ASFDA query")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0])
    parser.add_argument("--control", action="store_true", help="the labels-only control instead of the SSFT row")
    parser.add_argument("--pseudo-teacher", choices=TEACHERS, help="who labels the pseudo-labelled patches")
    parser.add_argument("--pseudo-augment", choices=AUGMENTS, help="their augmentation (default: the recipe's)")
    parser.add_argument("--pseudo-mix", choices=MIXES, help="their mix with labelled patches (default: the recipe's)")
    parser.add_argument(
        "--extra-fraction",
        type=float,
        default=SSFTOptions.extra_fraction,
        help="stage 2's length as a fraction of --iterations (default: the benchmark's); the control's alike",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-blend"))
    args = parser.parse_args()
    config = BenchmarkConfig(
        scenario=args.scenario,
        iterations=args.iterations,
        lr=args.lr,
        lower_rate_for=args.lower_rate_for,
        validation=args.validation,
    )
    source = ModelSource(args.model)
    model = source.load()
    data = write_data(args.out / "data", config)
    pool, val = load_cases(data / "pool", model.card), load_cases(data / "validation", model.card)
    site_of = case_groups([data / "validation"]).get("site", {})
    ranking = rank_folder(data / "pool" / "images", model, args.out / "cache", RankConfig(budget=args.budget, **METHOD))
    query = [r.file for r in ranking.rows if r.status == "scored"][: args.budget]
    start = {k: v.detach().clone() for k, v in model.network.state_dict().items()}
    path = args.out / "sweep.json"
    stored = json.loads(path.read_text()) if path.is_file() else {"query": query, "runs": {}}
    row = "ssft-control" if args.control else "asfda+ssft"
    for seed in args.seeds:
        # the mix as resolved, not as asked: runs stored before copy-paste became the default are unmixed and
        # keyed without it, and must not pass for today's default
        mix = sweep_options(args).pseudo_mix
        asked = {"teacher": args.pseudo_teacher, "augment": args.pseudo_augment, "mix": mix if mix != "none" else None}
        if args.extra_fraction != SSFTOptions.extra_fraction:  # keyed only when not the benchmark's stage 2
            asked["stage 2 x"] = f"{args.extra_fraction:g}"
        key = " ".join([row, *(f"{k} {v}" for k, v in asked.items() if v), f"seed {seed}"])
        if key not in stored["runs"]:
            network, kept, judged, _ = train(
                source,
                [c for c in pool if c.name in query],
                pool,
                args.iterations,
                seed,
                "cpu",
                sweep_options(args),
                args.out / "work",
                rates=_rates(config),
                pseudo_labels=not args.control,
                stage1_cache=args.out / "stage1",
            )
            tuned = {k: v.detach().clone() for k, v in network.state_dict().items()}
            fresh = model.load_report.new if model.load_report else []
            shares = {}
            for share in args.shares:
                network.load_state_dict(blend_state(tuned, start, share, fresh) if share < 1 else start)
                per_case = evaluate_cases(model, network.eval(), val, "cpu")
                sites = group_means({n: 100 * case_mean(d) for n, d in per_case.items()}, site_of)
                shares[f"{share:g}"] = {"dice": 100 * float(np.nanmean(_class_means(per_case))), "sites": sites}
            stored["runs"][key] = {"pseudo_labelled": kept, "pseudo_gate": judged, "shares": shares}
            atomic_write_json(path, stored)
        print(f"{key} (gate: {stored['runs'][key]['pseudo_gate'] or 'none'})")
        for share, result in stored["runs"][key]["shares"].items():
            sites = ", ".join(f"{s} {v:.1f}" for s, v in result["sites"].items())
            print(f"  start's share {share:>4}: {result['dice']:5.1f}  ({sites})")


def sweep_options(args: argparse.Namespace) -> SSFTOptions:
    """Today's SSFT recipe with the stage-2 choices asked for, handed over unblended: the sweep blends."""
    asked = {"teacher": args.pseudo_teacher, "pseudo_augment": args.pseudo_augment, "pseudo_mix": args.pseudo_mix}
    chosen = {k: v for k, v in asked.items() if v is not None}
    return replace(SSFTOptions(), blend_start=0.0, extra_fraction=args.extra_fraction, **chosen)


if __name__ == "__main__":
    main()
