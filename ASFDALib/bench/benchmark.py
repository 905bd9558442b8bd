"""The active-learning benchmark: every query strategy, the same fine-tuning recipe, budgets x seeds,
Dice on a disjoint labelled test set; JSON, a Markdown table and a plot.

Two kinds of data, one protocol: generated phantoms (``asfda benchmark --out OUT``; the scenario picks
which), or a research group's own labelled folders (``asfda benchmark --model M --pool DIR --test DIR``),
each holding ``images/`` and ``labels/`` with the same file names. A folder may carry ``cases.json``
(``{"cases": [{"name", "site", "subgroup"}]}``, what the phantom writer puts there): Dice is then also
reported per site and per subgroup. The statistics (paired difference to random per seed, bootstrap
interval) are :mod:`ASFDALib.bench.statistics`.

Runs are appended to ``results.json`` as they finish, so an interrupted benchmark resumes; a training
whose query, seed and recipe equal one already run is not repeated (its result is reused and marked).
A resume requires the same protocol: options, and the same bytes of model, card and every data file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from ASFDALib.adaptation.blend import blend_state
from ASFDALib.adaptation.patches import Case, load_case
from ASFDALib.adaptation.pseudo import selective_pseudo_labels
from ASFDALib.adaptation.recipe import (
    FinetuneConfig,
    handover_share,
    may_blend,
    stage2_augment,
    stage2_mix,
    stage2_teacher,
)
from ASFDALib.adaptation.runs import STAGE2_BEFORE_RECORDED
from ASFDALib.adaptation.trainer import ProgressFn, Trainer
from ASFDALib.atomic import atomic_write, atomic_write_json, atomic_write_text
from ASFDALib.bench import statistics
from ASFDALib.checkpoints import class_map_from_names
from ASFDALib.data.labels import validate_label
from ASFDALib.data.volumes import content_hash, has_image_suffix
from ASFDALib.errors import ASFDAError
from ASFDALib.evaluation.metrics import dice_per_class
from ASFDALib.inference.predict import predict_label
from ASFDALib.models.loading import LoadedModel, ModelSource
from ASFDALib.plotting import draw_or_explain, new_figure, save_figure
from ASFDALib.query.ranking import RankConfig, rank_folder
from ASFDALib.query.selection import DEFAULT_FUSION

QUERY_ROWS = ("random", "fg-random", "entropy", "epistemic", "coreset", "typiclust", "clasp-pe", "dkd", "asd", "asfda")
ROWS = ("source", *QUERY_ROWS, "asfda+ssft", "ssft-control", "full")
LABELS = {
    "source": "source model, no adaptation",
    "random": "random",
    "fg-random": "foreground-aware random",
    "entropy": "entropy (whole volume)",
    "epistemic": "MC-dropout epistemic (5 passes)",
    "coreset": "Core-set",
    "typiclust": "TypiClust (typical volume per uncovered cluster)",
    "clasp-pe": "ClaSP PE (class-stratified noised entropy)",
    "dkd": "DKD only",
    "asd": "ASD only",
    "asfda": "ASFDA (DKD + ASD)",
    "asfda+ssft": "ASFDA + selective semi-supervised fine-tuning (stage 2: +{extra:.0%} iterations)",
    "ssft-control": "ASFDA, labels only, as many iterations as ASFDA + SSFT (the pseudo-labels' control)",
    "full": "fully supervised, whole pool (upper bound)",
}


# Strategies whose query changes with the seed (so each seed ranks anew) and those whose query depends on
# the budget (ranked once per budget instead of one ranking cut at every budget).
SEEDED = ("random", "fg-random", "typiclust", "clasp-pe")
# Rows that train on ASFDA's query with another recipe, and the row each is paired with in the summary.
ASFDA_RECIPES = ("asfda+ssft", "ssft-control")
CONTROLS = {"asfda+ssft": "ssft-control"}
PER_BUDGET = ("typiclust",)
SCENARIOS = ("mri", "ct-shift", "mri-rich")
# the source model each five-class scenario was built for (shipped in Resources/BenchmarkModels)
SCENARIO_MODELS = {"ct-shift": "ct_source_batch.pt", "mri-rich": "ct_source_batch_percentile.pt"}
HEADROOM = 1.0  # Dice points an upper bound should clear every budgeted row by (benchmark.md warns below it)
LAYOUT_FIX = "each folder needs images/ and labels/ with the same file names (the layout `asfda phantoms` writes)"


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
    reliability: str = FinetuneConfig.reliability  # adaptation/pseudo.py: "confidence", "flips", "rounds"
    min_agreement: float = FinetuneConfig.min_agreement  # the agreement gates' volume floor
    fallback: str = FinetuneConfig.fallback  # the gate that judges when ``reliability`` keeps no volume
    stage2_lr: str = FinetuneConfig.stage2_lr  # adaptation/recipe.py STAGE2_LR; the control's last part too
    pseudo_augment: str = FinetuneConfig.pseudo_augment  # one of AUGMENTS (adaptation/patches.py)
    teacher: str = FinetuneConfig.teacher  # adaptation/recipe.py TEACHERS (resolved once the gate has judged)
    pseudo_mix: str = FinetuneConfig.pseudo_mix  # adaptation/recipe.py MIXES (where the fixed teacher labels)
    ema_weight: float = FinetuneConfig.ema_weight  # the loss weight of the patches an EMA teacher labels
    blend_start: float = FinetuneConfig.blend_start  # the start's share of the model handed over (adaptation/blend.py)


def row_labels(extra_fraction: float = SSFTOptions.extra_fraction) -> dict[str, str]:
    """Each row's name in tables and plots, the SSFT row's with stage 2's length as it ran (``extra_fraction``
    of the iterations on top of stage 1: :attr:`SSFTOptions.extra_fraction`)."""
    return {**LABELS, "asfda+ssft": LABELS["asfda+ssft"].format(extra=extra_fraction)}


# fields SSFTOptions gained later, at the values the runs recorded before them ran with
SSFT_LATER_FIELDS = {
    **STAGE2_BEFORE_RECORDED,  # stage 2's rate, augmentation, teacher and mix, as the session records take them
    "reliability": "confidence",
    "min_agreement": 0.5,
    "fallback": "none",
    "ema_weight": 1.0,
    "blend_start": 0.0,
}


@dataclass
class BenchmarkConfig:
    pool: int = 40
    test: int = 20
    budgets: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    iterations: int = 300
    # The upper bound's iterations (None: ``iterations``): the whole pool converges later than a few labels do,
    # and an upper bound short of convergence cannot tell how far the budgeted rows are from it.
    full_iterations: int | None = None
    rows: tuple[str, ...] = ROWS
    device: str = "auto"
    data_seed: int = 1000
    ssft: SSFTOptions = field(default_factory=SSFTOptions)
    validation: int = 0  # phantom validation volumes (0: none); the user's mode takes a folder instead
    eval_at: tuple[int, ...] = ()  # stage-1 iterations at which validation Dice is recorded (learning curves)
    scenario: str = "ct-shift"  # phantom data: see SCENARIOS and write_data (on the user's folders none applies)
    # The recipe's learning rates (None: adaptation/recipe.py's defaults), to choose them on validation.
    lr: float | None = None
    encoder_lr_scale: float | None = None
    lower_rate_for: str | None = None  # None: the recipe's (RECIPE.lower_rate_for); in the protocol only when set
    fusion: str = DEFAULT_FUSION  # how the ASFDA rows combine DKD and ASD (query.selection.FUSIONS)

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
    cases: dict[str, list[float]] = field(default_factory=dict)  # test case -> Dice per class
    validation: list[float] | None = None  # Dice per class on the validation split, when there is one
    curve: dict[str, float] = field(default_factory=dict)  # stage-1 iteration -> mean validation Dice
    shared_with: str = ""  # "row@budget" whose identical training this run reused
    # the volumes stage 2 pseudo-labelled (an SSFT run; None: another row, or recorded before this was kept)
    pseudo_labelled: list[str] | None = None
    # the gate that judged them: the one asked for, or its fallback where that kept no volume
    pseudo_gate: str = ""
    # the starting weights' share of the model handed over (SSFT and control runs; None: recorded before it was kept)
    blend: float | None = None


@dataclass
class Folders:
    """Where the labelled data of one benchmark lives (pool, test and optional validation folders)."""

    pool: Path
    test: Path
    validation: Path | None = None


def _pairs(folder: Path) -> list[str]:
    """The volume file names of ``folder/images`` (other files, such as a README, are not cases)."""
    return sorted(p.name for p in (folder / "images").iterdir() if not p.name.startswith(".") and has_image_suffix(p))


def _named(folders: Folders) -> list[tuple[str, Path]]:
    named = [("--pool", folders.pool), ("--test", folders.test)]
    return named + ([("--validation", folders.validation)] if folders.validation is not None else [])


def refuse_out_inside(out: Path, folders: Folders) -> None:
    """Refuse an output folder inside an input one (its files would be among the cases), before any is written."""
    for option, folder in _named(folders):
        if Path(out).resolve().is_relative_to(folder.resolve()):
            raise ASFDAError(f"{out}: --out is inside the {option} folder {folder}; write the results elsewhere")


def validate_folders(folders: Folders, budgets: tuple[int, ...], class_names: list[str] | None = None) -> None:
    """Refuse, before any work, folders the protocol cannot use; one line naming the folder and the fix.

    With ``class_names`` every label is checked as ``asfda labels import`` checks it (the image's grid in
    world space, values that are the model's classes). An output folder inside them: :func:`refuse_out_inside`.
    """
    named = _named(folders)
    for option, folder in named:
        if not folder.is_dir():
            raise ASFDAError(f"{folder}: {option} folder not found; {LAYOUT_FIX}")
        for sub in ("images", "labels"):
            if not (folder / sub).is_dir():
                raise ASFDAError(f"{folder}: no {sub}/ folder; {LAYOUT_FIX}")
        images = set(_pairs(folder))
        labels = {p.name for p in (folder / "labels").iterdir() if not p.name.startswith(".") and has_image_suffix(p)}
        if not images:
            raise ASFDAError(f"{folder / 'images'}: no volumes; {LAYOUT_FIX}")
        if images - labels:
            missing = sorted(images - labels)
            raise ASFDAError(
                f"{folder / 'labels'}: no label for {len(missing)} image(s) ({', '.join(missing[:3])}"
                f"{', …' if len(missing) > 3 else ''}); add labels with the images' file names"
            )
        if labels - images:
            extra = sorted(labels - images)
            raise ASFDAError(
                f"{folder / 'labels'}: {len(extra)} label(s) without an image ({', '.join(extra[:3])}"
                f"{', …' if len(extra) > 3 else ''}); remove them or add their images"
            )
    pool = _pairs(folders.pool)
    if max(budgets) >= len(pool):
        raise ASFDAError(
            f"{folders.pool}: {len(pool)} pool volumes cannot serve a budget of {max(budgets)} "
            "(every budget must leave unlabelled volumes); use smaller --budgets or a larger pool"
        )
    for option, other in named[1:]:
        for name in sorted(set(pool) & set(_pairs(other))):
            if _digest(folders.pool / "images" / name) == _digest(other / "images" / name):
                raise ASFDAError(
                    f"{other / 'images' / name}: the same volume is in the pool; {option} must hold other cases"
                )
    if class_names is not None:
        for _, folder in named:
            for name in _pairs(folder):
                validate_label(folder / "labels" / name, folder / "images" / name, class_names)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else str(path.stat().st_mtime_ns)


def load_cases(folder: Path, card) -> list[Case]:
    """Every image of ``folder/images`` with its label from ``folder/labels``, at the model's spacing."""
    return [load_case(n, folder / "images" / n, folder / "labels" / n, card) for n in _pairs(folder)]


def fingerprints(source: ModelSource, card, folders: Folders) -> dict:
    """What the runs were made from, by content: the model file, its card, the ``--network`` and the pairs a
    class map changes where given, and every image and label file.

    Part of the protocol, so a resume after a new model, an edited card or a corrected label is refused
    (naming what changed) instead of reusing runs of the old inputs.
    """
    files = {
        f"{role}/{sub}/{name}": content_hash(folder / sub / name)
        for role, folder in (("pool", folders.pool), ("test", folders.test), ("validation", folders.validation))
        if folder is not None
        for name in _pairs(folder)
        for sub in ("images", "labels")
    }
    return {
        "model": content_hash(source.path),
        "card": card_digest(card),
        **_built_as(source, card),
        "files": files,
    }


def card_digest(card) -> str:
    """The card's SHA-256 as cards store it (nonzero, clip and axcodes only where they differ from before), so
    runs fingerprinted before those settings existed resume with the same card; source_classes as it always was."""
    text = json.dumps({**card.to_dict(), "source_classes": card.source_classes}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _built_as(source: ModelSource, card) -> dict:
    """What of the model the options chose beyond its file and card: the network a state dict is built as
    (``--network``: its card need not name it) and the head rows the classes start from where a class map changes
    them (:func:`_mapped_otherwise`); each absent where not given, as before either was a choice."""
    built: dict = {"network": {"name": source.network.name, "args": source.network.args}} if source.network else {}
    if changed := _mapped_otherwise(card, source.class_map):
        built["class_map"] = changed
    return built


def _mapped_otherwise(card, class_map: str | None) -> str:
    """The pairs ``class_map`` changes from the card's name pairs, ``target=source`` (``target=``: started anew)
    in class order: what two spellings of one map have in common ("" where it changes none)."""
    if not class_map or not card.source_classes:
        return ""
    by_name = class_map_from_names(card.class_names, card.source_classes)
    given = class_map_from_names(card.class_names, card.source_classes, class_map)
    return ",".join(
        f"{name}={card.source_classes[given[i]] if i in given else ''}"
        for i, name in enumerate(card.class_names)
        if given.get(i) != by_name.get(i)
    )


def case_groups(folders: list[Path]) -> dict[str, dict[str, str]]:
    """{"site": {case: site}, "subgroup": {case: subgroup}} from the folders' ``cases.json`` (empty if none)."""
    groups: dict[str, dict[str, str]] = {"site": {}, "subgroup": {}}
    for folder in folders:
        path = folder / "cases.json"
        if not path.is_file():
            continue
        for case in json.loads(path.read_text()).get("cases", []):
            for kind in groups:
                if case.get(kind) is not None:
                    groups[kind][case["name"]] = str(case[kind])
    return {k: v for k, v in groups.items() if v}


def evaluate_cases(
    model: LoadedModel, network: torch.nn.Module, cases: list[Case], device: str
) -> dict[str, list[float]]:
    """Dice per foreground class of every case (NaN where a class is absent from both maps)."""
    return {
        case.name: [
            float(v)
            for v in dice_per_class(
                predict_label(network, case.image, model.card, device), case.label, model.card.num_classes
            )
        ]
        for case in cases
    }


def _class_means(per_case: dict[str, list[float]]) -> list[float]:
    values = np.array(list(per_case.values()), dtype=np.float64)
    return [
        float(np.nanmean(values[:, c])) if np.isfinite(values[:, c]).any() else float("nan")
        for c in range(values.shape[1])
    ]


def evaluate(model: LoadedModel, network: torch.nn.Module, cases: list[Case], device: str) -> list[float]:
    """Mean Dice per foreground class over ``cases`` (a class absent from both maps is skipped)."""
    return _class_means(evaluate_cases(model, network, cases, device))


def train(
    source: ModelSource,
    labelled: list[Case],
    pool: list[Case],
    iterations: int,
    seed: int,
    device: str,
    ssft: SSFTOptions | None,
    workdir: Path,
    eval_at: tuple[int, ...] = (),
    on_eval: Callable[[int, torch.nn.Module], None] | None = None,
    rates: dict[str, float | str] | None = None,
    pseudo_labels: bool = True,
    stage1_cache: Path | None = None,
    progress: ProgressFn | None = None,
) -> tuple[torch.nn.Module, list[str], str, float]:
    """The same recipe for every row: ``iterations`` on the labels; SSFT adds stage 2 as ``ssft`` says.

    Returns the trained network, the pool volumes stage 2 pseudo-labelled (most reliable first), the gate
    that judged the pool (the fallback where the asked one kept none, even if it kept none too; "" when no
    pseudo-labels were asked for) and the starting weights' share of the network handed over: ``ssft``'s
    ``blend_start`` where the ``rounds`` gate kept volumes, as in a session; the control blends where its SSFT
    twin does (the gate judges its pool too, its labels unused), so the two differ only by the pseudo-labels.

    ``pseudo_labels=False`` runs stage 2 on the labels alone: the control of a stage 2 whose rate decays.
    ``stage1_cache`` (a folder) keeps each labelled set's stage-1 state (network, optimizer, random state):
    a later row with the same labels and seed resumes from it, which an exact resume makes the same
    training as running stage 1 again (the ASFDA row, its SSFT row and their control share one stage 1).

    ``rates`` overrides the recipe's ``lr`` / ``encoder_lr_scale`` / ``lower_rate_for``; ``progress`` hears
    each step of stage 1 (and of stage 2), as the trainer reports it.
    ``on_eval(iteration, network)`` is called at each of ``eval_at`` during stage 1 (training continues from
    there with the same batches an uninterrupted run draws, so the curve costs only its evaluations).
    """
    model = source.load()
    network, card = model.network, model.card
    blends = ssft is not None and may_blend(ssft.blend_start, ssft.reliability)
    # a copy of the starting weights for the handover's blend, only where one may apply
    start_state = {k: v.detach().clone() for k, v in network.state_dict().items()} if blends else {}
    # what stage 2 reads from the trainer's recipe (an EMA teacher's voxel gate is the options' confidence)
    read = ("stage2_lr", "pseudo_augment", "teacher", "pseudo_mix", "confidence", "ema_weight")
    stage2 = {k: getattr(ssft, k) for k in read} if ssft else {}
    config = FinetuneConfig(seed=seed, device=device, checkpoint_every=10**9, **(rates or {}), **stage2)
    # the learning rates the session path uses: by what the checkpoint loaded (one recipe for every row)
    trainer = Trainer(network, card, config, workdir, model.load_report)
    first = round(iterations * ssft.stage1_fraction) if ssft else iterations
    cached = _stage1_file(stage1_cache, source, card, labelled, config) if stage1_cache else None
    stops = sorted(i for i in eval_at if 0 < i < first)
    if cached and cached.is_file() and not stops:
        if torch.load(cached, map_location="cpu", weights_only=True)["iteration"] <= first:
            trainer.load(cached)
    for stop in stops:
        trainer.run(labelled, stop)
        if on_eval:
            on_eval(stop, network.eval())
    trainer.run(labelled, first, progress=progress)
    if cached and not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, lambda tmp: shutil.copyfile(trainer.last_path, tmp))
    pseudo: list[Case] = []
    judged = ""
    made = None
    if ssft and (pseudo_labels or blends):
        names = {c.name for c in labelled}
        candidates = [(c.name, c.image) for c in pool if c.name not in names]
        # round 1 of a session starts from the source model: "rounds" compares with it
        reference = source.load().network if ssft.reliability == "rounds" else None
        made = selective_pseudo_labels(
            network,
            card,
            [c.image for c in labelled],
            candidates,
            ssft.keep_fraction,
            ssft.confidence,
            device,
            ssft.reliability,
            ssft.min_agreement,
            reference,
            ssft.fallback if pseudo_labels else "none",  # the control asks only whether the start vouched
        )
    if made is not None and pseudo_labels:
        by_name = {c.name: c for c in pool}
        pseudo = [Case(n, by_name[n].image, label) for n, label in made.labels.items()]
        judged = made.gate
        teacher = stage2_teacher(ssft.teacher, bool(made.asked))
        trainer.config = replace(
            config,
            teacher=teacher,
            pseudo_augment=stage2_augment(ssft.pseudo_augment, bool(made.asked)),
            pseudo_mix=stage2_mix(ssft.pseudo_mix, teacher),
        )
    if ssft:
        trainer.begin_stage("stage2")
        trainer.run(
            labelled, iterations - first + round(iterations * ssft.extra_fraction), pseudo or None, progress=progress
        )
    blend = handover_share(ssft.blend_start, made.gate, len(made.kept)) if blends else 0.0
    if blend:
        fresh = model.load_report.new if model.load_report else []
        network.load_state_dict(blend_state(network.state_dict(), start_state, blend, fresh))
    return network.eval(), [c.name for c in pseudo], judged, blend


def _stage1_file(folder: Path, source: ModelSource, card, labelled: list[Case], config: FinetuneConfig) -> Path:
    """Where ``train`` keeps the stage-1 state of these labels: named for everything stage 1 depends on (the
    model file, its card, the network a state dict is built as, the head rows a class map changes, the recipe)."""
    stage1 = ("seed", "batch_size", "lr", "encoder_lr_scale", "lower_rate_for", "weight_decay", "foreground_ratio")
    recipe = {k: getattr(config, k) for k in (*stage1, "amp")}
    key = {"model": str(source.path.resolve()), "card": card_digest(card), **_built_as(source, card)}
    key |= {"labels": sorted(c.name for c in labelled), **recipe}
    return folder / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.pt"


def _summary(runs: list[Run], config: BenchmarkConfig) -> dict:
    """benchmark.json's summary (fractions, keyed "row@budget"); summary.json has percent, per class by name."""
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


def _order(entries: list[dict]) -> list[dict]:
    return sorted(entries, key=lambda s: (s["row"] == "full", s["budget"], ROWS.index(s["row"])))


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _no_interval(diff: dict) -> str:
    return f" [{_seeds(len(diff['seeds']))}: no interval below {statistics.MIN_INTERVAL_VALUES}]"


def _ssft_note(config: BenchmarkConfig, runs: list[Run]) -> str:
    """How the SSFT row and its control trained, under the table that reports them, and how many volumes
    the gate let through at each budget (a gate that keeps none trains the control's model)."""
    if "asfda+ssft" not in config.rows and "ssft-control" not in config.rows:
        return ""
    o = config.ssft
    gate = f"{o.reliability} gate" + (f" (floor {o.min_agreement})" if o.reliability != "confidence" else "")
    fallback = _falls_back(o.reliability, o.fallback)
    if fallback:
        gate += f", the {o.fallback} gate where it keeps no volume"
    augment = {
        "strong": ", strongly augmented",
        "remap": ", strongly augmented and through random intensity curves",
        "remap-if-fallback": ", strongly augmented (and through random intensity curves where the fallback judged)",
    }.get(o.pseudo_augment, "")
    ema = _ema_labels(o.teacher, o.reliability, o.fallback)
    if ema:
        augment += ", an EMA teacher relabelling them online" + " where the fallback judged" * (o.teacher != "ema")
        augment += f", at weight {o.ema_weight:g}" if o.ema_weight != 1 else ""
    if o.pseudo_mix == "copy-paste" and o.teacher != "ema":
        augment += (
            ", mixed with the labelled patches (bidirectional copy-paste)" + " where the fixed teacher labels" * ema
        )
    control = "a second stage on the labels alone" if o.stage2_lr != "constant" else "one longer stage"
    if o.extra_fraction != SSFTOptions.extra_fraction:  # said where not the default, which the tables ran
        second = round(config.iterations * o.extra_fraction)
        augment += f", {second} stage-2 iterations after stage 1's {config.iterations}"
    kept = []
    for budget in config.budgets:
        counts = [
            f"{len(r.pseudo_labelled)} (seed {r.seed}"
            + (f", by the {r.pseudo_gate} gate" if r.pseudo_gate and r.pseudo_gate != o.reliability else "")
            + ")"
            for r in sorted(runs, key=lambda r: r.seed)
            if r.row == "asfda+ssft" and r.budget == budget and r.pseudo_labelled is not None
        ]
        if counts:
            kept.append(f"{budget} labels: {', '.join(counts)}")
    # a control that shares the training of an SSFT run in this table (one merged from other runs may not)
    empty = {(r.budget, r.seed) for r in runs if r.row == "asfda+ssft" and r.pseudo_labelled == []}
    shared = any(
        r.row == "ssft-control" and r.shared_with.startswith("asfda+ssft@") and (r.budget, r.seed) in empty
        for r in runs
    )
    blended = [r for r in runs if r.row in ("asfda+ssft", "ssft-control") and r.blend is not None]
    blend = (
        f"Handed over as (1 - s) x tuned + s x starting weights, s = {o.blend_start:g} where the rounds gate kept "
        f"volumes (the control where its twin's did): {sum(1 for r in blended if r.blend)} of {len(blended)} "
        "runs blended.\n"
        if may_blend(o.blend_start, o.reliability)
        else ""
    )
    # where the mix hangs on which gate judged (an EMA teacher's patches are not mixed), which runs it reached
    judged = [r for r in runs if r.row == "asfda+ssft" and r.pseudo_labelled and r.pseudo_gate]
    mixed = [
        r
        for r in judged
        if stage2_mix(o.pseudo_mix, stage2_teacher(o.teacher, r.pseudo_gate != o.reliability)) != "none"
    ]
    mixes = (
        f"Pseudo-labelled patches mixed (copy-paste) in {len(mixed)} of {len(judged)} SSFT runs that kept volumes.\n"
        if o.pseudo_mix != "none" and o.teacher == "ema-if-fallback" and judged
        else ""
    )
    return (
        f"\nASFDA + SSFT: {gate}, at most {o.keep_fraction:.0%} of the pool pseudo-labelled{augment}, stage 2's "
        f"learning rate {o.stage2_lr}; its control trains {control}.\n"
        + blend
        + mixes
        + (f"Volumes pseudo-labelled (the runs that recorded it): {'; '.join(kept)}.\n" if kept else "")
        + (
            "Where the gate kept no volume the SSFT run trained the control's model, and the control shares it.\n"
            if shared
            else ""
        )
    )


def _upper_bound_note(config: BenchmarkConfig, summary: list[dict]) -> str:
    """How long the upper bound trained, where not as long as the budgeted rows, and whether it is one: a
    whole-pool model within ``HEADROOM`` of a budgeted row has likely not converged, and "x% of the upper
    bound" then says little."""
    labels = row_labels(config.ssft.extra_fraction)
    full = next((s for s in summary if s["row"] == "full"), None)
    if full is None:
        return ""
    note = ""
    if _upper_bound_differs(config):
        n = row_iterations("full", config)
        note += (
            f"\nThe upper bound trained {n} iterations, the budgeted rows {config.iterations} "
            "(ASFDA + SSFT and its control half as many again).\n"
        )
    budgeted = [s for s in summary if s["row"] not in ("source", "full")]
    best = max(budgeted, key=lambda s: s["mean_dice"], default=None)
    if best is not None and full["mean_dice"] - best["mean_dice"] < HEADROOM:
        note += (
            f"\nThe upper bound ({full['mean_dice']:.1f}) is not clearly above every budgeted row "
            f"({labels[best['row']]}, budget {best['budget']}: {best['mean_dice']:.1f}): it may not have converged. "
            "Train it longer with --full-iterations, chosen on the validation curves "
            "(--rows full --full-iterations 3200 --eval-at 400,800,1600,2400).\n"
        )
    return note


def markdown(summary: list[dict], class_names: list[str], labels: dict[str, str] | None = None) -> str:
    """The table: mean ± sd over seeds per class and overall, and the paired difference to random (a column
    only when a random row ran: without one there is nothing to pair with, and the table says so)."""
    labels = labels or row_labels()
    paired = any(s.get("diff_vs_random") for s in summary)
    head = "| method | budget | seeds | " + " | ".join(class_names[1:]) + " | mean Dice |"
    head += " Δ vs random [95% CI] |" if paired else ""
    lines = [head, "|" + "---|" * (len(class_names) + 3 + paired)]
    for s in _order(summary):
        budget = "all" if s["row"] == "full" else str(s["budget"])
        cells = [f"{m:.1f}" for m in s["per_class"]]
        diff = s.get("diff_vs_random")
        delta = ""
        if diff:
            ci = diff["ci95"]
            delta = f"{diff['mean']:+.1f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else _no_interval(diff))
        lines.append(
            f"| {labels[s['row']]} | {budget} | {len(s['seeds'])} | "
            + " | ".join(cells)
            + f" | **{s['mean_dice']:.1f} ± {s['sd_dice']:.1f}** |"
            + (f" {delta} |" if paired else "")
        )
    if not paired:
        if any(s["row"] == "random" for s in summary):  # random alone, or beside rows without a budget
            lines += ["", "No query row ran beside random, so no difference to random."]
        else:
            lines += ["", "No random row ran, so no difference to random (add `random` to --rows for one)."]
    controlled = [s for s in _order(summary) if s.get("diff_vs_control")]
    if controlled:
        lines += ["", "Paired difference to the row's control (same query, seed and iterations):", ""]
        for s in controlled:
            d = s["diff_vs_control"]
            ci = f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else _no_interval(d)
            lines.append(
                f"- {labels[s['row']]}, budget {s['budget']}: {d['mean']:+.1f}{ci} vs {labels[d['row']]}"
                f" ({_seeds(len(d['seeds']))})"
            )
    challenged = [s for s in _order(summary) if s.get("diff_vs_queries")]
    if challenged:
        lines += ["", "ASFDA against every other query row (paired by seed: ASFDA minus the row):", ""]
        for s in challenged:
            pairs = []
            for other, d in sorted(s["diff_vs_queries"].items(), key=lambda kv: kv[1]["mean"]):
                ci = f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else _no_interval(d)
                pairs.append(f"{labels[other]} {d['mean']:+.1f}{ci}")
            lines.append(f"- budget {s['budget']}: " + "; ".join(pairs))
    groups = [
        (kind, sorted({g for s in summary for g in s.get("per_group", {}).get(kind, {})}))
        for kind in ("site", "subgroup")
    ]
    groups = [(k, names) for k, names in groups if names]
    if groups:
        cols = [(k, g) for k, names in groups for g in names]
        lines += ["", "Mean Dice per site and subgroup of the test cases (mean over seeds):", ""]
        lines.append("| method | budget | " + " | ".join(f"{k} {g}" for k, g in cols) + " |")
        lines.append("|" + "---|" * (len(cols) + 2))
        for s in _order(summary):
            per = s.get("per_group", {})
            cells = [f"{per[k][g]['mean']:.1f}" if g in per.get(k, {}) else "" for k, g in cols]
            budget = "all" if s["row"] == "full" else str(s["budget"])
            lines.append(f"| {labels[s['row']]} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], config: BenchmarkConfig, path: Path, pool_size: int, test_size: int) -> Path:
    """Mean Dice (± sd over seeds) against the budget, one line per query row; source and upper bound flat."""
    labels = row_labels(config.ssft.extra_fraction)
    fig, ax = new_figure(7.5, 5)
    budgets = list(config.budgets)
    by_key = {(s["row"], s["budget"]): s for s in summary}
    for row in config.rows:
        if row in ("source", "full"):
            s = by_key.get((row, 0))
            if s:
                ax.axhline(
                    s["mean_dice"],
                    ls="--" if row == "full" else ":",
                    color="k" if row == "full" else "grey",
                    label=labels[row],
                )
            continue
        points = [by_key.get((row, b)) for b in budgets]
        if not any(points):
            continue
        xs = [b for b, p in zip(budgets, points) if p]
        ys = [p["mean_dice"] for p in points if p]
        es = [p["sd_dice"] for p in points if p]
        bold = row.startswith("asfda")
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, lw=2.5 if bold else 1.2, label=labels[row])
    ax.set_xlabel(f"labelled volumes (of a pool of {pool_size})")
    ax.set_ylabel(f"mean Dice on {test_size} test volumes (%)")
    ax.set_xticks(budgets)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def plot_differences(summary: list[dict], config: BenchmarkConfig, path: Path) -> Path:
    """Paired difference to random with its 95% bootstrap interval, per row and budget."""
    labels = row_labels(config.ssft.extra_fraction)
    fig, ax = new_figure(7.5, 5)
    rows = [r for r in config.rows if r not in ("source", "full", "random")]
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        xs, ys, lo, hi = [], [], [], []
        for j, budget in enumerate(config.budgets):
            s = next(
                (e for e in summary if e["row"] == row and e["budget"] == budget and e.get("diff_vs_random")), None
            )
            if not s:
                continue
            d = s["diff_vs_random"]
            ci = d["ci95"] or [d["mean"], d["mean"]]
            xs.append(j + (i - (len(rows) - 1) / 2) * width)
            ys.append(d["mean"])
            lo.append(d["mean"] - ci[0])
            hi.append(ci[1] - d["mean"])
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=labels[row])
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(len(config.budgets)), [str(b) for b in config.budgets])
    ax.set_xlabel("labelled volumes")
    ax.set_ylabel("Dice − random, same seed (points; 95% bootstrap interval)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # random alone has nothing to compare
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_curves(runs: list[Run], path: Path) -> Path:
    """Validation Dice against stage-1 iterations (mean ± sd over seeds), one line per row and budget: is
    training at its plateau (the upper bound above every budgeted row)?"""
    fig, ax = new_figure(7.5, 5)
    keys = sorted({(r.row, r.budget) for r in runs if r.curve}, key=lambda k: (k[0] == "full", k[1], k[0]))
    for row, budget in keys:
        curves = [r.curve for r in runs if (r.row, r.budget) == (row, budget) and r.curve]
        steps = sorted({int(i) for c in curves for i in c})
        values = [[c[str(i)] for c in curves if str(i) in c] for i in steps]
        label = row_labels()[row] + ("" if row == "full" else f", {budget} labelled")
        ax.errorbar(
            steps, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3, label=label
        )
    ax.set_xlabel("fine-tuning iterations (stage 1)")
    ax.set_ylabel("mean Dice on the validation set (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def write_data(data: Path, config: BenchmarkConfig) -> Path:
    """The pool, the disjoint test set (and validation set) under ``data``, for the config's scenario.

    Kept when already there: they are deterministic. ``mri`` is the historical protocol (CT-trained
    model, three MRI-like sites, ellipsoid anatomy); ``mri-rich`` the same sites with the rich anatomy;
    ``ct-shift`` the hospital shift within CT (:mod:`ASFDALib.bench.scenarios`).
    """
    from ASFDALib.bench.phantoms import write_pool

    parts = [("pool", config.pool, config.data_seed), ("test", config.test, config.data_seed + 1)]
    if config.validation:
        parts.append(("validation", config.validation, config.data_seed + 2))
    for part, size, seed in parts:
        if (data / part / "cases.json").is_file():
            continue
        if config.scenario == "mri":
            write_pool(data / part, size, seed=seed, prefix=part)
        elif config.scenario == "mri-rich":
            write_pool(data / part, size, seed=seed, prefix=part, anatomy="rich")
        elif config.scenario == "ct-shift":
            from ASFDALib.bench.scenarios import write_target_split

            write_target_split(data / part, size, seed=seed, prefix=part)
        else:
            raise ASFDAError(f"unknown benchmark scenario {config.scenario!r}; use one of {', '.join(SCENARIOS)}")
    return data


def _plan(config: BenchmarkConfig) -> list[tuple[str, int, int]]:
    # Seed by seed, each with its upper bound: an interrupted benchmark leaves complete seeds behind.
    plan = [("source", 0, 0)] if "source" in config.rows else []
    for s in config.seeds:
        plan += [(row, b, s) for b in config.budgets for row in config.rows if row not in ("source", "full")]
        plan += [("full", 0, s)] if "full" in config.rows else []
    return plan


def options_protocol(config: BenchmarkConfig) -> dict:
    """The part of the protocol the command's options make (the rest names the data and the model)."""
    return {
        "iterations": config.iterations,
        # only where it differs: the tables made before the option resume
        **({"full_iterations": row_iterations("full", config)} if _upper_bound_differs(config) else {}),
        "ssft": _ssft_protocol(asdict(config.ssft)),
        "eval_at": list(config.eval_at),
        "scenario": config.scenario,
        "fusion": config.fusion,
        **_rates(config),
        # which loaded tensors took the lower rate: recorded always, as the recipe's default may change
        "lower_rate_for": lower_rate_rule(config),
    }


def _protocol(config: BenchmarkConfig, folders: Folders, inputs: dict, user_data: bool) -> dict:
    """What must match for earlier runs in results.json to be reused (``inputs``: :func:`fingerprints`); on
    the user's folders the data is theirs, so no phantom scenario is part of it."""
    options = options_protocol(config)
    if user_data:
        options.pop("scenario")
    return {
        **options,
        "pool": str(folders.pool.resolve()),
        "test": str(folders.test.resolve()),
        "validation": str(folders.validation.resolve()) if folders.validation else None,
        **inputs,
    }


def _ssft_protocol(ssft: dict) -> dict:
    """The SSFT options that make a run what it is: where no EMA teacher can label (the fixed teacher; an
    EMA teacher only where a fallback judges, and none can) its weight is not one of them, where only an EMA
    teacher labels no mix is, and where the ``rounds`` gate is not asked no start vouches, so no blend share is,
    and tables made before any of them was a choice resume under any value."""
    reliability = ssft.get("reliability", "confidence")
    ema = _ema_labels(ssft.get("teacher", "fixed"), reliability, ssft.get("fallback", "none"))
    unused = ({"ema_weight"} if not ema else set()) | ({"blend_start"} if reliability != "rounds" else set())
    unused |= {"pseudo_mix"} if ssft.get("teacher") == "ema" else set()
    return {k: v for k, v in ssft.items() if k not in unused}


def _falls_back(reliability: str, fallback: str) -> bool:
    """Whether a fallback gate can judge: the confidence gate always keeps some volume."""
    return fallback not in ("none", reliability) and reliability != "confidence"


def _ema_labels(teacher: str, reliability: str, fallback: str) -> bool:
    """Whether an EMA teacher can label the SSFT row's patches under these options."""
    return teacher == "ema" or (teacher == "ema-if-fallback" and _falls_back(reliability, fallback))


def stored_protocol(protocol: dict) -> dict:
    """A results.json protocol in today's terms: the options recorded before they were choices, as they ran."""
    protocol = dict(protocol)
    # runs recorded before the fusion was a choice combined DKD and ASD by the summed ranks
    protocol.setdefault("fusion", "sum")
    # and before the lower-rate rule was a choice, the loaded tensors of the encoder took it
    protocol.setdefault("lower_rate_for", "encoder")
    # and before pseudo-labels had an agreement gate, they were gated by confidence (SSFT_LATER_FIELDS)
    if isinstance(protocol.get("ssft"), dict):
        protocol["ssft"] = _ssft_protocol({**SSFT_LATER_FIELDS, **protocol["ssft"]})
    return protocol


def _load_runs(results_path: Path, protocol: dict) -> list[Run]:
    """The runs of ``results_path`` (none where it is not there yet), refused in one line where they were made
    under another ``protocol`` (naming what changed)."""
    if not results_path.is_file():
        return []
    stored = json.loads(results_path.read_text())
    if stored.get("protocol") is not None:
        stored["protocol"] = stored_protocol(stored["protocol"])
        # runs recorded before inputs were fingerprinted are taken to be of these inputs
        for key in ("model", "card", "files"):
            if key in protocol:
                stored["protocol"].setdefault(key, protocol[key])
        # and runs on the user's folders recorded the scenario then default, which their data never used
        if "scenario" not in protocol:
            stored["protocol"].pop("scenario", None)
    if stored.get("protocol") not in (None, protocol):
        raise ASFDAError(
            f"{results_path}: its runs were made with other {_changes(stored['protocol'], protocol)}; "
            "use another --out, or the options and inputs of that run to resume it"
        )
    return [Run(**r) for r in stored["runs"]]


def _changes(stored: dict, current: dict, nested: bool = False) -> str:
    """What differs between two protocols, as a reader needs it: options with both values, files by name."""
    parts = []
    # a key in only one of them counts too: a rate given on one run and left to the default on the other;
    # inside the SSFT options a one-sided key follows from the others (the EMA teacher's weight is part of the
    # protocol only where one can label), so it is named only when nothing else differs
    differ = [k for k in set(stored) | set(current) if stored.get(k) != current.get(k)]
    if nested and any(k in stored and k in current for k in differ):
        differ = [k for k in differ if k in stored and k in current]
    for key in sorted(differ):
        if key == "files":
            before, now = stored.get(key) or {}, current.get(key) or {}
            names = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
            parts.append(f"data files ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})")
        elif key in ("model", "card"):
            parts.append(f"{key} file contents")
        elif key == "extra_fraction" and nested and key in stored and key in current:  # as --pseudo-iterations
            parts.append(
                f"stage 2 length (--pseudo-iterations: {stored[key]:g} x --iterations here, {current[key]:g} x now)"
            )
        elif isinstance(stored.get(key), dict) and isinstance(current.get(key), dict):
            parts.append(f"{key} {_changes(stored[key], current[key], nested=True)}")  # e.g. ssft stage2_lr (…)
        elif key not in stored:  # the default then may not be the default now, so the two are other runs
            parts.append(f"{key} (left to the default when these runs were made, {current[key]} now: leave it out)")
        elif key not in current:
            parts.append(f"{key} ({stored[key]} here, the default now: give it again)")
        else:
            parts.append(f"{key} ({stored[key]} here, {current[key]} now)")
    return "; ".join(parts)


def run_benchmark(
    out: Path,
    config: BenchmarkConfig,
    source: ModelSource,
    progress: Callable[[int, int, str], None] | None = None,
    run: bool = True,
    folders: Folders | None = None,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Run (or resume) the protocol into ``out``; returns the report written to ``benchmark.json``.

    ``folders`` is the user's data (validated before any work); without it the phantom data of
    ``config.scenario`` are written to ``out/data``. ``run=False`` only summarises the runs already in
    ``results.json`` (a partial benchmark's report). ``say`` gets one-line notices (a resume).
    """
    out = Path(out)
    start = time.perf_counter()
    results_path = out / "results.json"
    if folders is not None:  # before any work, a report's too: its files would be among the cases
        refuse_out_inside(out, folders)
    if not run:
        if not results_path.is_file():
            raise ASFDAError(
                f"{results_path}: not found, so there are no runs to report; give the --out a benchmark wrote, or "
                "run the benchmark without --report-only"
            )
        stored = json.loads(results_path.read_text())
        runs = [Run(**r) for r in stored["runs"]]
        recorded = (stored.get("protocol") or {}).get("model")
        if recorded and source.path.is_file() and content_hash(source.path) != recorded:  # the report names it
            raise ASFDAError(
                f"{source.path}: not the model the runs in {results_path} were made with; give that one as --model"
            )
        # the class names the runs were scored with (the model is loaded only for results.json written without)
        names = stored.get("class_names") or source.load().card.class_names
        data = folders or _phantom_folders(out / "data", config)
        # the notes state what ran, not what is typed
        asked = config.rows
        config = as_run(config, stored.get("protocol") or {}, runs)
        if not config.rows:
            ran = ", ".join(r for r in ROWS if any(run.row == r for run in runs))
            raise ASFDAError(
                f"{results_path}: none of the rows asked for ran ({', '.join(asked)}); it holds {ran}: give --rows "
                "among those, or leave --rows out"
            )
        return _report(out, config, runs, names, start, source.path, data, user_data=folders is not None)
    model = source.load()
    model_card = model.card
    if say and model.load_report is not None:  # what the checkpoint gave every row: as asfda rank says it
        say(f"Weights: {model.load_report.summary}")
    user_data = folders is not None
    if folders is not None:
        validate_folders(folders, config.budgets, model_card.class_names)
    else:
        _check_scenario(out / "data", config)
        write_data(out / "data", config)
        folders = _phantom_folders(out / "data", config)
    protocol = _protocol(config, folders, fingerprints(source, model_card, folders), user_data)
    runs = _load_runs(results_path, protocol)
    done = {(r.row, r.budget, r.seed) for r in runs}
    plan = _plan(config)
    already = sum(key in done for key in plan)
    if already and say:
        say(f"resuming: {already} of {len(plan)} runs are already in {results_path}; {len(plan) - already} to run")
    pool, test = load_cases(folders.pool, model_card), load_cases(folders.test, model_card)
    validation = load_cases(folders.validation, model_card) if folders.validation else []

    def record() -> None:
        atomic_write_json(results_path, _results(config, protocol, runs, model, user_data))

    orders: dict[tuple[str, int, int], list[str]] = {}
    for i, (row, budget, seed) in enumerate(plan):
        if (row, budget, seed) in done:
            continue  # a resume reports only the runs it makes
        if progress:
            progress(i, len(plan), f"{row} budget {budget} seed {seed}")
        t0 = time.perf_counter()
        query: list[str] = []
        curve: dict[str, float] = {}
        ssft, iterations, pseudo_labels = row_training(row, config)
        pseudo_labelled: list[str] | None = None  # recorded for a run whose stage 2 takes pseudo-labels
        pseudo_gate = ""
        blended: float | None = None  # the start's share of the handed-over model (SSFT and control runs)

        def on_eval(iteration: int, network: torch.nn.Module, curve: dict[str, float] = curve) -> None:
            curve[str(iteration)] = 100 * statistics.case_mean(evaluate(model, network, validation, config.device))

        if row == "source":
            network = model.network
        else:
            if row == "full":
                query = [c.name for c in pool]
            else:
                strategy = "asfda" if row in ASFDA_RECIPES else row
                key = (strategy, seed if strategy in SEEDED else 0, budget if strategy in PER_BUDGET else 0)
                if key not in orders:
                    ranking = rank_folder(
                        folders.pool / "images",
                        model,
                        out / "cache",
                        RankConfig(
                            strategy=strategy,
                            budget=budget if strategy in PER_BUDGET else max(config.budgets),
                            seed=key[1],
                            device=config.device,
                            fusion=config.fusion,
                        ),
                    )
                    orders[key] = [r.file for r in ranking.rows if r.status == "scored"]
                query = orders[key][:budget]
            twin = _twin(runs, query, seed, row, config)
            if twin is not None:
                runs.append(
                    Run(
                        row,
                        budget,
                        seed,
                        twin.dice,
                        query,
                        0.0,
                        twin.cases,
                        twin.validation,
                        twin.curve,
                        f"{twin.row}@{twin.budget}",
                        twin.pseudo_labelled if ssft is not None and pseudo_labels else None,
                        twin.pseudo_gate if ssft is not None and pseudo_labels else "",
                        twin.blend if ssft is not None else None,
                    )
                )
                record()
                continue
            labelled = [c for c in pool if c.name in query]
            network, kept, judged, blend = train(
                source,
                labelled,
                pool,
                iterations,
                seed,
                config.device,
                ssft,
                out / "work",
                config.eval_at if validation else (),
                on_eval,
                _rates(config),
                pseudo_labels=pseudo_labels,
                stage1_cache=out / "stage1",
            )
            pseudo_labelled = kept if ssft is not None and pseudo_labels else None
            pseudo_gate = judged
            blended = blend if ssft is not None else None
        per_case = evaluate_cases(model, network, test, config.device)
        val = evaluate(model, network, validation, config.device) if validation else None
        if validation and row != "source" and ssft is None and config.eval_at:
            curve[str(iterations)] = 100 * statistics.case_mean(val)
        runs.append(
            Run(
                row,
                budget,
                seed,
                _class_means(per_case),
                query,
                time.perf_counter() - t0,
                per_case,
                val,
                curve,
                pseudo_labelled=pseudo_labelled,
                pseudo_gate=pseudo_gate,
                blend=blended,
            )
        )
        record()
    if progress:
        progress(len(plan), len(plan), "")
    return _report(out, config, runs, model_card.class_names, start, source.path, folders, user_data)


def _rates(config: BenchmarkConfig) -> dict[str, float | str]:
    rates = (
        ("lr", config.lr),
        ("encoder_lr_scale", config.encoder_lr_scale),
        ("lower_rate_for", config.lower_rate_for),
    )
    return {k: v for k, v in rates if v is not None}


def lower_rate_rule(config: BenchmarkConfig) -> str:
    """Which loaded tensors take the lower rate in this protocol: the config's choice, else the recipe's."""
    return config.lower_rate_for or FinetuneConfig.lower_rate_for


def row_iterations(row: str, config: BenchmarkConfig) -> int:
    """Training iterations of a row: the protocol's, except the upper bound, which trains ``full_iterations``
    where they are set, and the SSFT control, which trains on the labels as long as ASFDA + SSFT trains in all
    (stage 1 + stage 2), so the pseudo-labels are the only difference."""
    if row == "full" and config.full_iterations is not None:
        return config.full_iterations
    extra = round(config.iterations * config.ssft.extra_fraction) if row == "ssft-control" else 0
    return config.iterations + extra


def _upper_bound_differs(config: BenchmarkConfig) -> bool:
    return row_iterations("full", config) != config.iterations


def row_training(row: str, config: BenchmarkConfig) -> tuple[SSFTOptions | None, int, bool]:
    """How a row trains (``train``'s arguments): its SSFT options (None: one stage on the labels), its
    iterations, and whether stage 2 gets pseudo-labels. The SSFT control is one longer stage under a
    constant stage-2 rate, and the SSFT row's own two stages, stage 2 on the labels alone, when it decays."""
    if row == "ssft-control" and config.ssft.stage2_lr != "constant":
        return config.ssft, config.iterations, False
    return (config.ssft if row == "asfda+ssft" else None), row_iterations(row, config), row != "ssft-control"


def _twin(runs: list[Run], query: list[str], seed: int, row: str, config: BenchmarkConfig) -> Run | None:
    """An earlier run with the same labelled set, seed and recipe: its training would be repeated exactly.

    An SSFT run whose gate kept no volume trained stage 2 on the labels alone, as a decaying stage 2's
    control does: it is that control's twin."""
    recipe = row_training(row, config)
    for r in runs:
        ssft, iterations, pseudo = row_training(r.row, config)
        ran = (ssft, iterations, pseudo and r.pseudo_labelled != [])
        if r.row == "source" or r.shared_with or r.seed != seed or ran != recipe:
            continue
        if sorted(r.query) == sorted(query):
            return r
    return None


def as_run(config: BenchmarkConfig, protocol: dict, runs: list[Run]) -> BenchmarkConfig:
    """The command's config with the iterations and SSFT options a results.json's runs were made with (its
    ``protocol``), and of the rows and budgets asked for those that ran (``runs``): what a report of those runs
    (``--report-only``) states, whatever options were typed or left to their defaults."""
    stored = stored_protocol(protocol)
    names = {f.name for f in fields(SSFTOptions)}
    ssft = replace(config.ssft, **{k: v for k, v in (stored.get("ssft") or {}).items() if k in names})
    iterations = stored.get("iterations", config.iterations)
    rows = tuple(r for r in config.rows if any(run.row == r for run in runs))
    ran = sorted({run.budget for run in runs if run.budget})  # source and full train at budget 0
    budgets = tuple(b for b in config.budgets or ran if b in ran)
    full = stored.get("full_iterations")
    return replace(config, iterations=iterations, full_iterations=full, ssft=ssft, rows=rows, budgets=budgets)


def _config_record(config: BenchmarkConfig, user_data: bool) -> dict:
    """The config as run: on the user's folders, without the phantom-only settings (counts, data seed); the
    upper bound's iterations as it trains them."""
    record = asdict(config) | {"full_iterations": row_iterations("full", config)}
    if user_data:
        for key in ("pool", "test", "validation", "data_seed", "scenario"):
            record.pop(key)
    return record


def _results(config: BenchmarkConfig, protocol: dict, runs: list[Run], model: LoadedModel, user_data: bool) -> dict:
    """results.json: the config, the protocol a resume must match, the class names, what the checkpoint gave
    every row (``weights``: the load report's summary, where the model has one) and the runs."""
    weights = {"weights": model.load_report.summary} if model.load_report is not None else {}
    return {
        "config": _config_record(config, user_data),
        "protocol": protocol,
        "class_names": model.card.class_names,
        **weights,
        "runs": [asdict(r) for r in runs],
    }


def _check_scenario(data: Path, config: BenchmarkConfig) -> None:
    """Phantom data already under OUT/data must be the scenario asked for (it is reused, not rewritten)."""
    marker = data / "scenario.json"
    # data written before the marker was the only scenario there was then: mri
    made = json.loads(marker.read_text()).get("scenario") if marker.is_file() else "mri"
    if made != config.scenario and (marker.is_file() or (data / "pool").is_dir()):
        raise ASFDAError(
            f"{data}: holds the {made} scenario's data; give --scenario {made} to resume that benchmark, "
            f"or another --out for --scenario {config.scenario}"
        )
    data.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"scenario": config.scenario})


def _phantom_folders(data: Path, config: BenchmarkConfig) -> Folders:
    return Folders(data / "pool", data / "test", data / "validation" if config.validation else None)


def _report(
    out: Path,
    config: BenchmarkConfig,
    runs: list[Run],
    class_names: list[str],
    start: float,
    model_path: Path,
    folders: Folders | None = None,
    user_data: bool = False,
) -> dict:
    groups = case_groups([folders.test]) if folders else {}
    summary = statistics.summarise(
        runs, config.rows, config.budgets, groups, controls=CONTROLS, challenger="asfda", rivals=QUERY_ROWS
    )
    pool_size = len(_pairs(folders.pool)) if folders and (folders.pool / "images").is_dir() else config.pool
    test_size = len(_pairs(folders.test)) if folders and (folders.test / "images").is_dir() else config.test
    report = {
        "config": _config_record(config, user_data),
        "model": str(model_path.resolve()),
        "class_names": class_names,
        "summary": _summary(runs, config),
        "runs": len(runs),
        "wall_seconds": time.perf_counter() - start,
        "run_seconds": sum(r.seconds for r in runs),
        "statistics": "paired difference to random per training seed; 95% percentile bootstrap over seeds "
        f"({statistics.BOOTSTRAP_RESAMPLES} resamples, RNG seed {statistics.BOOTSTRAP_SEED}); "
        "ASFDALib/bench/statistics.py",
    }
    # per class by name in the file (the table and plots read the list, in the card's order); `labelled`:
    # how many volumes the row trained on (`budget` is the key the rows share: 0 for source and full alike)
    named = [
        {
            **s,
            "labelled": pool_size if s["row"] == "full" else s["budget"],
            "per_class": dict(zip(class_names[1:], s["per_class"])),
        }
        for s in summary
    ]
    atomic_write_json(out / "summary.json", named)
    atomic_write_json(out / "benchmark.json", report)
    atomic_write_text(
        out / "benchmark.md",
        markdown(summary, class_names, row_labels(config.ssft.extra_fraction))
        + _ssft_note(config, runs)
        + _upper_bound_note(config, summary),
    )
    warnings = []
    for name, draw in (
        ("benchmark.png", lambda path: plot(summary, config, path, pool_size, test_size)),
        ("benchmark_diff.png", lambda path: plot_differences(summary, config, path)),
    ):
        _, why = draw_or_explain(out / name, draw)
        if why:
            warnings.append(why)  # a missing picture never costs the measured results
    curves = {f"{r.row}@{r.budget}/seed{r.seed}": r.curve for r in runs if r.curve}
    if curves:
        atomic_write_json(out / "curves.json", curves)
        _, why = draw_or_explain(out / "benchmark_curves.png", lambda path: plot_curves(runs, path))
        if why:
            warnings.append(why)
    report["warnings"] = warnings
    return report
