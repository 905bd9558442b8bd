"""``asfda demo``: the whole method in a few minutes, with ground truth standing in for the clinician:
generate a multi-site target pool, rank it, "label" the query, fine-tune with selective pseudo-labels, and
compare with the source model and with random selection of the same budget.

Two scenarios, as the benchmark has them: ``ct-shift`` (the default: the benchmark's CT source model on
three CT hospitals, the setting the benchmark measures ASFDA in) and ``mri`` (the built-in model on
MRI-like sites, a cross-modality extreme where the source model segments nothing).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ASFDALib.adaptation.pipeline import finetune_session, session_model
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.rounds import record_round
from ASFDALib.adaptation.session import Session
from ASFDALib.adaptation.trainer import Progress as TrainingProgress
from ASFDALib.atomic import atomic_write_json, atomic_write_text
from ASFDALib.bench.benchmark import SCENARIO_MODELS, evaluate, load_cases, train
from ASFDALib.bench.phantoms import write_pool
from ASFDALib.bench.scenarios import write_target_split
from ASFDALib.data.labels import import_labels
from ASFDALib.errors import ASFDAError
from ASFDALib.models.loading import ModelSource
from ASFDALib.outputs import SESSION_FILE
from ASFDALib.plotting import draw_or_explain, new_figure, save_figure
from ASFDALib.query.ranking import RankConfig, Ranking, rank_folder
from ASFDALib.query.report import write_ranking


class Step(Protocol):
    """Told of the demo's progress: the stage, the fraction of the demo done, and where within the stage."""

    def __call__(self, stage: str, fraction: float, detail: str = "") -> None: ...


SCENARIO_LR = {"ct-shift": 1e-3, "mri": None}  # the recipe chosen on each scenario's validation split


@dataclass
class DemoConfig:
    pool: int = 24
    test: int = 8
    budget: int = 4
    iterations: int = 200
    seed: int = 0
    device: str = "auto"
    scenario: str = "ct-shift"  # or "mri" (see the module docstring)


def demo_model_path(scenario: str) -> Path:
    """The source model of a demo scenario: the benchmark's CT model, or the built-in default."""
    from ASFDALib.models.defaults import default_model_path, resources_dir

    if scenario == "mri":
        return default_model_path()
    return resources_dir() / "BenchmarkModels" / SCENARIO_MODELS["ct-shift"]


def _beyond_the_demo(session_dir: Path) -> str:
    """What a user did in the demo's session after the demo (a later round, labels of their own), in words; ""
    when it holds only what the demo made (one round, its query's labels from clinician_labels/)."""
    try:
        data = json.loads((session_dir / SESSION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    rounds = data.get("rounds") or []
    if len(rounds) > 1:
        return f"{len(rounds)} rounds"
    if rounds and len((rounds[0].get("metrics") or {}).get("runs", [])) > 1:
        return "fine-tune runs of its own"
    own = [
        name
        for name, versions in (data.get("labels") or {}).items()
        for version in versions
        if not str(version.get("source", "")).startswith("import:") or "clinician_labels" not in version["source"]
    ]
    return f"labels of its own: {', '.join(sorted(set(own))[:3])}" if own else ""


def refuse_replacing(out: Path) -> None:
    """Refuse an ``out`` whose data and session the demo must not replace: a folder of other files, or the demo's
    session gone on with (the README invites it). Run again before anything says "replacing"."""
    marker = out / "data" / "scenario.json"
    # a demo's folder: its marker, or what a demo made before the marker was written (demo.json, its pool)
    made_by_a_demo = any(p.is_file() for p in (marker, out / "demo.json", out / "data" / "pool" / "cases.json"))
    if out.is_dir() and any(out.iterdir()) and not made_by_a_demo:
        raise ASFDAError(
            f"{out}: holds files of no demo (no {marker.relative_to(out)}), and the demo replaces its own folders "
            "there (data, session); choose a new --out"
        )
    if beyond := _beyond_the_demo(out / "session"):
        raise ASFDAError(
            f"{out / 'session'}: holds work the demo did not do ({beyond}), and the demo replaces its session; "
            f"choose a new --out, or move that session elsewhere first"
        )


def run_demo(out: Path, model_path: Path, config: DemoConfig, step: Step | None = None) -> dict:
    """Run the demo into ``out`` and return its report (also in demo.json / demo.md / demo.png)."""
    say = step or (lambda _stage, _fraction, _detail="": None)
    out = Path(out)
    if not 0 < config.budget < config.pool:  # else ASFDA and random would label the same volumes: no comparison
        raise ASFDAError(f"--budget {config.budget} must be below --pool {config.pool} (and above 0)")
    start = time.perf_counter()
    data = out / "data"
    marker = data / "scenario.json"  # what the demo's data was made for: the folder is a demo's
    refuse_replacing(out)
    ct = config.scenario == "ct-shift"
    say(f"generating a 3-site {'CT' if ct else 'MRI-like'} target pool and a test set", 0.0)
    write = write_target_split if ct else write_pool
    made_for = {"scenario": config.scenario, "pool": config.pool, "test": config.test, "seed": config.seed}
    if data.is_dir() and (not marker.is_file() or json.loads(marker.read_text()) != made_for):
        shutil.rmtree(data)  # the demo's own data for another setting (regenerated deterministically)
    data.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, made_for)
    for part, size, seed in (("pool", config.pool, config.seed + 10), ("test", config.test, config.seed + 11)):
        if not (data / part / "cases.json").is_file():
            write(data / part, size, seed=seed, prefix=part)
    lr = SCENARIO_LR[config.scenario]
    rates = {"lr": lr} if lr else {}
    source = ModelSource(model_path)
    model = source.load()
    session_dir = out / "session"
    if session_dir.exists():
        shutil.rmtree(session_dir)
    for report_file in ("demo.json", "demo.md", "demo.png"):  # the earlier report describes the session just gone
        (out / report_file).unlink(missing_ok=True)
    ranking_stage = "ranking the pool by DKD + ASD (one pass per volume)"
    say(ranking_stage, 0.1)
    with Session.open(session_dir, create=True) as session:
        ranking: Ranking = rank_folder(
            data / "pool" / "images",
            model,
            session_dir / "cache",
            RankConfig(budget=config.budget, device=config.device),
            progress=lambda done, total, _name: say(ranking_stage, 0.1 + 0.1 * done / total, f"volume {done}/{total}"),
        )
        ranking_outputs = write_ranking(ranking, session_dir)
        record_round(
            session,
            model,
            ranking,
            data / "pool" / "images",
            {"name": "asfda", "alpha": 0.5, "fusion": ranking.fusion, "budget": config.budget},
            trust=False,
        )
        query = [r.file for r in ranking.selected]
        say(f"the clinician labels the query: {', '.join(query)} (ground truth stands in)", 0.2)
        gt = out / "clinician_labels"
        gt.mkdir(parents=True, exist_ok=True)
        for name in query:
            shutil.copy(data / "pool" / "labels" / name, gt / name)
        import_labels(session, gt, model.card.class_names)
        session.save()
        finetune_stage = "fine-tuning: stage 1 on the labels, reliable pseudo-labels, stage 2"
        say(finetune_stage, 0.3)

        def trained(p: TrainingProgress) -> None:  # each stage counts its own iterations: 0.3-0.5, then 0.5-0.7
            done = 0.3 + 0.2 * (p.stage == "stage2") + 0.2 * p.iteration / p.total
            say(finetune_stage, done, f"{p.label} {p.iteration}/{p.total}, loss {p.loss:.4f}")

        ft = FinetuneConfig(
            iterations=config.iterations,
            pseudo_iterations=config.iterations,
            seed=config.seed,
            device=config.device,
            **rates,
        )
        result = finetune_session(session, ft, progress=trained)
        adapted = session_model(session, adapted=True)
    random_stage = "random selection with the same budget, fine-tuned for as many iterations"
    say(random_stage, 0.7)
    pool_cases = load_cases(data / "pool", model.card)
    rng = np.random.default_rng(config.seed)
    random_query = [pool_cases[i].name for i in rng.permutation(len(pool_cases))[: config.budget]]
    random_net, *_ = train(
        source,
        [c for c in pool_cases if c.name in random_query],
        pool_cases,
        2 * config.iterations,
        config.seed,
        config.device,
        None,
        out / "work",
        rates=rates,
        progress=lambda p: say(random_stage, 0.7 + 0.2 * p.iteration / p.total, f"{p.iteration}/{p.total}"),
    )
    say("evaluating on the test set", 0.9)
    test_cases = load_cases(data / "test", model.card)
    dice = {
        "source": evaluate(model, model.network, test_cases, config.device),
        "random": evaluate(model, random_net, test_cases, config.device),
        "asfda": evaluate(model, adapted.network, test_cases, config.device),
    }
    report = {
        "config": config.__dict__,
        "query": query,
        "random_query": random_query,
        "pseudo_labelled": result.kept,
        # how stage 2 ran, as run.json records it ("" where no volume was pseudo-labelled)
        "pseudo_teacher": result.teacher,
        "pseudo_augment": result.augment,
        "pseudo_mix": result.mix,
        "handover_blend": result.blend,  # the source weights' share of the adapted model (adaptation/blend.py)
        "class_names": model.card.class_names,
        "dice": dice,
        "mean_dice": {k: float(np.nanmean(v)) for k, v in dice.items()},
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(out / "demo.json", report)
    atomic_write_text(out / "demo.md", demo_markdown(report))
    _, why = draw_or_explain(out / "demo.png", lambda path: demo_plot(report, path))
    # a missing picture never costs the demo's results; the caller shows these lines
    report["warnings"] = ranking_outputs.warnings + ([why] if why else [])
    say("done", 1.0)
    return report


def demo_markdown(report: dict) -> str:
    names = report["class_names"][1:]
    budget = report["config"]["budget"]
    rows = [
        ("source model (no labels)", "source"),
        (f"random selection, {budget} labels", "random"),
        (f"ASFDA query, {budget} labels + selective pseudo-labels", "asfda"),
    ]
    lines = ["| model | " + " | ".join(names) + " | mean |", "|" + "---|" * (len(names) + 2)]
    for title, key in rows:
        cells = [f"{100 * v:.1f}" for v in report["dice"][key]]
        lines.append(f"| {title} | " + " | ".join(cells) + f" | **{100 * report['mean_dice'][key]:.1f}** |")
    # one draw of pool and training: what it can and cannot show, where the reader looks at the figures
    lines.append(
        f"\nOne pool and one training seed ({report['config']['seed']}), the same iterations for both queries; "
        "one volume more or less of a site moves such a figure by several points. The measurement is `asfda "
        f"benchmark --scenario {report['config']['scenario']}` (5 seeds, paired intervals, a labels-only control)."
    )
    return "\n".join(lines) + "\n"


def demo_plot(report: dict, path: Path) -> Path:
    names = report["class_names"][1:] + ["mean"]
    fig, ax = new_figure(7, 4)
    width = 0.27
    for k, (key, colour) in enumerate((("source", "#9e9e9e"), ("random", "#5b8db8"), ("asfda", "#d62728"))):
        values = [100 * v for v in report["dice"][key]] + [100 * report["mean_dice"][key]]
        ax.bar(
            np.arange(len(names)) + (k - 1) * width,
            values,
            width,
            color=colour,
            label={"source": "source model", "random": "random selection", "asfda": "ASFDA"}[key],
        )
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("Dice on the test set (%)")
    ax.set_ylim(0, 100)
    ax.set_title(
        f"{report['config']['budget']} labelled volumes of {report['config']['pool']} "
        f"(one pool, seed {report['config']['seed']})"
    )
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
