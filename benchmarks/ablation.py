"""Why ASFDA falls short on the benchmark, knob by knob: alpha, temperature, diversity, how DKD and ASD are
combined, feature layers (the query) and the pseudo-label gates (selective fine-tuning), one at a time from
the method's defaults.

    python benchmarks/ablation.py [--seeds 0 1] [--budgets 2 4 8] [--out bench-ablation]
    python benchmarks/ablation.py --scenario ct-shift --model Resources/BenchmarkModels/ct_source_batch.pt \
        --iterations 400 --lr 1e-3 --budgets 2 4 --seeds 0 1 2 3 4 --part query \
        --reuse bench-ct/results.json --out bench-ablation-ct

Choices are made on a **validation set**, never on the protocol's test set: for the historical ``mri``
scenario 20 more volumes from the same three sites (data seed 1002); for the others the benchmark's own
validation split (``--validation``, the same data seed). Training is deterministic for a given query and
seed, so a variant that picks the same volumes as another reuses its run, and ``--reuse`` takes the
validation Dice of a benchmark's ``results.json`` made with the same scenario, iterations and learning
rates. Trainings are appended to ``OUT/ablation.json`` as they finish (an interrupted ablation resumes);
the tables are printed at the end and written to ``OUT/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from _common import emit

from ASFDALib.adaptation.recipe import LOWER_RATE_FOR
from ASFDALib.atomic import atomic_write_json, atomic_write_text
from ASFDALib.bench.benchmark import (
    SSFT_LATER_FIELDS,
    BenchmarkConfig,
    SSFTOptions,
    _check_scenario,
    _class_means,
    _rates,
    case_groups,
    evaluate_cases,
    load_cases,
    lower_rate_rule,
    row_training,
    train,
    write_data,
)
from ASFDALib.bench.phantoms import write_pool
from ASFDALib.bench.statistics import case_mean, group_means
from ASFDALib.models.defaults import default_model_path
from ASFDALib.models.loading import ModelSource
from ASFDALib.query.ranking import RankConfig, rank_folder

METHOD = {"strategy": "asfda"}
QUERY_VARIANTS = {
    "random": {"strategy": "random"},
    "ASD only (alpha 0)": {"strategy": "asd"},
    "ASFDA, the method (alpha 0.5, gap-first fusion)": METHOD,
    "gated fusion (first pick gated too)": {**METHOD, "fusion": "gated"},
    "alpha 0.25": {**METHOD, "alpha": 0.25},
    "alpha 0.75": {**METHOD, "alpha": 0.75},
    "static temperature": {**METHOD, "dynamic_temperature": False},
    "no diversity": {**METHOD, "diversity": False},
    "summed fusion (the paper's)": {**METHOD, "fusion": "sum"},
    "DKD only (alpha 1)": {"strategy": "dkd"},
    "layers: encoder stages": {**METHOD, "layers": "stages"},
    "layers: all taps": {**METHOD, "layers": "all"},
    "layers: logits": {**METHOD, "layers": "logits"},
    "source-statistics file": {**METHOD, "knowledge": "stats"},
}
# The variants are pinned, not the recipe's defaults, so a later default leaves their meaning (and the
# stored trainings they name) alone. CONSTANT is the recipe before the decaying stage 2 (2026-12-05).
CONSTANT = SSFTOptions(
    reliability="confidence",
    min_agreement=0.5,
    stage2_lr="constant",
    fallback="none",
    pseudo_augment="weak",
    teacher="fixed",
    pseudo_mix="none",
    ema_weight=1.0,
    blend_start=0.0,
)
HALVES = replace(CONSTANT, stage1_fraction=0.5, extra_fraction=0.0)
COSINE = replace(CONSTANT, stage2_lr="cosine")
# the sixth session's default: an EMA teacher where the fallback judged, its patches at half weight
HALF = replace(COSINE, reliability="rounds", fallback="flips", pseudo_augment="strong", teacher="ema", ema_weight=0.5)
SSFT_VARIANTS = {  # (fine-tuning options, iterations as a multiple of the protocol's)
    "stage 1 only (no pseudo-labels)": (None, 1.0),
    "SSFT in halves of one budget (the first protocol)": (HALVES, 1.0),
    "stage 1 for 3/4 of the budget": (replace(HALVES, stage1_fraction=0.75), 1.0),
    "halves, keep 25% of the pool": (replace(HALVES, keep_fraction=0.25), 1.0),
    "halves, keep 100% (no volume gate)": (replace(HALVES, keep_fraction=1.0), 1.0),
    "halves, voxel gate 0.8": (replace(HALVES, confidence=0.8), 1.0),
    "halves, voxel gate 0.97": (replace(HALVES, confidence=0.97), 1.0),
    "full stage 1, then 1/2 more with pseudo-labels (constant rate)": (CONSTANT, 1.0),
    "full stage 1, then 1/2 more, keep 25% of the pool": (replace(CONSTANT, keep_fraction=0.25), 1.0),
    "full stage 1, then 1/2 more, voxel gate 0.97": (replace(CONSTANT, confidence=0.97), 1.0),
    "full stage 1, then 1/2 more, where flips agree": (replace(CONSTANT, reliability="flips"), 1.0),
    "full stage 1, then 1/2 more, where the source model agrees": (replace(CONSTANT, reliability="rounds"), 1.0),
    "control: labels only for 1.5x the iterations": (None, 1.5),
    "full stage 1, then 1/2 more with pseudo-labels, stage 2's rate decaying": (COSINE, 1.0),
    "full stage 1, then 1/2 more, where the source model agrees, rate decaying": (
        replace(COSINE, reliability="rounds"),
        1.0,
    ),
    "full stage 1, then 1/2 more, where the source model agrees, rate decaying, every agreeing volume": (
        replace(COSINE, reliability="rounds", keep_fraction=1.0),
        1.0,
    ),
    "full stage 1, then 1/2 more, where flips agree, rate decaying": (replace(COSINE, reliability="flips"), 1.0),
    "full stage 1, then 1/2 more, confidence gate, rate decaying, strong augmentation of pseudo-labelled patches": (
        replace(COSINE, pseudo_augment="strong"),
        1.0,
    ),
    "full stage 1, then 1/2 more, where flips agree, rate decaying, strong augmentation": (
        replace(COSINE, reliability="flips", pseudo_augment="strong"),
        1.0,
    ),
    "full stage 1, then 1/2 more, where the source model agrees, rate decaying, strong augmentation": (
        replace(COSINE, reliability="rounds", pseudo_augment="strong"),
        1.0,
    ),
    # "the default" in these names (result keys, kept as recorded) is the recipe of 2026-12-05's afternoon,
    # with the fixed teacher; the default since labels with an EMA teacher where the fallback judged
    "full stage 1, then 1/2 more, where the source model agrees, else where flips agree, rate decaying, strong "
    "augmentation (the default)": (
        replace(COSINE, reliability="rounds", fallback="flips", pseudo_augment="strong"),
        1.0,
    ),
    "the default, agreement floor 0.75": (
        replace(COSINE, reliability="rounds", fallback="flips", pseudo_augment="strong", min_agreement=0.75),
        1.0,
    ),
    "the default, an EMA teacher relabels the kept volumes' strongly augmented patches online": (
        replace(COSINE, reliability="rounds", fallback="flips", pseudo_augment="strong", teacher="ema"),
        1.0,
    ),
    "the default, every volume above the agreement floor": (
        replace(COSINE, reliability="rounds", fallback="flips", pseudo_augment="strong", keep_fraction=1.0),
        1.0,
    ),
    "full stage 1, then 1/2 more, confidence gate, rate decaying, an EMA teacher labels strongly augmented patches": (
        replace(COSINE, pseudo_augment="strong", teacher="ema"),
        1.0,
    ),
    "full stage 1, then 1/2 more, every volume, rate decaying, an EMA teacher labels strongly augmented patches": (
        replace(COSINE, pseudo_augment="strong", teacher="ema", keep_fraction=1.0),
        1.0,
    ),
    "control: stage 2 on the labels alone, its rate decaying": (COSINE, 1.0),
    "the default, an EMA teacher, pseudo-labelled patches at a quarter weight": (
        replace(
            COSINE, reliability="rounds", fallback="flips", pseudo_augment="strong", teacher="ema", ema_weight=0.25
        ),
        1.0,
    ),
    "the default, an EMA teacher, pseudo-labelled patches at half weight": (HALF, 1.0),
    "the default at half weight, the EMA teacher's voxel gate 0.8": (replace(HALF, confidence=0.8), 1.0),
    "the default at half weight, the EMA teacher's voxel gate 0.95": (replace(HALF, confidence=0.95), 1.0),
    "the default at half weight, pseudo-labelled patches through random intensity curves": (
        replace(HALF, pseudo_augment="remap"),
        1.0,
    ),
}
# variants whose stage 2 runs without pseudo-labels (the control of a decaying stage 2)
LABELS_ONLY = {"control: stage 2 on the labels alone, its rate decaying"}


def _key(query: list[str], seed: int, ssft: SSFTOptions | None, iterations: int, labels_only: bool = False) -> str:
    # a field added later, at the value earlier trainings ran with, is left out so that their keys still match
    later = SSFT_LATER_FIELDS
    options = {k: v for k, v in asdict(ssft).items() if k not in later or v != later[k]} if ssft else None
    if labels_only and options is not None:
        options["labels_only"] = True
    return json.dumps([sorted(query), seed, options, iterations])


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else ""


def _reused(path: Path, config: BenchmarkConfig, validation: Path) -> dict[str, dict]:
    """Trainings of a benchmark run (``results.json``) whose validation Dice this ablation can take as its own:
    same scenario, iterations and learning rates, and a validation split with the same cases."""
    stored = json.loads(path.read_text())
    protocol = stored["protocol"]
    rule = {"lower_rate_for": lower_rate_rule(config)}
    mine = {"scenario": config.scenario, "iterations": config.iterations, **_rates(config), **rule}
    keys = ("scenario", "iterations", "lr", "encoder_lr_scale")
    theirs = {k: protocol.get(k) for k in keys if protocol.get(k) is not None}
    theirs["lower_rate_for"] = protocol.get("lower_rate_for", "encoder")  # the rule before it was a choice
    if theirs != mine or not protocol.get("validation"):
        made = f"{theirs}, validation {protocol.get('validation')}"
        raise SystemExit(f"{path}: made with {made}; this ablation: {mine}")
    if (Path(protocol["validation"]) / "cases.json").read_text() != (validation / "cases.json").read_text():
        raise SystemExit(f"{path}: its validation split holds other cases than {validation}")
    # the SSFT row and its control are reusable under the options they ran with (the ablation's key names them)
    ssft = SSFTOptions(**{**SSFT_LATER_FIELDS, **protocol["ssft"]}) if protocol.get("ssft") else None
    made = replace(config, ssft=ssft or SSFTOptions(**SSFT_LATER_FIELDS))
    reused = {}
    for run in stored["runs"]:
        if run["row"] == "source" or run["shared_with"] or not run.get("validation"):
            continue
        if run["row"] == "asfda+ssft" and ssft is None:
            continue
        options, iterations, pseudo_labels = row_training(run["row"], made)
        key = _key(run["query"], run["seed"], options, iterations, options is not None and not pseudo_labels)
        reused[key] = {"dice": run["validation"], "seconds": run["seconds"], "from": f"{path}: {run['row']}"}
    return reused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scenario", default="mri", help="benchmark scenario (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="source model (default: the built-in one; the mri scenario's)")
    parser.add_argument("--validation", type=int, default=12, help="validation volumes of a non-mri scenario")
    parser.add_argument("--iterations", type=int, default=BenchmarkConfig.iterations)
    parser.add_argument("--lr", type=float, help="the recipe's learning rate (default: asfda finetune's)")
    parser.add_argument(
        "--lower-rate-for", choices=LOWER_RATE_FOR, help="which loaded tensors train at the lower rate (recipe's)"
    )
    parser.add_argument("--part", choices=("query", "ssft", "all"), default="all", help="which table to make")
    parser.add_argument("--variants", nargs="+", help="query variants to run (default: all)")
    parser.add_argument("--ssft-variants", nargs="+", help="fine-tuning variants to run (default: all)")
    parser.add_argument("--ssft-budget", type=int, default=4, help="labels of the fine-tuning table's query")
    parser.add_argument("--reuse", type=Path, help="a benchmark's results.json to take validation Dice from")
    parser.add_argument("--out", type=Path, default=Path("bench-ablation"))
    parser.add_argument("--json", type=Path, help="also write the summary here (e.g. benchmarks/results/ablation.json)")
    args = parser.parse_args()
    start = time.perf_counter()
    mri = args.scenario == "mri"
    config = BenchmarkConfig(
        scenario=args.scenario,
        iterations=args.iterations,
        lr=args.lr,
        lower_rate_for=args.lower_rate_for,
        validation=0 if mri else args.validation,
    )
    model_path = args.model or default_model_path()
    source = ModelSource(model_path)
    model = source.load()
    _check_scenario(args.out / "data", config)  # another scenario's data under --out is refused, not reused
    data = write_data(args.out / "data", config)
    val_folder = data / ("val" if mri else "validation")
    if mri and not (val_folder / "cases.json").is_file():
        write_pool(val_folder, config.test, seed=config.data_seed + 2, prefix="val")
    site = {c["name"]: c["site"] for c in json.loads((data / "pool" / "cases.json").read_text())["cases"]}
    pool, val = load_cases(data / "pool", model.card), load_cases(val_folder, model.card)
    path = args.out / "ablation.json"
    # what every stored training shares: resuming with another model, scenario or recipe would mix them
    rule = lower_rate_rule(config)
    settings = {"scenario": args.scenario, "model": str(model_path.resolve()), **_rates(config), "lower_rate_for": rule}
    stored = json.loads(path.read_text()) if path.is_file() else {}
    if "settings" in stored:  # trainings stored before the lower-rate rule was a choice used the encoder rule
        stored["settings"].setdefault("lower_rate_for", "encoder")
    if stored and stored.get("settings", settings) != settings:
        raise SystemExit(f"{path}: its trainings were made with {stored['settings']}; use another --out")
    trainings: dict[str, dict] = stored.get("trainings", {})
    reused = _reused(args.reuse, config, val_folder) if args.reuse else {}
    variants = {k: v for k, v in QUERY_VARIANTS.items() if not args.variants or k in args.variants}
    if args.variants and len(variants) != len(args.variants):
        raise SystemExit(f"unknown variant among {args.variants}; choose from {list(QUERY_VARIANTS)}")

    site_of = case_groups([val_folder]).get("site", {})

    def by_site(per_case: dict[str, list[float]]) -> dict[str, float]:
        """Mean validation Dice per site (percent): what forgetting looks like, site by site."""
        return group_means({n: 100 * case_mean(d) for n, d in per_case.items()}, site_of)

    def save() -> None:
        atomic_write_json(path, {"iterations": config.iterations, "settings": settings, "trainings": trainings})

    def training_of(
        query: list[str], seed: int, ssft: SSFTOptions | None, scale: float = 1.0, labels_only: bool = False
    ) -> dict:
        """The stored training of this variant (validation Dice per class, per site), trained if missing."""
        iterations = round(config.iterations * scale)
        key = _key(query, seed, ssft, iterations, labels_only)
        if key not in trainings and key in reused:
            trainings[key] = reused[key]
        if key not in trainings:
            t0 = time.perf_counter()
            labelled = [c for c in pool if c.name in query]
            work = args.out / "work"
            network, kept, judged, blend = train(
                source,
                labelled,
                pool,
                iterations,
                seed,
                "cpu",
                ssft,
                work,
                rates=_rates(config),
                pseudo_labels=not labels_only,
                stage1_cache=args.out / "stage1",
            )
            per_case = evaluate_cases(model, network, val, "cpu")
            seconds = time.perf_counter() - t0
            trainings[key] = {
                "dice": _class_means(per_case),
                "sites": by_site(per_case),
                "seconds": seconds,
                "pseudo_labelled": kept,
                "pseudo_gate": judged,  # the gate that judged the pool (a fallback, where the asked one kept none)
                "blend": blend,  # the starting weights' share of the model handed over
            }
        save()
        return trainings[key]

    def percent(training: dict) -> float:
        """Mean validation Dice over the classes, in percent."""
        return 100 * float(np.nanmean(training["dice"]))

    def query_of(options: dict, budget: int, seed: int) -> list[str]:
        rank = RankConfig(budget=budget, seed=seed, device=config.device, **options)
        ranking = rank_folder(data / "pool" / "images", model, args.out / "cache", rank)
        return [r.file for r in ranking.rows if r.status == "scored"][:budget]

    query_rows = []
    for name, options in variants.items() if args.part != "ssft" else ():
        for budget in args.budgets:
            for seed in args.seeds:
                query = query_of(options, budget, seed)
                dice = percent(training_of(query, seed, None))
                sites = "".join(sorted(site[q] for q in query))
                query_rows.append({"variant": name, "budget": budget, "seed": seed, "sites": sites, "dice": dice})
                print(f"{name:34s} budget {budget} seed {seed}: {dice:5.1f} (sites {sites})", flush=True)
    ssft_rows = []
    ssft_variants = {k: v for k, v in SSFT_VARIANTS.items() if not args.ssft_variants or k in args.ssft_variants}
    if args.ssft_variants and len(ssft_variants) != len(args.ssft_variants):
        raise SystemExit(f"unknown variant among {args.ssft_variants}; choose from {list(SSFT_VARIANTS)}")
    method_query = query_of(METHOD, args.ssft_budget, 0) if args.part != "query" else []
    for name, (ssft, scale) in ssft_variants.items() if args.part != "query" else ():
        for seed in args.seeds:
            training = training_of(method_query, seed, ssft, scale, name in LABELS_ONLY)
            row = {"variant": name, "seed": seed, "dice": percent(training), "sites": training.get("sites", {})}
            ssft_rows.append(row)
            print(f"{name:34s} seed {seed}: {row['dice']:5.1f}", flush=True)

    lines = [
        f"Validation Dice (%), mean ± sd over training seeds {args.seeds}; {config.iterations} iterations per run"
        f" ({args.scenario} scenario, {model_path.name}).",
    ]
    if query_rows:
        lines += [
            "",
            "| query variant | " + " | ".join(f"budget {b}: Dice (sites)" for b in args.budgets) + " |",
            "|---|" + "---|" * len(args.budgets),
        ]
    for name in variants if query_rows else ():
        cells = []
        for b in args.budgets:
            rows = [r for r in query_rows if r["variant"] == name and r["budget"] == b]
            picks = sorted({r["sites"] for r in rows})
            cells.append(f"{_cell([r['dice'] for r in rows])} ({', '.join(picks)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sites = sorted({s for r in ssft_rows for s in r.get("sites", {})})
    if ssft_rows:
        head = f"| fine-tuning variant (ASFDA query, budget {args.ssft_budget}) | Dice |"
        lines += ["", head + "".join(f" site {s} |" for s in sites), "|---|---|" + "---|" * len(sites)]
    if ssft_rows and sites:
        source = trainings.setdefault("source", {})
        if "sites" not in source:  # the model before adaptation, site by site: the bar for "do no harm"
            per_case = evaluate_cases(model, model.network, val, "cpu")
            source.update(dice=_class_means(per_case), sites=by_site(per_case), seconds=0.0)
            save()
        cells = "".join(f" {source['sites'][s]:.1f} |" for s in sites)
        lines.append(f"| source model, no adaptation | {100 * np.nanmean(source['dice']):.1f} |{cells}")
    for name in ssft_variants if ssft_rows else ():
        rows = [r for r in ssft_rows if r["variant"] == name]
        cells = "".join(f" {_cell([r['sites'][s] for r in rows if s in r.get('sites', {})])} |" for s in sites)
        lines.append(f"| {name} | {_cell([r['dice'] for r in rows])} |{cells}")
    table = "\n".join(lines) + "\n"
    atomic_write_text(args.out / "ablation.md", table)
    print("\n" + table)
    report = {
        "command": "python benchmarks/ablation.py " + " ".join(sys.argv[1:]),
        "iterations": config.iterations,
        "seeds": args.seeds,
        "evaluated_on": f"validation set ({len(val)} volumes, data seed {config.data_seed + 2}), not the test set",
        "reused_trainings": sum(1 for t in trainings.values() if "from" in t),
        "query": query_rows,
        "ssft": ssft_rows,
        "trainings": sum(1 for k in trainings if k != "source"),
        "training_seconds_total": sum(t["seconds"] for t in trainings.values()),
        "seconds_this_invocation": time.perf_counter() - start,
        "table": table,
    }
    if args.json:
        emit(report, args.json)


if __name__ == "__main__":
    main()
