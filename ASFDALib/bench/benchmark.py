"""The active-learning benchmark: every query strategy, the same fine-tuning recipe, budgets x seeds,
Dice on a disjoint labelled test set; JSON, a Markdown table and a plot.

Runs are appended to ``results.json`` as they finish, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ASFDALib.adaptation.patches import Case, load_case
from ASFDALib.adaptation.pseudo import selective_pseudo_labels
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.trainer import Trainer
from ASFDALib.atomic import atomic_write_json, atomic_write_text
from ASFDALib.evaluation.metrics import dice_per_class
from ASFDALib.inference.predict import predict_label
from ASFDALib.models.loading import LoadedModel, load_model
from ASFDALib.plotting import draw_or_explain, new_figure, save_figure
from ASFDALib.query.ranking import RankConfig, rank_folder

QUERY_ROWS = ("random", "fg-random", "entropy", "epistemic", "coreset", "dkd", "asd", "asfda")
ROWS = ("source", *QUERY_ROWS, "asfda+ssft", "full")
LABELS = {
    "source": "source model, no adaptation",
    "random": "random",
    "fg-random": "foreground-aware random",
    "entropy": "entropy (whole volume)",
    "epistemic": "MC-dropout epistemic (5 passes)",
    "coreset": "Core-set",
    "dkd": "DKD only",
    "asd": "ASD only",
    "asfda": "ASFDA (DKD + ASD)",
    "asfda+ssft": "ASFDA + selective semi-supervised fine-tuning (stage 2: +50% iterations)",
    "full": "fully supervised, whole pool (upper bound)",
}


@dataclass
class SSFTOptions:
    """How the SSFT row splits its iterations and gates its pseudo-labels (the ablation's knobs).

    The default is what ``asfda finetune`` does: stage 1 as long as every other row's training (so it is
    the ASFDA row's model), then stage 2 with pseudo-labels on top. Splitting one budget in halves
    instead leaves stage 1 too weak to pseudo-label (benchmarks/ablation.py, 29.3 against 41.1 Dice).
    """

    stage1_fraction: float = 1.0
    keep_fraction: float = 0.5
    confidence: float = 0.9
    extra_fraction: float = 0.5  # stage 2 runs this fraction of the iterations on top of stage 1


@dataclass
class BenchmarkConfig:
    pool: int = 40
    test: int = 20
    budgets: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    iterations: int = 300
    rows: tuple[str, ...] = ROWS
    device: str = "auto"
    data_seed: int = 1000
    ssft: SSFTOptions = field(default_factory=SSFTOptions)

    @classmethod
    def quick(cls) -> BenchmarkConfig:
        return cls(pool=6, test=3, budgets=(2,), seeds=(0,), iterations=4)


@dataclass
class Run:
    row: str
    budget: int
    seed: int
    dice: list[float]
    query: list[str] = field(default_factory=list)
    seconds: float = 0.0


def load_cases(folder: Path, card) -> list[Case]:
    """Every image of ``folder/images`` with its label from ``folder/labels``, at the model's spacing."""
    return [load_case(p.name, p, folder / "labels" / p.name, card) for p in sorted((folder / "images").iterdir())]


def evaluate(model: LoadedModel, network: torch.nn.Module, cases: list[Case], device: str) -> list[float]:
    """Mean Dice per foreground class over ``cases`` (a class absent from both maps is skipped)."""
    per_class = []
    for case in cases:
        pred = predict_label(network, case.image, model.card, device)
        per_class.append(dice_per_class(pred, case.label, model.card.num_classes))
    values = np.array(per_class, dtype=np.float64)
    return [
        float(np.nanmean(values[:, c])) if np.isfinite(values[:, c]).any() else float("nan")
        for c in range(values.shape[1])
    ]


def train(
    model_path: Path,
    card,
    labelled: list[Case],
    pool: list[Case],
    iterations: int,
    seed: int,
    device: str,
    ssft: SSFTOptions | None,
    workdir: Path,
) -> torch.nn.Module:
    """The same recipe for every row: ``iterations`` on the labels; SSFT adds stage 2 as ``ssft`` says."""
    network = load_model(model_path).network
    config = FinetuneConfig(seed=seed, device=device, checkpoint_every=10**9)
    trainer = Trainer(network, card, config, workdir)
    first = round(iterations * ssft.stage1_fraction) if ssft else iterations
    trainer.run(labelled, first)
    if ssft:
        names = {c.name for c in labelled}
        candidates = [(c.name, c.image) for c in pool if c.name not in names]
        _, _, labels = selective_pseudo_labels(
            network, card, [c.image for c in labelled], candidates, ssft.keep_fraction, ssft.confidence, device
        )
        by_name = {c.name: c for c in pool}
        pseudo = [Case(n, by_name[n].image, label) for n, label in labels.items()]
        trainer.begin_stage("stage2")
        trainer.run(labelled, iterations - first + round(iterations * ssft.extra_fraction), pseudo or None)
    return network.eval()


def _summary(runs: list[Run], config: BenchmarkConfig) -> dict:
    table: dict = {}
    for row in config.rows:
        for budget in (0,) if row in ("source", "full") else config.budgets:
            dice = np.array([r.dice for r in runs if r.row == row and r.budget == budget], dtype=np.float64)
            if dice.size == 0:
                continue
            overall = np.nanmean(dice, axis=1)
            table[f"{row}@{budget}"] = {
                "row": row,
                "budget": budget,
                "runs": len(dice),
                "mean": [float(v) for v in np.nanmean(dice, axis=0)],
                "sd": [float(v) for v in np.nanstd(dice, axis=0)],
                "overall_mean": float(overall.mean()),
                "overall_sd": float(overall.std()),
            }
    return table


def markdown(summary: dict, class_names: list[str]) -> str:
    head = "| method | budget | seeds | " + " | ".join(class_names[1:]) + " | mean Dice |"
    lines = [head, "|" + "---|" * (len(class_names) + 3)]
    ordered = sorted(summary.values(), key=lambda s: (s["row"] == "full", s["budget"], ROWS.index(s["row"])))
    for s in ordered:
        budget = "all" if s["row"] == "full" else ("0" if s["row"] == "source" else str(s["budget"]))
        cells = [f"{100 * m:.1f} ± {100 * d:.1f}" for m, d in zip(s["mean"], s["sd"])]
        lines.append(
            f"| {LABELS[s['row']]} | {budget} | {s['runs']} | "
            + " | ".join(cells)
            + f" | **{100 * s['overall_mean']:.1f} ± {100 * s['overall_sd']:.1f}** |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, config: BenchmarkConfig, path: Path) -> Path:
    fig, ax = new_figure(7.5, 5)
    budgets = list(config.budgets)
    for row in config.rows:
        if row in ("source", "full"):
            s = summary.get(f"{row}@0")
            if s:
                ax.axhline(
                    100 * s["overall_mean"],
                    ls="--" if row == "full" else ":",
                    color="k" if row == "full" else "grey",
                    label=LABELS[row],
                )
            continue
        points = [summary.get(f"{row}@{b}") for b in budgets]
        if not any(points):
            continue
        xs = [b for b, p in zip(budgets, points) if p]
        ys = [100 * p["overall_mean"] for p in points if p]
        es = [100 * p["overall_sd"] for p in points if p]
        bold = row.startswith("asfda")
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=2.5 if bold else 1.2, label=LABELS[row])
    ax.set_xlabel(f"labelled volumes (of a pool of {config.pool})")
    ax.set_ylabel(f"mean Dice on {config.test} test volumes (%)")
    ax.set_xticks(budgets)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def write_data(data: Path, config: BenchmarkConfig) -> Path:
    """The pool and the disjoint test set under ``data`` (kept when already there: they are deterministic)."""
    from ASFDALib.bench.phantoms import write_pool

    for part, size, seed in (("pool", config.pool, config.data_seed), ("test", config.test, config.data_seed + 1)):
        if not (data / part / "cases.json").is_file():
            write_pool(data / part, size, seed=seed, prefix=part)
    return data


def run_benchmark(
    out: Path,
    config: BenchmarkConfig,
    model_path: Path,
    progress: Callable[[int, int, str], None] | None = None,
    run: bool = True,
) -> dict:
    """Run (or resume) the protocol into ``out``; returns the summary written to ``benchmark.json``.

    ``run=False`` only summarises the runs already in ``results.json`` (a partial benchmark's report).
    """
    out = Path(out)
    start = time.perf_counter()
    if not run:
        runs = [Run(**r) for r in json.loads((out / "results.json").read_text())["runs"]]
        names = load_model(model_path).card.class_names
        return _report(out, config, runs, names, start)
    data = write_data(out / "data", config)
    model = load_model(model_path)
    card = model.card
    pool, test = load_cases(data / "pool", card), load_cases(data / "test", card)
    results_path = out / "results.json"
    runs = [Run(**r) for r in json.loads(results_path.read_text())["runs"]] if results_path.is_file() else []
    done = {(r.row, r.budget, r.seed) for r in runs}
    # Seed by seed, each with its upper bound: an interrupted benchmark leaves complete seeds behind.
    plan = [("source", 0, 0)] if "source" in config.rows else []
    for s in config.seeds:
        plan += [(row, b, s) for b in config.budgets for row in config.rows if row not in ("source", "full")]
        plan += [("full", 0, s)] if "full" in config.rows else []
    orders: dict[tuple[str, int], list[str]] = {}
    for i, (row, budget, seed) in enumerate(plan):
        if progress:
            progress(i, len(plan), f"{row} budget {budget} seed {seed}")
        if (row, budget, seed) in done:
            continue
        t0 = time.perf_counter()
        query: list[str] = []
        if row == "source":
            network = model.network
        elif row == "full":
            network = train(model_path, card, pool, pool, config.iterations, seed, config.device, None, out / "work")
        else:
            strategy = "asfda" if row == "asfda+ssft" else row
            key = (strategy, seed if strategy in ("random", "fg-random") else 0)
            if key not in orders:
                ranking = rank_folder(
                    data / "pool" / "images",
                    model,
                    out / "cache",
                    RankConfig(strategy=strategy, budget=max(config.budgets), seed=key[1], device=config.device),
                )
                orders[key] = [r.file for r in ranking.rows if r.status == "scored"]
            query = orders[key][:budget]
            labelled = [c for c in pool if c.name in query]
            network = train(
                model_path,
                card,
                labelled,
                pool,
                config.iterations,
                seed,
                config.device,
                config.ssft if row == "asfda+ssft" else None,
                out / "work",
            )
        run = Run(row, budget, seed, evaluate(model, network, test, config.device), query, time.perf_counter() - t0)
        runs.append(run)
        atomic_write_json(results_path, {"config": asdict(config), "runs": [asdict(r) for r in runs]})
    if progress:
        progress(len(plan), len(plan), "")
    return _report(out, config, runs, card.class_names, start)


def _report(out: Path, config: BenchmarkConfig, runs: list[Run], class_names: list[str], start: float) -> dict:
    summary = _summary(runs, config)
    report = {
        "config": asdict(config),
        "class_names": class_names,
        "summary": summary,
        "runs": len(runs),
        "wall_seconds": time.perf_counter() - start,
        "run_seconds": sum(r.seconds for r in runs),
    }
    atomic_write_json(out / "benchmark.json", report)
    atomic_write_text(out / "benchmark.md", markdown(summary, class_names))
    _, why = draw_or_explain(out / "benchmark.png", lambda path: plot(summary, config, path))
    report["warnings"] = [why] if why else []  # a missing picture never costs the measured results
    return report
