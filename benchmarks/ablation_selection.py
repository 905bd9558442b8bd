"""Which query variant to ship: ASFDA's selection under different source knowledge and alpha, against
random and entropy, with the benchmark's data, recipe and test set (a smaller grid than the protocol).

    python benchmarks/ablation_selection.py [--budgets 2 4] [--seeds 0 1] [--out bench-ablation]

Runs are appended to ``OUT/ablation.json`` as they finish (an interrupted ablation resumes); the
table is printed at the end. Sites of the picked volumes are listed so that a reader can see why.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ASFDALib.atomic import atomic_write_json
from ASFDALib.benchmark import BenchmarkConfig, evaluate, load_cases, train, write_data
from ASFDALib.defaults import default_model_path
from ASFDALib.models import load_model
from ASFDALib.ranking import RankConfig, rank_folder

VARIANTS = {
    "random": {"strategy": "random"},
    "entropy": {"strategy": "entropy"},
    "asfda bn a=0.5 (method)": {"strategy": "asfda", "knowledge": "bn", "alpha": 0.5},
    "asfda stats a=0.5": {"strategy": "asfda", "knowledge": "stats", "alpha": 0.5},
    "asfda stats a=0.75": {"strategy": "asfda", "knowledge": "stats", "alpha": 0.75},
    "asfda bn a=0.75": {"strategy": "asfda", "knowledge": "bn", "alpha": 0.75},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("bench-ablation"))
    args = parser.parse_args()
    config = BenchmarkConfig()
    model_path = default_model_path()
    model = load_model(model_path)
    data = write_data(args.out / "data", config)
    sites = {c["name"]: c["site"] for c in json.loads((data / "pool" / "cases.json").read_text())["cases"]}
    pool, test = load_cases(data / "pool", model.card), load_cases(data / "test", model.card)
    path = args.out / "ablation.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    done = {(r["variant"], r["budget"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for budget in args.budgets:
            for name, options in VARIANTS.items():
                if (name, budget, seed) in done:
                    continue
                start = time.perf_counter()
                rank_config = RankConfig(budget=budget, seed=seed, device=config.device, **options)
                ranking = rank_folder(data / "pool" / "images", model, args.out / "cache", rank_config)
                query = [r.file for r in ranking.rows if r.status == "scored"][:budget]
                labelled = [c for c in pool if c.name in query]
                network = train(
                    model_path, model.card, labelled, pool, config.iterations, seed, "cpu", False, args.out / "work"
                )
                dice = evaluate(model, network, test, "cpu")
                runs.append(
                    {
                        "variant": name,
                        "budget": budget,
                        "seed": seed,
                        "dice": dice,
                        "sites": "".join(sites[q] for q in query),
                        "seconds": time.perf_counter() - start,
                    }
                )
                atomic_write_json(path, {"iterations": config.iterations, "runs": runs})
                print(f"{name:26s} budget {budget} seed {seed}: {100 * np.nanmean(dice):.1f} ({runs[-1]['sites']})")
    print("\n| variant | " + " | ".join(f"budget {b}" for b in args.budgets) + " |")
    print("|---|" + "---|" * len(args.budgets))
    for name in VARIANTS:
        cells = []
        for b in args.budgets:
            values = [100 * np.nanmean(r["dice"]) for r in runs if r["variant"] == name and r["budget"] == b]
            cells.append(f"{np.mean(values):.1f} ± {np.std(values):.1f} (n={len(values)})" if values else "")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
