"""Ranking a folder of target volumes: score each one (from the cache when possible), then order the
pool with the chosen strategy. One bad volume is skipped and reported; it never stops the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ASFDALib import distributed
from ASFDALib.checkpoints import normalisation_info
from ASFDALib.data.preprocess import compact, preprocess
from ASFDALib.data.volumes import (
    LABEL_MAP_MAX_VALUES,
    NotAScanError,
    Walked,
    deeper_series,
    deeper_series_line,
    kept_out_line,
    no_volumes_message,
    passed_over_line,
    read_scan,
    read_volume,
    relative_name,
    scan_folders,
    walk_pool,
)
from ASFDALib.errors import ASFDAError, ModelError, VolumeError
from ASFDALib.inference.epistemic import epistemic_score
from ASFDALib.inference.memory import check_scoring_memory
from ASFDALib.inference.sweep import SweepConfig, SweepResult, sweep
from ASFDALib.models.loading import LoadedModel
from ASFDALib.outputs import refuse_same_folder
from ASFDALib.query.cache import ScoreCache
from ASFDALib.query.config import RankConfig
from ASFDALib.query.features import FeatureSummary, batchnorm_knowledge, pointwise_head
from ASFDALib.query.selection import DEFAULT_FUSION, Knowledge, Pool, select

Progress = Callable[[int, int, str], None]


@dataclass
class VolumeRecord:
    """One candidate: its sweep result, or why it was skipped."""

    path: Path
    name: str
    result: SweepResult | None = None
    reason: str = ""
    cached: bool = False
    epistemic: float | None = None
    class_entropy: np.ndarray | None = None  # ClaSP PE's scores (ASFDALib.query.class_entropy)
    sha256: str = ""
    notes: list[str] = field(default_factory=list)
    label_map: bool = False  # skipped because it is a label map (volumes.read_scan), not an unusable scan

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class RankRow:
    """One volume's line of a ranking (:data:`ASFDALib.query.columns.COLUMN_LEGEND` says what each field means)."""

    rank: int | None
    file: str
    status: str
    selected: bool = False
    priority: float = math.nan
    pick_score: float = math.nan
    dkd: float = math.nan
    knowledge_gap: float = math.nan
    diversity: float = math.nan
    source_divergence: float = math.nan
    asd: float = math.nan
    entropy: float = math.nan
    foreground_ml: float = math.nan
    source_knowledge: str = ""
    reason: str = ""


@dataclass
class Ranking:
    """One ranking of a pool, as ranking.csv and ranking.json write it.

    ``rows``: one :class:`RankRow` per volume, the ranked ones first in rank order; a row's ``status`` is
    ``scored`` (ranked; ``selected`` for the query), ``labelled`` (labelled already, so not queried) or
    ``skipped`` (could not be scored; ``reason`` says why). ``selected`` and ``skipped`` list those rows.
    ``knowledge``: the source knowledge DKD compared with; ``strategy``, ``alpha``, ``budget`` and ``fusion``:
    how the query was chosen; ``model``: the model's name; ``records``: each volume's sweep result (or why it
    was skipped), for re-ranking without a pass; ``notes``: lines about the ranking as a whole (e.g. ASD left
    out of round 1 for a new head); ``load_report``: what loading the model's weights reported."""

    rows: list[RankRow]
    knowledge: Knowledge
    strategy: str
    alpha: float
    budget: int
    model: str
    records: list[VolumeRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    load_report: dict | None = None
    fusion: str | None = DEFAULT_FUSION  # how DKD and ASD were combined (selection.FUSIONS); None: not combined
    # which weights ranked, for a session's model: the source model, or a round's fine-tuned checkpoint and its hash
    weights: dict | None = None

    @property
    def selected(self) -> list[RankRow]:
        return [r for r in self.rows if r.selected]

    @property
    def skipped(self) -> list[RankRow]:
        return [r for r in self.rows if r.status == "skipped"]


def choose_knowledge(model: LoadedModel, requested: str = "auto") -> Knowledge:
    """Source knowledge in the method's order of preference: BatchNorm statistics the network really uses
    in eval mode, a statistics file, the pre-trained head's free energy; the head's class prototypes only
    when asked for (``prototype``: measured weaker than the energy, docs/method.md).

    Most foundation models normalise with InstanceNorm, GroupNorm or LayerNorm, and some BatchNorm variants
    use batch statistics even in eval mode (SuPreM's UNet): their running buffers are not the source's
    knowledge and are not used. Prototypes need a pointwise output head that came with the checkpoint
    (a re-initialised head has learnt nothing yet).
    """
    norm = None if model.scripted else normalisation_info(model.network)
    stats_path = model.source_stats_path()
    has_stats = stats_path is not None and stats_path.is_file()
    if requested in ("auto", "bn") and norm is not None and norm.uses_running_statistics:
        return Knowledge("bn", batchnorm_knowledge(model.network, norm.running_stats))
    kinds = ", ".join(sorted(norm.kinds)) if norm and norm.kinds else "no normalisation layers we recognise"
    if requested == "bn":
        raise ModelError(
            f"{model.path}: no BatchNorm in the network normalises with running statistics at inference "
            f"({kinds}); use --knowledge stats, prototype or energy"
        )
    if requested in ("auto", "stats") and has_stats and not model.scripted:
        return Knowledge("stats", FeatureSummary.load(stats_path))
    if requested == "stats":
        if stats_path is not None:
            why = f"the card's source_stats, {stats_path}, is not there"
        else:  # a session ranks with the card it was started with: a file named in the card later is not in it
            why = (
                "the card names none (set 'source_stats' in it, see asfda stats; a session keeps the card of its "
                "first rank, so name the file before a session's first rank)"
            )
        raise ModelError(f"{model.path}: no source-statistics file: {why}")
    note = "" if norm is None else f"the network normalises with {kinds}: no BatchNorm statistics to compare with"
    if model.head_is_new:  # energy and prototypes read a head that has learnt nothing yet
        if requested in ("energy", "prototype"):
            raise ModelError(
                f"{model.path}: the output head is new (re-initialised for the target's classes), so its "
                f"{requested} measures nothing the model learnt; use --knowledge auto, or stats with a "
                "source-statistics file (asfda stats)"
            )
        return Knowledge("none")
    if requested == "prototype":
        head, why_not = (
            ("", "the model is opaque (no layers to read)")
            if model.scripted
            else pointwise_head(model.network, model.card.num_classes)
        )
        if head and model.head_is_new:
            head, why_not = "", "the output head is new (re-initialised for the target's classes)"
        if not head:
            raise ModelError(f"{model.path}: no prototypes to compare with: {why_not}; use --knowledge energy")
        return Knowledge("prototype", note=note, head=head)
    return Knowledge("energy", note=note)


def score_volume(
    model: LoadedModel, path: Path, sweep_config: SweepConfig, notes: list[str] | None = None
) -> SweepResult:
    """Read, check and sweep one volume. On CUDA out-of-memory: a smaller window batch, then the CPU."""

    check_scoring_memory(path, model.card.spacing)
    volume = read_scan(path)
    image = compact(preprocess(volume, model.card))
    del volume
    attempts = [sweep_config, replace(sweep_config, sw_batch_size=1), replace(sweep_config, device="cpu")]
    for i, attempt in enumerate(attempts):
        try:
            return sweep(model.network, image, model.card, attempt)
        except torch.cuda.OutOfMemoryError:
            if i == len(attempts) - 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            step = "with one window at a time" if i == 0 else "on the CPU"
            if notes is not None:
                notes.append(f"{path.name}: GPU out of memory; retrying {step}")
    raise AssertionError("unreachable")


def score_volumes(
    paths: list[Path],
    model: LoadedModel,
    cache: ScoreCache,
    config: RankConfig,
    knowledge: Knowledge,
    root: Path | None = None,
    progress: Progress | None = None,
) -> list[VolumeRecord]:
    """Sweep every volume (cache first), recording a reason for each one that cannot be scored."""
    sweep_config = SweepConfig(
        device=config.device, keep_energy=knowledge.kind == "energy", prototype_head=knowledge.head
    )
    preprocessing = model.card.preprocessing_key() + ":compact"  # the sweep reads a float16 volume
    records: list[VolumeRecord] = []
    for i, path in enumerate(paths):
        # with / on every system, as the session records it: a recursive pool's names match across systems
        name = relative_name(path, root) if root and path.is_relative_to(root) else path.name
        if progress:
            progress(i, len(paths), name)
        record = VolumeRecord(path, name)
        try:
            file_hash = record.sha256 = cache.file_hash(path)
            extra = "energy" if sweep_config.keep_energy else ""
            if sweep_config.prototype_head:
                extra += f"prototype:{sweep_config.prototype_head}"
            key = cache.key(file_hash, model.digest, preprocessing, extra)
            record.result = cache.get(key)
            record.cached = record.result is not None
            if record.result is None:
                record.result = score_volume(model, path, sweep_config, record.notes)
                cache.put(key, record.result)
            if config.strategy == "epistemic":
                ekey = cache.key(file_hash, model.digest, preprocessing, f"epistemic{config.mc_passes}:{config.seed}")
                record.epistemic = cache.get_scalar(ekey)
                if record.epistemic is None:
                    image = preprocess(read_volume(path), model.card)
                    record.epistemic = epistemic_score(
                        model.network, image, model.card, config.mc_passes, device=config.device, seed=config.seed
                    )
                    cache.put_scalar(ekey, record.epistemic)
            if config.strategy == "clasp-pe":
                from ASFDALib.query import class_entropy

                ckey = cache.key(file_hash, model.digest, preprocessing, "class-entropy")
                record.class_entropy = class_entropy.cached(cache.folder, ckey)
                if record.class_entropy is None:
                    image = preprocess(read_volume(path), model.card)
                    record.class_entropy = class_entropy.class_entropy_scores(
                        model.network, image, model.card, config.device
                    )
                    class_entropy.store(cache.folder, ckey, record.class_entropy)
        except VolumeError as exc:
            record.result, record.reason = None, exc.reason + (f" ({exc.fix})" if exc.fix else "")
            record.label_map = isinstance(exc, NotAScanError)
        except (ModelError, KeyboardInterrupt):
            raise
        except MemoryError:
            record.result, record.reason = None, "does not fit in memory at the model's spacing (crop it first)"
        except Exception as exc:  # noqa: BLE001 - one volume's failure must not end the run
            record.result, record.reason = None, f"scoring failed: {type(exc).__name__}: {str(exc)[:160]}"
        records.append(record)
    if progress:
        progress(len(paths), len(paths), "")
    return records


def pool_from_results(results: list[SweepResult], **extra) -> Pool:
    """The pool the strategies order, from its volumes' sweep results (``extra``: Pool's optional fields)."""
    return Pool(
        summaries=[r.summary for r in results],
        asd=np.array([r.asd for r in results]),
        entropy=np.array([r.entropy for r in results]),
        energy=np.array([r.energy for r in results]),
        fg_ml=np.array([r.fg_ml for r in results]),
        prototype=np.array([r.prototype_gap for r in results]),
        **extra,
    )


def rank_records(
    records: list[VolumeRecord],
    knowledge: Knowledge,
    config: RankConfig,
    model_name: str = "",
    labelled_names: set[str] | None = None,
) -> Ranking:
    """Order the scored records with the strategy; labelled and skipped ones follow, unranked.

    Labelled volumes leave the pool but count in the diversity term (their summaries form L).
    """
    labelled_names = labelled_names or set()
    scored = [r for r in records if r.ok and r.name not in labelled_names]
    labelled = [r.result.summary for r in records if r.ok and r.name in labelled_names]
    rows: list[RankRow] = []
    if scored:
        pool = pool_from_results(
            [r.result for r in scored],
            epistemic=np.array([r.epistemic for r in scored]) if config.strategy == "epistemic" else None,
            labelled=labelled,
            class_entropy=np.stack([r.class_entropy for r in scored]) if config.strategy == "clasp-pe" else None,
        )
        chosen = select(
            pool,
            config.strategy,
            knowledge,
            config.alpha,
            config.seed,
            config.layers,
            config.dynamic_temperature,
            config.diversity,
            budget=config.budget,
            fusion=config.fusion,
        )
        count = len(chosen.order)
        for rank, i in enumerate(chosen.order, start=1):
            result = scored[i].result
            rows.append(
                RankRow(
                    rank=rank,
                    file=scored[i].name,
                    status="scored",
                    selected=rank <= config.budget,
                    priority=1.0 - (rank - 1) / count,
                    pick_score=float(chosen.score[i]),
                    dkd=float(chosen.dkd[i]),
                    knowledge_gap=float(chosen.s_src[i]),
                    diversity=float(chosen.s_div[i]),
                    source_divergence=float(chosen.d_src[i]),
                    asd=result.asd,
                    entropy=result.entropy,
                    foreground_ml=result.fg_ml,
                    source_knowledge=knowledge.kind,
                )
            )
    rows += [RankRow(rank=None, file=r.name, status="labelled") for r in records if r.ok and r.name in labelled_names]
    rows += [RankRow(rank=None, file=r.name, status="skipped", reason=r.reason) for r in records if not r.ok]
    fusion = config.fusion if config.strategy == "asfda" else None  # only asfda combines two terms
    return Ranking(rows, knowledge, config.strategy, config.alpha, config.budget, model_name, records, fusion=fusion)


def pool_volumes(images: Path, recursive: bool, exclude: tuple[Path, ...] = ()) -> Walked:
    """The volumes of a pool to rank, the files it passes over and the sessions it keeps out (one walk), or a
    refusal in one line (:func:`~ASFDALib.data.volumes.no_volumes_message`: what the folder holds instead, and
    the fix); called before the model loads too, so a wrong folder costs no model load."""
    pool = walk_pool(images, recursive, exclude)
    paths, others = pool.volumes, pool.others
    if Path(images) in paths:  # named "." in the session, no label could pair with it
        raise ASFDAError(
            f"{images}: is one DICOM series (a scan), not a pool of them; give --images the folder that holds the "
            f"pool's series, each in a sub-folder of its own (e.g. {Path(images).parent})"
        )
    if not paths:
        raise ASFDAError(no_volumes_message(images, others, recursive, "rank", exclude))
    return pool


def rank_folder(
    images: Path,
    model: LoadedModel,
    cache_folder: Path,
    config: RankConfig,
    progress: Progress | None = None,
    labelled_names: set[str] | None = None,
    knowledge: Knowledge | None = None,
    exclude: tuple[Path, ...] = (),
    pool: Walked | None = None,
) -> Ranking:
    """Discover, score and rank every volume under ``images``, except in the ``exclude`` folders (the session's).

    ``knowledge`` overrides the model's own source knowledge: an adapted model's BatchNorm statistics
    describe the target by now, so later rounds pass the base model's. ``pool``: what :func:`pool_volumes` found
    there already (checked before the model loaded), so the pool is walked once.
    """
    # the cache's files would mix with the scans (and a recursive rank would meet them)
    refuse_same_folder(cache_folder, images, "images", "give the score cache a folder of its own")
    pool = pool or pool_volumes(images, config.recursive, exclude)
    paths, others = pool.volumes, pool.others
    knowledge = knowledge or choose_knowledge(model, config.knowledge)
    # Under torchrun each rank scores its share; every rank then ranks the same gathered pool.
    mine = distributed.shard(paths)
    local = score_volumes(
        mine,
        model,
        ScoreCache(cache_folder),
        config,
        knowledge,
        Path(images),
        progress if distributed.is_main() else None,
    )
    by_path = {r.path: r for part in distributed.gather(local) for r in part}
    records = [by_path[p] for p in paths]
    if all(r.label_map for r in records):  # nothing left to rank, and all for one reason: name the fix
        raise ASFDAError(no_scans_message(Path(images), records))
    ranking = rank_records(records, knowledge, config, model.card.name, labelled_names)
    if others:  # a scan in a format not read (.mgz, .hdr/.img) would otherwise be missing from the ranking unsaid
        ranking.notes.append(passed_over_line(images, others, "rank"))
    if not config.recursive and (deeper := deeper_series(images, paths, exclude)):
        ranking.notes.append(deeper_series_line(deeper, "ranked", "rank"))
    if pool.sessions:  # another session kept in the pool: its label versions were met and left out
        ranking.notes.append(kept_out_line(images, pool.sessions, "rank"))
    return ranking


def no_scans_message(images: Path, records: list[VolumeRecord]) -> str:
    """One line for a pool whose every volume is a label map: the folder, an example and the scans' folder."""
    scans = scan_folders(images.parent, besides=images)
    where = f", e.g. --images {scans[0]}" if scans else ""
    return (
        f"{images}: all {len(records)} volumes look like label maps, not scans (whole values, at most "
        f"{LABEL_MAP_MAX_VALUES} distinct; e.g. {records[0].name}); give --images the folder of the scans{where}"
    )
