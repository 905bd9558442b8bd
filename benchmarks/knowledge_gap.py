"""Which source knowledge tells how far a volume is from what the model knows? (issue 14, item 4)

    python benchmarks/knowledge_gap.py --models Resources/BenchmarkModels/ct_source_batch.pt ... [--volumes 24]
        [--source 6] [--json benchmarks/results/knowledge_gap.json]

DKD's knowledge gap d_src is meant to grow as a volume moves away from the source the model learnt from.
This measures that for every kind of source knowledge a model offers (BatchNorm statistics, the
source-statistics file, the head's class prototypes, free energy), with no training: on the CT
hospital-shift scenario's **validation** split (``--volumes`` target volumes of sites H1-H3, the benchmark's
validation seed) plus ``--source`` fresh volumes of the source distribution, one sweep per volume and model
gives d_src under each kind and the source model's own Dice (the sweep's class map is the prediction).
Per model and kind it reports

- ``spearman_error``: Spearman correlation between d_src and the source model's error (100 − mean Dice)
  over the target volumes: does the gap rank volumes by how badly the model does?
- ``auc_source``: the probability that a target volume's gap exceeds a source volume's: does the gap
  separate the source distribution from the hospitals?
- ``per_site``: mean gap and Dice per site, so a reader sees which shifts each kind sees.
- ``dkd_first``: what it does to the query: the first four DKD picks (knowledge gap × diversity, the
  method's greedy selection) among the target volumes, with each pick's site and source-model Dice.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from _common import emit

from ASFDALib.adaptation.patches import load_case
from ASFDALib.bench.scenarios import make_source_volume, write_target_split
from ASFDALib.data.volumes import write_nifti
from ASFDALib.errors import ModelError
from ASFDALib.evaluation.metrics import dice_per_class
from ASFDALib.inference.sweep import SweepConfig, sweep
from ASFDALib.models.loading import load_model
from ASFDALib.query import scoring
from ASFDALib.query.ranking import choose_knowledge, pool_from_results
from ASFDALib.query.selection import Knowledge, divergence_layers, knowledge_gap, select

VALIDATION_SEED = 1002  # the benchmark's validation split (BenchmarkConfig.data_seed + 2)


def write_data(folder: Path, volumes: int, source: int) -> list[dict]:
    """The validation split of the CT scenario and ``source`` source-distribution volumes, with labels."""
    if not (folder / "cases.json").is_file():
        write_target_split(folder, volumes, seed=VALIDATION_SEED, prefix="validation")
    cases = json.loads((folder / "cases.json").read_text())["cases"]
    for i in range(source):
        name = f"source_{i:03d}.nii.gz"
        if not (folder / "images" / name).is_file():
            image, label, affine = make_source_volume(900_000 + i)
            write_nifti(folder / "images" / name, np.round(image).astype(np.int16), affine)
            write_nifti(folder / "labels" / name, label, affine)
        cases.append({"name": name, "site": "source", "subgroup": "none"})
    return cases


def kinds_offered(model) -> dict[str, Knowledge]:
    """Every source knowledge the model can give (not only the one ``auto`` picks)."""
    offered = {"energy": Knowledge("energy")}
    for kind in ("bn", "stats", "prototype"):
        try:
            offered[kind] = choose_knowledge(model, kind)
        except ModelError:  # the model does not offer this kind
            pass
    return offered


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = scoring.percentile_rank(a), scoring.percentile_rank(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(positive > negative), ties counted half."""
    diff = positive[:, None] - negative[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def measure(model_path: Path, data: Path, cases: list[dict]) -> dict:
    model = load_model(model_path)
    offered = kinds_offered(model)
    head = offered["prototype"].head if "prototype" in offered else ""
    config = SweepConfig(keep_energy=True, keep_label=True, prototype_head=head)
    results, dice = [], []
    for case in cases:
        loaded = load_case(case["name"], data / "images" / case["name"], data / "labels" / case["name"], model.card)
        result = sweep(model.network, torch.from_numpy(loaded.image), model.card, config)
        results.append(result)
        dice.append(100 * float(np.nanmean(dice_per_class(result.label, loaded.label, model.card.num_classes))))
    sites = np.array([c["site"] for c in cases])
    target = sites != "source"
    pool = pool_from_results(results)
    target_pool = pool_from_results([r for r, t in zip(results, target) if t])
    target_index = np.flatnonzero(target)
    dice = np.array(dice)
    report = {
        "model": str(model_path),
        "auto": choose_knowledge(model).kind,
        "dice_per_site": {s: float(dice[sites == s].mean()) for s in sorted(set(sites))},
        "kinds": {},
    }
    for kind, knowledge in offered.items():
        gap = knowledge_gap(pool, knowledge, divergence_layers(pool, knowledge))
        report["kinds"][kind] = {
            "spearman_error": spearman(gap[target], 100 - dice[target]),
            "auc_source": auc(gap[target], gap[~target]) if (~target).any() else None,
            "gap_per_site": {s: float(gap[sites == s].mean()) for s in sorted(set(sites))},
            "dkd_first": [
                {
                    "case": cases[target_index[i]]["name"],
                    "site": str(sites[target_index[i]]),
                    "dice": dice[target_index[i]],
                }
                for i in select(target_pool, "dkd", knowledge).order[:4]
            ],
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="source models (.pt with a card)")
    parser.add_argument("--volumes", type=int, default=24, help="validation target volumes (default: %(default)s)")
    parser.add_argument("--source", type=int, default=6, help="source-distribution volumes (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=Path("runs/knowledge_gap_data"))
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    cases = write_data(args.data, args.volumes, args.source)
    report = {
        "command": " ".join(["python", "benchmarks/knowledge_gap.py", *(argv if argv is not None else sys.argv[1:])]),
        "split": f"CT hospital-shift validation (seed {VALIDATION_SEED}): {args.volumes} volumes; "
        f"{args.source} source-distribution volumes",
        "models": [measure(path, args.data, cases) for path in args.models],
    }
    emit(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
