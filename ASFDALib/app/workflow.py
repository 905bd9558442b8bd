"""The Slicer panel's behaviour as a pure-Python object: what each step does, which actions are enabled
and why, table rows, progress text. Long work runs in a worker thread that reports through a queue; the
panel (or a test) calls :meth:`Workflow.poll` to apply the reports on its own thread. No Qt, no MRML:
only arrays and paths cross into here.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.errors import ASFDAError

LOG_LIMIT = 500
# The panel's buttons (object names in Resources/UI/ASFDA.ui) and the workflow action each one runs.
BUTTON_ACTIONS = {
    "rankButton": "rank",
    "nextCaseButton": "next_case",
    "saveLabelButton": "save_label",
    "finetuneButton": "finetune",
    "applyButton": "apply",
    "nextRoundButton": "next_round",
    "exportButton": "export",
}


class Phase(str, Enum):
    SETUP = "setup"
    RANKING = "ranking"
    RANKED = "ranked"
    FINETUNING = "finetuning"


@dataclass
class PanelSettings:
    """Everything the Setup section holds; a parameter node in Slicer mirrors these fields."""

    model: str = ""
    card: str = ""
    trust: bool = False
    images: str = ""
    session: str = ""
    device: str = "auto"
    budget: int = 4
    alpha: float = 0.5
    strategy: str = "asfda"
    iterations: int = FinetuneConfig.iterations
    pseudo_iterations: int = FinetuneConfig.pseudo_iterations
    pseudo: bool = True
    workers: int | None = None  # DataLoader processes for fine-tuning; the Slicer panel passes 0 (none)


@dataclass
class TableRow:
    rank: str
    case: str
    score: str
    dkd: str
    asd: str
    status: str
    selected: bool = False


class Cancelled(Exception):
    """Raised inside a worker when the user pressed Cancel."""


@dataclass
class Job:
    kind: str
    thread: threading.Thread
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)


def _fmt(value: float) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Workflow:
    """Rank → label → fine-tune → apply / next round, for one session folder."""

    def __init__(self, settings: PanelSettings | None = None) -> None:
        self.settings = settings or PanelSettings()
        self.phase = Phase.SETUP
        self.progress = 0.0
        self.progress_text = ""
        self.log: list[str] = []
        self.rows: list[TableRow] = []
        self.query: list[str] = []
        self.skipped: dict[str, str] = {}
        self.job: Job | None = None
        self._events: queue.Queue = queue.Queue()
        self._model = None

    # --- state the panel shows ---------------------------------------------------------------------
    def message(self, text: str) -> None:
        self.log.append(text)
        del self.log[:-LOG_LIMIT]

    @property
    def busy(self) -> bool:
        return self.job is not None

    def session_path(self) -> Path | None:
        return Path(self.settings.session) if self.settings.session else None

    def _open_session(self):
        """The session on disk, or None when no folder is chosen or it is not (yet) a session."""
        from ASFDALib.adaptation.session import Session, SessionError

        path = self.session_path()
        try:
            return Session.open(path) if path else None
        except SessionError:
            return None

    def labelled(self) -> dict[str, Path]:
        session = self._open_session()
        return session.labelled() if session else {}

    def missing_labels(self) -> list[str]:
        done = self.labelled()
        return [n for n in self.query if n not in done]

    def check(self, action: str) -> tuple[bool, str]:
        """Whether ``action`` is possible now, and if not, the reason shown as the button's tooltip."""
        if action == "cancel":
            return (True, "stop the running job") if self.busy else (False, "nothing is running")
        if self.busy:
            return False, f"wait for {self.job.kind} to finish, or cancel it"
        if not self.settings.session:
            return False, "choose a session folder"
        if action == "rank":
            if not self.settings.images and not self._session_has_images():
                return False, "choose the folder of target volumes"
            return True, "score every volume and pick the ones to label"
        if action in ("next_case", "save_label"):
            if not self.query:
                return False, "rank first"
            if action == "next_case" and not self.missing_labels():
                return False, "every queried case is labelled: fine-tune next"
            return True, "label the next queried case" if action == "next_case" else "save the current label"
        if action == "finetune":
            return (True, "fine-tune on the labels") if self.labelled() else (False, "save at least one label first")
        if action in ("apply", "export", "next_round"):
            if not self._adapted():
                return False, "fine-tune first"
            return True, {
                "apply": "predict the remaining volumes",
                "export": "write a MONAI bundle",
                "next_round": "re-rank the rest with the adapted model",
            }[action]
        raise ValueError(f"unknown action {action!r}")

    def _session_has_images(self) -> bool:
        session = self._open_session()
        return bool(session and session.data.get("images"))

    def _adapted(self) -> bool:
        session = self._open_session()
        return bool(session and session.adapted_checkpoint() is not None)

    # --- reopening ---------------------------------------------------------------------------------
    def reopen(self) -> bool:
        """Restore settings, query and table from an existing session folder; False if there is none."""
        import json

        session = self._open_session()
        if session is None:
            return False
        info = session.data
        if info.get("model") and not self.settings.model:
            self.settings.model = info["model"]["path"]
            self.settings.trust = bool(info["model"].get("trust"))
        if info.get("images"):
            self.settings.images = info["images"]["root"]
        if session.rounds:
            self.query = list(session.rounds[-1]["query"])
            strategy = session.rounds[-1].get("strategy") or {}
            self.settings.budget = int(strategy.get("budget", self.settings.budget))
            self.settings.alpha = float(strategy.get("alpha", self.settings.alpha))
            self.settings.strategy = strategy.get("name", self.settings.strategy)
        ranking = session.root / "ranking.json"
        if ranking.is_file():
            self._rows_from_report(json.loads(ranking.read_text()))
            self.phase = Phase.RANKED
        self.message(f"reopened {session.root}: {len(self.labelled())} labelled, {len(self.query)} queried")
        return True

    # --- workers -----------------------------------------------------------------------------------
    def _start(self, kind: str, target: Callable[[threading.Event], None]) -> None:
        if self.busy:
            raise ASFDAError(f"{self.job.kind} is still running")
        cancel = threading.Event()

        def run() -> None:
            try:
                target(cancel)
            except Cancelled:
                self._events.put(("cancelled", kind))
            except Exception as exc:  # noqa: BLE001 - every failure is shown in the panel, not lost in a thread
                self._events.put(("error", f"{kind} failed: {exc}"))
            finally:
                self._events.put(("finished", kind))

        thread = threading.Thread(target=run, name=f"asfda-{kind}", daemon=True)
        self.job = Job(kind, thread, cancel)
        thread.start()

    def cancel(self) -> None:
        if self.job:
            self.job.cancel.set()
            self.message(f"cancelling {self.job.kind}…")

    def wait(self, timeout: float = 600.0) -> None:
        """Block until the running job ends and apply its reports (for tests and scripts)."""
        if self.job:
            self.job.thread.join(timeout)
        self.poll()

    def poll(self) -> int:
        """Apply queued reports from the worker on the caller's thread; returns how many were applied."""
        count = 0
        while True:
            try:
                kind, *payload = self._events.get_nowait()
            except queue.Empty:
                return count
            count += 1
            if kind == "progress":
                self.progress, self.progress_text = payload
            elif kind == "message":
                self.message(payload[0])
            elif kind == "error":
                self.message(payload[0])
            elif kind == "cancelled":
                self.message(f"{payload[0]} cancelled; finished work is kept")
            elif kind == "ranked":
                self._apply_ranking(payload[0])
            elif kind == "finished":
                self.job = None
                self.refresh_statuses()
                if self.phase in (Phase.RANKING, Phase.FINETUNING):
                    self.phase = Phase.RANKED if self.rows else Phase.SETUP

    # --- rank --------------------------------------------------------------------------------------
    def start_rank(self) -> None:
        ok, why = self.check("rank")
        if not ok:
            raise ASFDAError(why)
        settings = self.settings
        self.phase = Phase.RANKING
        self.progress, self.progress_text = 0.0, "Scoring…"

        def work(cancel: threading.Event) -> None:
            from ASFDALib.adaptation.rounds import rank_round
            from ASFDALib.adaptation.session import Session
            from ASFDALib.models.defaults import default_model_path
            from ASFDALib.models.loading import load_model
            from ASFDALib.query.ranking import RankConfig

            start = time.perf_counter()

            def progress(done: int, total: int, name: str) -> None:
                if cancel.is_set():
                    raise Cancelled
                eta = (time.perf_counter() - start) / max(done, 1) * (total - done)
                text = (
                    f"Scoring {done}/{total}" + (f" — {name}" if name else "") + (f" — ETA {_eta(eta)}" if done else "")
                )
                self._events.put(("progress", done / max(total, 1), text))

            def load_given():
                card = settings.card or None
                return load_model(settings.model or default_model_path(), card, trust=settings.trust)

            config = RankConfig(
                budget=settings.budget, alpha=settings.alpha, strategy=settings.strategy, device=settings.device
            )
            with Session.open(settings.session, create=True) as session:
                images = Path(settings.images) if settings.images else session.image_root
                ranking, written = rank_round(
                    session, images, load_given, bool(settings.model), config, settings.trust, progress
                )
            for warning in written.warnings:  # e.g. no plot: matplotlib missing; the ranking itself is written
                self._events.put(("message", warning))
            self._events.put(("ranked", ranking))

        self._start("ranking", work)

    def _apply_ranking(self, ranking) -> None:
        from ASFDALib.query.report import ranking_dict

        self._rows_from_report(ranking_dict(ranking))
        self.phase = Phase.RANKED
        self.progress, self.progress_text = 1.0, f"Ranked {len(ranking.rows)} volumes; query: {len(self.query)}"
        self.message(self.progress_text)

    def _pseudo_labelled(self) -> set[str]:
        session = self._open_session()
        rounds = session.rounds if session else []
        return {n for r in rounds for n in (r.get("metrics") or {}).get("pseudo_labelled", [])}

    def _status(self, name: str, done: dict, pseudo: set[str]) -> str:
        return "labelled" if name in done else "pseudo-labelled" if name in pseudo else "unlabelled"

    def refresh_statuses(self) -> None:
        """Labelled / pseudo-labelled / unlabelled for every scored row, from the session on disk."""
        done, pseudo = self.labelled(), self._pseudo_labelled()
        for row in self.rows:
            if not row.status.startswith("skipped"):
                row.status = self._status(row.case, done, pseudo)

    def _rows_from_report(self, report: dict) -> None:
        self.query = list(report["selected"])
        done, pseudo = self.labelled(), self._pseudo_labelled()
        rows = []
        for row in report["rows"]:
            status = row["status"]
            if status in ("scored", "labelled"):
                status = self._status(row["file"], done, pseudo)
            elif status == "skipped":
                status = f"skipped: {row['reason']}"
                self.skipped[row["file"]] = row["reason"]
            rows.append(
                TableRow(
                    "" if row["rank"] is None else str(row["rank"]),
                    row["file"],
                    _fmt(row["priority"]),
                    _fmt(row["dkd"]),
                    _fmt(row["asd"]),
                    status,
                    bool(row["selected"]),
                )
            )
        self.rows = rows

    # --- label -------------------------------------------------------------------------------------
    def next_case(self) -> str | None:
        """The first queried case without a label, or None (then the panel says: fine-tune next)."""
        missing = self.missing_labels()
        if not missing:
            self.message(f"All {len(self.query)} queried cases are labelled. Fine-tune next.")
            return None
        return missing[0]

    def _session(self):
        from ASFDALib.adaptation.session import Session

        return Session.open(self.session_path())

    def model(self):
        """The session's model (adapted when fine-tuned), loaded once per change."""
        from ASFDALib.adaptation.pipeline import session_model

        session = self._session()
        key = (session.data["model"]["digest"], str(session.adapted_checkpoint()))
        if self._model is None or self._model[0] != key:
            self._model = (key, session_model(session, adapted=True))
        return self._model[1]

    def case_volume(self, name: str):
        from ASFDALib.data.volumes import read_volume

        return read_volume(self._session().image_path(name))

    def prefill(self, name: str) -> np.ndarray:
        """The model's prediction for ``name`` on the volume's own grid: the label to start from."""
        from ASFDALib.data.preprocess import labels_to_native, preprocess
        from ASFDALib.inference.predict import predict_label

        model = self.model()
        volume = self.case_volume(name)
        image = preprocess(volume, model.card)
        label = predict_label(model.network, image, model.card, self.settings.device)
        return labels_to_native(label.astype(np.uint8), image.affine.numpy(), volume.array.shape, volume.affine)

    def class_names(self) -> list[str]:
        return list(self._session().data["model"]["card"]["class_names"])

    def save_label(
        self, name: str, label: np.ndarray, affine: np.ndarray, write_seg: Callable[[Path], None] | None = None
    ) -> tuple[Path, Path | None]:
        """Write the label as a new version (NIfTI, and .seg.nrrd through ``write_seg``), checked first."""
        from ASFDALib.data.labels import check_grid
        from ASFDALib.data.volumes import content_hash, write_nifti

        volume = self.case_volume(name)
        check_grid(label.shape, affine, volume.array.shape, volume.affine, Path(name))
        values = np.unique(label)
        if values.max(initial=0) >= len(self.class_names()):
            raise ASFDAError(f"{name}: label value {int(values.max())} is not a class of the model")
        with self._session() as session:
            nifti = session.next_label_path(name, ".nii.gz")
            seg = nifti.with_name(nifti.name.replace(".nii.gz", ".seg.nrrd")) if write_seg else None
            write_nifti(nifti, label.astype(np.uint8), volume.affine)
            if write_seg:
                write_seg(seg)
            session.record_label(name, nifti, content_hash(nifti), "slicer")
            session.save()
        for row in self.rows:
            if row.case == name:
                row.status = "labelled"
        self.message(f"saved {nifti.name}" + (f" and {seg.name}" if seg else ""))
        return nifti, seg

    # --- fine-tune ---------------------------------------------------------------------------------
    def start_finetune(self, mode: str = "new") -> None:
        ok, why = self.check("finetune")
        if not ok:
            raise ASFDAError(why)
        settings = self.settings
        self.phase = Phase.FINETUNING
        self.progress, self.progress_text = 0.0, "Fine-tuning…"

        def work(cancel: threading.Event) -> None:
            from ASFDALib.adaptation.pipeline import finetune_session
            from ASFDALib.adaptation.session import Session

            def progress(p) -> None:
                stage = "stage 1" if p.stage == "stage1" else "stage 2 (+ pseudo-labels)"
                val = "" if p.val_dice is None else f", val Dice {p.val_dice:.3f}"
                text = f"Fine-tuning {stage}: {p.iteration}/{p.total}, loss {p.loss:.4f}{val}, ETA {_eta(p.eta_s)}"
                self._events.put(("progress", p.iteration / max(p.total, 1), text))

            def status(text: str) -> None:
                self._events.put(("message", text))

            config = FinetuneConfig(
                iterations=settings.iterations,
                pseudo_iterations=settings.pseudo_iterations,
                device=settings.device,
                workers=settings.workers,
            )
            with Session.open(settings.session) as session:
                try:
                    result = finetune_session(session, config, settings.pseudo, mode, cancel, progress, status)
                except RuntimeError as exc:
                    if "out of memory" not in str(exc).lower() or settings.device == "cpu":
                        raise
                    status("GPU out of memory: continuing on the CPU from the last checkpoint")
                    config.device = "cpu"
                    result = finetune_session(session, config, settings.pseudo, "resume", cancel, progress, status)
            if result.status == "cancelled":
                raise Cancelled
            status(f"fine-tuning done, {result.summary}: {result.checkpoint}")

        self._start("fine-tuning", work)

    # --- apply, next round, export -----------------------------------------------------------------
    def remaining(self) -> list[str]:
        done = self.labelled()
        return [r.case for r in self.rows if r.case not in done and not r.status.startswith("skipped")]

    def apply(self, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Adapted-model predictions (native grid) for the unlabelled volumes, for review."""
        return {name: self.prefill(name) for name in (names if names is not None else self.remaining())}

    def start_next_round(self) -> None:
        ok, why = self.check("next_round")
        if not ok:
            raise ASFDAError(why)
        self.start_rank()

    def export(self, folder: Path) -> Path:
        from ASFDALib.models.export import export_bundle

        return export_bundle(self.model(), folder)
