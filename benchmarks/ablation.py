"""Why ASFDA falls short on the benchmark, knob by knob: alpha, temperature, diversity, feature layers
(the query) and the pseudo-label gates (selective fine-tuning), one at a time from the method's defaults.

    python benchmarks/ablation.py [--seeds 0 1] [--budgets 2 4 8] [--out bench-ablation]

Choices are made on a **validation set** (20 more volumes from the same three sites, another data
seed), never on the protocol's test set. Training is deterministic for a given query and seed, so a
variant that picks the same volumes as another reuses its run. Trainings are appended to
``OUT/ablation.json`` as they finish (an interrupted ablation resumes); the tables are printed at the end
and written to ``OUT/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from _common import emit

from ASFDALib.atomic import atomic_write_json, atomic_write_text
from ASFDALib.bench.benchmark import BenchmarkConfig, SSFTOptions, evaluate, load_cases, train, write_data
from ASFDALib.bench.phantoms import write_pool
from ASFDALib.models.defaults import default_model_path
from ASFDALib.models.loading import load_model
from ASFDALib.query.ranking import RankConfig, rank_folder

METHOD = {"strategy": "asfda"}
QUERY_VARIANTS = {
    "random": {"strategy": "random"},
    "ASD only (alpha 0)": {"strategy": "asd"},
    "ASFDA, the method (alpha 0.5)": METHOD,
    "alpha 0.25": {**METHOD, "alpha": 0.25},
    "alpha 0.75": {**METHOD, "alpha": 0.75},
    "static temperature": {**METHOD, "dynamic_temperature": False},
    "no diversity": {**METHOD, "diversity": False},
    "layers: encoder stages": {**METHOD, "layers": "stages"},
    "layers: all taps": {**METHOD, "layers": "all"},
    "layers: logits": {**METHOD, "layers": "logits"},
    "source-statistics file": {**METHOD, "knowledge": "stats"},
}
HALVES = SSFTOptions(stage1_fraction=0.5, extra_fraction=0.0)
SSFT_VARIANTS = {  # (fine-tuning options, iterations as a multiple of the protocol's)
    "stage 1 only (no pseudo-labels)": (None, 1.0),
    "SSFT in halves of one budget (the first protocol)": (HALVES, 1.0),
    "stage 1 for 3/4 of the budget": (replace(HALVES, stage1_fraction=0.75), 1.0),
    "halves, keep 25% of the pool": (replace(HALVES, keep_fraction=0.25), 1.0),
    "halves, keep 100% (no volume gate)": (replace(HALVES, keep_fraction=1.0), 1.0),
    "halves, voxel gate 0.8": (replace(HALVES, confidence=0.8), 1.0),
    "halves, voxel gate 0.97": (replace(HALVES, confidence=0.97), 1.0),
    "full stage 1, then 1/2 more with pseudo-labels (now the default)": (SSFTOptions(), 1.0),
    "control: labels only for 1.5x the iterations": (None, 1.5),
}
SSFT_BUDGET = 4


def _key(query: list[str], seed: int, ssft: SSFTOptions | None, iterations: int) -> str:
    return json.dumps([sorted(query), seed, asdict(ssft) if ssft else None, iterations])


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("bench-ablation"))
    parser.add_argument("--json", type=Path, help="also write the summary here (e.g. benchmarks/results/ablation.json)")
    args = parser.parse_args()
    start = time.perf_counter()
    config = BenchmarkConfig()
    model_path = default_model_path()
    model = load_model(model_path)
    data = write_data(args.out / "data", config)
    if not (data / "val" / "cases.json").is_file():
        write_pool(data / "val", config.test, seed=config.data_seed + 2, prefix="val")
    site = {c["name"]: c["site"] for c in json.loads((data / "pool" / "cases.json").read_text())["cases"]}
    pool, val = load_cases(data / "pool", model.card), load_cases(data / "val", model.card)
    path = args.out / "ablation.json"
    trainings: dict[str, dict] = json.loads(path.read_text())["trainings"] if path.is_file() else {}

    def dice_of(query: list[str], seed: int, ssft: SSFTOptions | None, scale: float = 1.0) -> float:
        iterations = round(config.iterations * scale)
        key = _key(query, seed, ssft, iterations)
        if key not in trainings:
            t0 = time.perf_counter()
            labelled = [c for c in pool if c.name in query]
            work = args.out / "work"
            network = train(model_path, model.card, labelled, pool, iterations, seed, "cpu", ssft, work)
            trainings[key] = {"dice": evaluate(model, network, val, "cpu"), "seconds": time.perf_counter() - t0}
            atomic_write_json(path, {"iterations": config.iterations, "trainings": trainings})
        return 100 * float(np.nanmean(trainings[key]["dice"]))

    def query_of(options: dict, budget: int, seed: int) -> list[str]:
        rank = RankConfig(budget=budget, seed=seed, device=config.device, **options)
        ranking = rank_folder(data / "pool" / "images", model, args.out / "cache", rank)
        return [r.file for r in ranking.rows if r.status == "scored"][:budget]

    query_rows = []
    for name, options in QUERY_VARIANTS.items():
        for budget in args.budgets:
            for seed in args.seeds:
                query = query_of(options, budget, seed)
                dice = dice_of(query, seed, None)
                sites = "".join(sorted(site[q] for q in query))
                query_rows.append({"variant": name, "budget": budget, "seed": seed, "sites": sites, "dice": dice})
                print(f"{name:34s} budget {budget} seed {seed}: {dice:5.1f} (sites {sites})", flush=True)
    ssft_rows = []
    method_query = query_of(METHOD, SSFT_BUDGET, 0)
    for name, (ssft, scale) in SSFT_VARIANTS.items():
        for seed in args.seeds:
            dice = dice_of(method_query, seed, ssft, scale)
            ssft_rows.append({"variant": name, "seed": seed, "dice": dice})
            print(f"{name:34s} seed {seed}: {dice:5.1f}", flush=True)

    lines = [
        f"Validation Dice (%), mean ± sd over training seeds {args.seeds}; {config.iterations} iterations per run.",
        "",
        "| query variant | " + " | ".join(f"budget {b}: Dice (sites)" for b in args.budgets) + " |",
        "|---|" + "---|" * len(args.budgets),
    ]
    for name in QUERY_VARIANTS:
        cells = []
        for b in args.budgets:
            rows = [r for r in query_rows if r["variant"] == name and r["budget"] == b]
            picks = sorted({r["sites"] for r in rows})
            cells.append(f"{_cell([r['dice'] for r in rows])} ({', '.join(picks)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"| fine-tuning variant (ASFDA query, budget {SSFT_BUDGET}) | Dice |", "|---|---|"]
    for name in SSFT_VARIANTS:
        lines.append(f"| {name} | {_cell([r['dice'] for r in ssft_rows if r['variant'] == name])} |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "ablation.md", table)
    print("\n" + table)
    report = {
        "command": f"python benchmarks/ablation.py --seeds {args.seeds} --budgets {args.budgets}",
        "iterations": config.iterations,
        "seeds": args.seeds,
        "evaluated_on": "validation set (20 volumes, data seed 1002), not the protocol's test set",
        "query": query_rows,
        "ssft": ssft_rows,
        "trainings": len(trainings),
        "training_seconds_total": sum(t["seconds"] for t in trainings.values()),
        "seconds_this_invocation": time.perf_counter() - start,
        "table": table,
    }
    if args.json:
        emit(report, args.json)


if __name__ == "__main__":
    main()
