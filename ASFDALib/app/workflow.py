"""The Slicer panel's behaviour as a pure-Python object: what each step does, which actions are enabled
and why, table rows, progress text. Long work (ranking, a case's prediction, predicting the remaining
volumes, fine-tuning, exporting) runs in a worker thread that reports through a queue; the panel (or a test) calls
:meth:`Workflow.poll` to apply the reports on its own thread. No Qt, no MRML: only arrays and paths cross
into here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.errors import ASFDAError
from ASFDALib.outputs import is_session_folder

if TYPE_CHECKING:
    from ASFDALib.models.export import Exported

LOG_LIMIT = 500
# The panel's buttons (object names in Resources/UI/ASFDA.ui) and the workflow action each one runs.
BUTTON_ACTIONS = {
    "rankButton": "rank",
    "nextCaseButton": "next_case",
    "saveLabelButton": "save_label",
    "finetuneButton": "finetune",
    "finetuneAgainButton": "finetune_again",
    "applyButton": "apply",
    "nextRoundButton": "next_round",
    "exportButton": "export",
}


class Phase(str, Enum):
    SETUP = "setup"
    RANKING = "ranking"
    RANKED = "ranked"
    FINETUNING = "finetuning"
    OPENING = "opening"
    PREDICTING = "predicting"
    EXPORTING = "exporting"


PREDICTIONS = "predictions"  # the session's subfolder for "Predict remaining": never beside the inputs


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
    pseudo_gate: str = FinetuneConfig.reliability  # one of recipe.RELIABILITY
    workers: int | None = None  # DataLoader processes for fine-tuning; the Slicer panel passes 0 (none)


@dataclass
class TableRow:
    """One line of the panel's results table: each pick explained by the terms it was made by (as in
    ``asfda rank``'s table): its score, the knowledge gap s_src, the diversity s_div and ASD."""

    rank: str
    case: str
    pick_score: str
    knowledge_gap: str
    diversity: str
    asd: str
    status: str
    selected: bool = False


@dataclass
class OpenedCase:
    """A case ready to show: its image, the label to start from (on the image's grid), and where that came from."""

    name: str
    array: np.ndarray
    affine: np.ndarray
    label: np.ndarray
    source: str  # "label <file>", "prediction <file>" or "model prediction"


@dataclass(frozen=True)
class CaseGrid:
    """A case's scan as it was read to open it: the grid Save label checks a label against, and the scan's
    content record (hash and stamp) the label is recorded as drawn on. Taken in the worker when the case opens, so
    Save label neither reads nor hashes the scan on the GUI thread (seconds for a CT)."""

    shape: tuple[int, ...]
    affine: np.ndarray
    image: dict  # volumes.content_record of the scan


class Cancelled(Exception):
    """Raised inside a worker when the user pressed Cancel."""


@dataclass
class Job:
    kind: str
    thread: threading.Thread
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    cancellable: bool = True  # whether the job looks at ``cancel`` while it runs


def _fmt(value: float) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.3f}"


def _done(run: dict) -> str:
    return f"stage 1: {run['done']['stage1']} iterations, stage 2: {run['done']['stage2']}"


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
        self.opened: OpenedCase | None = None  # a case the worker prepared, until the panel takes it
        self._grids: dict[str, CaseGrid] = {}  # each opened case's scan as read
        # How DKD and ASD are combined: a reopened session keeps the fusion its rounds ranked with (not a panel
        # setting; `asfda rank --fusion` chooses it)
        self.fusion: str | None = None  # None: RankConfig's default
        self.last_run = ""  # what the last fine-tuning did (AdaptResult.summary), shown under its button
        # how the last export in the worker ended, until the panel takes it: what it wrote, or why not
        self.export_ended: tuple[Exported | None, str] | None = None

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
            if self.busy and not self.job.cancellable:
                return False, f"{self.job.kind} cannot be stopped part-way"
            return (True, "stop the running job") if self.busy else (False, "nothing is running")
        if self.busy:
            return False, f"wait for {self.job.kind} to finish" + (", or cancel it" if self.job.cancellable else "")
        if not self.settings.session:
            return False, "choose a session folder"
        # that run trains on the round's labels as they were: no new query under it (the engine refuses one too)
        run = self.finetune_run() if action in ("rank", "next_round") else None
        if run and run["finished"] and self._handover_pending(run):  # the engine refuses a rank until it is recorded
            return False, (
                "this round's fine-tune finished but session.json does not record its model yet: Continue the last "
                "run first (or Train again from the round's start)"
            )
        if run and not run["finished"]:
            if self._labels_changed(run):
                return False, "this round's fine-tune is unfinished and its labels changed since: train it again first"
            return False, "this round's fine-tune is unfinished: Continue the last run first"
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
        if action == "open":
            return (True, "load the case to label") if self._open_session() else (False, "rank first")
        if action in ("finetune", "finetune_again"):
            from ASFDALib.adaptation.runs import unlabelled_new_query  # torch-free

            labelled = self.labelled()
            if not labelled:
                return False, "save at least one label first"
            starts = action == "finetune_again" or self.finetune_run() is None  # a run that starts, as the engine's
            if starts and unlabelled_new_query(self._open_session(), labelled):
                return False, "label a case of this round's query first: the earlier rounds' labels trained it already"
            return self._check_finetune(action == "finetune_again")
        if action in ("apply", "export", "next_round"):
            if not self._adapted():
                return False, "fine-tune first"
            if action == "apply" and not self._unpredicted():
                return False, "every remaining volume has a prediction from this model: double-click a row to open it"
            return True, {
                "apply": "predict the remaining volumes",
                "export": "write the adapted model in the format chosen beside this button",
                "next_round": "re-rank the rest with the adapted model",
            }[action]
        raise ValueError(f"unknown action {action!r}")

    def _check_finetune(self, again: bool) -> tuple[bool, str]:
        """Continue the round's run (resume an interrupted one, extend a finished one) or train it again."""
        run = self.finetune_run()
        if again:
            if run is None:
                return False, "this round has no run yet: Fine-tune starts it"
            return True, "train this round again from its start (the last run is kept aside in the session)"
        if run is None:
            return True, "fine-tune on the labels"
        if self._handover_pending(run):  # the engine's resume records it, training nothing
            return True, "record the finished run's model, which session.json does not yet (its process was stopped)"
        if not run["finished"]:
            if changed := self._labels_changed(run):  # a resume goes on as the run ran: the engine refuses it
                return False, f"the labels changed since the interrupted run ({changed}): train again from the start"
            return True, f"continue the interrupted run ({_done(run)})"
        done = run["done"]
        # As the engine's extend: a run that reached stage 2 goes on in stage 2, else in stage 1.
        if done["stage2"]:
            stage, asked = "stage2", self.settings.pseudo_iterations
        else:
            stage, asked = "stage1", self.settings.iterations
        if asked <= done[stage]:
            return False, (
                f"the last run finished ({_done(run)}): set the iterations above {done[stage]} to continue it, "
                "or train again from the round's start"
            )
        return True, f"continue the finished run ({_done(run)}) to {asked} iterations"

    def finetune_run(self) -> dict | None:
        """This round's fine-tuning record (targets, iterations done, finished), or None when none ran."""
        session = self._open_session()
        if session is None:
            return None
        from ASFDALib.adaptation.runs import newest_run  # torch-free: safe before the dependencies are installed

        return newest_run(session)

    def _handover_pending(self, run: dict) -> bool:
        from ASFDALib.adaptation.runs import handover_pending  # torch-free

        session = self._open_session()
        return session is not None and handover_pending(session, run)

    def _labels_changed(self, run: dict) -> str:
        from ASFDALib.adaptation.runs import labels_changed_since, session_labels  # torch-free

        session = self._open_session()
        return labels_changed_since(run, session_labels(session)) if session is not None else ""

    def finetune_mode(self, again: bool = False) -> str:
        """The engine's mode for the panel's two explicit choices: never a silent resume of a finished run (one
        session.json does not record yet is resumed: the engine records it, training nothing)."""
        if again:
            return "restart"
        run = self.finetune_run()
        if run is None:
            return "new"
        return "extend" if run["finished"] and not self._handover_pending(run) else "resume"

    def run_text(self) -> str:
        """One line on the round's run for the Fine-tune section: what the two choices would act on."""
        run = self.finetune_run()
        if run is None:
            return self.last_run
        session = self._open_session()
        state = "finished" if run["finished"] else "interrupted"
        text = f"Round {session.rounds[-1]['index']} has a {state} run ({_done(run)})."
        return f"{self.last_run}\n{text}" if self.last_run else text

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

        from ASFDALib.adaptation.session import Session, SessionError, unrecorded_query

        path = self.session_path()
        if path is None or not is_session_folder(path):
            return False
        try:
            session = Session.open(path)
        except SessionError as exc:  # a session file that cannot be read: said, not passed over as no session
            self.message(str(exc))
            return False
        info = session.data
        if info.get("model") and not self.settings.model:
            from ASFDALib.models.defaults import DEFAULT_MODEL_NAME

            recorded = Path(info["model"]["path"])
            # the built-in model wherever this install keeps it (empty: the built-in one); another model shown
            # where it was, for the user to point at its new place if it moved
            builtin = recorded.name == DEFAULT_MODEL_NAME and not recorded.exists()
            self.settings.model = "" if builtin else str(recorded)
            self.settings.trust = bool(info["model"].get("trust"))
        if info.get("images"):
            self.settings.images = str(session.image_root)
        if session.rounds:
            self.query = list(session.rounds[-1]["query"])
            strategy = session.rounds[-1].get("strategy") or {}
            self.settings.budget = int(strategy.get("budget", self.settings.budget))
            self.settings.alpha = float(strategy.get("alpha", self.settings.alpha))
            self.settings.strategy = strategy.get("name", self.settings.strategy)
            # rounds recorded before the fusion was a choice ranked with the summed form
            self.fusion = strategy.get("fusion", "sum")
            # the gate the session's latest pseudo-labels were asked of (the CLI's --pseudo-gate included; where
            # its fallback judged, pseudo.json's "reliability" names the fallback and "asked" the gate chosen)
            gates = [(r.get("metrics") or {}).get("pseudo_gate") or {} for r in session.rounds]
            self.settings.pseudo_gate = next(
                (g.get("asked") or g["reliability"] for g in reversed(gates) if g.get("reliability")),
                self.settings.pseudo_gate,
            )
        ranking = session.root / "ranking.json"
        if unrecorded_query(session.root, session) is not None:  # a rank stopped before recording it: no round's query
            # the session's last round as its rank left it (kept under rankings/ once recorded), if it has one
            last = session.rounds[-1]["index"] if session.rounds else None
            ranking = session.root / "rankings" / f"round{last}" / "ranking.json"
            self.message(
                "ranking.json shows a query session.json does not record (a rank stopped before recording it): "
                + (f"showing round {last}'s ranking; " if ranking.is_file() else "")
                + "rank again to record it"
            )
        if ranking.is_file():
            self._rows_from_report(json.loads(ranking.read_text()))
            self.phase = Phase.RANKED
        self.message(f"reopened {session.root}: {len(self.labelled())} labelled, {len(self.query)} queried")
        return True

    # --- workers -----------------------------------------------------------------------------------
    def _start(self, kind: str, target: Callable[[threading.Event], None], cancellable: bool = True) -> None:
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
        self.job = Job(kind, thread, cancel, cancellable=cancellable)
        thread.start()

    def cancel(self) -> None:
        if self.job and self.job.cancellable:
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
            elif kind == "opened":
                self.opened = payload[0]
            elif kind == "predicted":
                self._set_status(payload[0], "predicted")
            elif kind == "finetuned":
                self.last_run = self.progress_text = payload[0]
            elif kind == "export_ended":
                self.export_ended = (payload[0], payload[1])
            elif kind == "finished":
                self.job = None
                self.refresh_statuses()
                if self.phase in (Phase.RANKING, Phase.FINETUNING, Phase.OPENING, Phase.PREDICTING, Phase.EXPORTING):
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
                budget=settings.budget,
                alpha=settings.alpha,
                strategy=settings.strategy,
                device=settings.device,
                **({"fusion": self.fusion} if self.fusion else {}),
            )
            with Session.open(settings.session, create=True) as session:
                images = Path(settings.images) if settings.images else session.image_root
                ranking, written = rank_round(
                    session,
                    images,
                    load_given,
                    settings.model or None,
                    config,
                    settings.trust,
                    progress,
                    card_given=bool(settings.card),
                    cli=False,
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
        for note in ranking.notes:  # as the command line says them: a new head ranks by DKD alone, a re-rank's query
            self.message(note)

    def _pseudo_labelled(self) -> set[str]:
        session = self._open_session()
        rounds = session.rounds if session else []
        return {n for r in rounds for n in (r.get("metrics") or {}).get("pseudo_labelled", [])}

    def _status(self, name: str, done: dict, pseudo: set[str], predicted: dict | None = None) -> str:
        if name in done:
            return "labelled"
        if predicted and name in predicted:
            return "predicted"  # a file in the session's predictions folder: opening the row loads it
        return "pseudo-labelled" if name in pseudo else "unlabelled"

    def _set_status(self, name: str, status: str) -> None:
        for row in self.rows:
            if row.case == name:
                row.status = status

    def refresh_statuses(self) -> None:
        """Labelled / predicted / pseudo-labelled / unlabelled for every scored row, from the session on disk."""
        done, pseudo, predicted = self.labelled(), self._pseudo_labelled(), self.predictions()
        for row in self.rows:
            if not row.status.startswith("skipped"):
                row.status = self._status(row.case, done, pseudo, predicted)

    def _rows_from_report(self, report: dict) -> None:
        # the round's query: what this ranking selected and what a re-rank kept of it, labelled already
        session = self._open_session()
        self.query = list(session.rounds[-1]["query"]) if session and session.rounds else list(report["selected"])
        done, pseudo, predicted = self.labelled(), self._pseudo_labelled(), self.predictions()
        rows = []
        for row in report["rows"]:
            status = row["status"]
            if status in ("scored", "labelled"):
                status = self._status(row["file"], done, pseudo, predicted)
            elif status == "skipped":
                status = f"skipped: {row['reason']}"
                self.skipped[row["file"]] = row["reason"]
            rows.append(
                TableRow(
                    "" if row["rank"] is None else str(row["rank"]),
                    row["file"],
                    _fmt(row.get("pick_score")),
                    _fmt(row.get("knowledge_gap")),
                    _fmt(row.get("diversity")),
                    _fmt(row.get("asd")),
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

    @staticmethod
    def _model_key(session) -> str:
        """Names the weights the session's model has now: the base model's digest and the adapted checkpoint's
        file identity (training a round again rewrites the same final.pt, so its path alone is not enough)."""
        checkpoint = session.adapted_checkpoint()
        if checkpoint is None:
            return session.data["model"]["digest"]
        stat = checkpoint.stat()
        return f"{session.data['model']['digest']}+{session.relative(checkpoint)}@{stat.st_mtime_ns}:{stat.st_size}"

    def model(self):
        """The session's model (adapted when fine-tuned), loaded once per change of weights."""
        from ASFDALib.adaptation.pipeline import session_model

        session = self._session()
        key = self._model_key(session)
        if self._model is None or self._model[0] != key:
            self._model = (key, session_model(session, adapted=True))
        return self._model[1]

    def case_volume(self, name: str):
        from ASFDALib.data.volumes import read_volume

        return read_volume(self._session().image_path(name))

    def _case_grid(self, name: str, volume=None) -> CaseGrid:
        """``name``'s :class:`CaseGrid` (``volume``: the scan as just read; else it is read here)."""
        from ASFDALib.data.volumes import content_record

        volume = volume if volume is not None else self.case_volume(name)
        return CaseGrid(volume.array.shape, volume.affine, content_record(self._session().image_path(name)))

    def prefill(self, name: str, volume=None) -> np.ndarray:
        """The model's prediction for ``name`` on the volume's own grid: the label to start from.

        Full inference: the panel calls it only from a worker (:meth:`start_open`, :meth:`start_apply`)."""
        from ASFDALib.data.preprocess import labels_to_native, preprocess
        from ASFDALib.inference.predict import predict_label

        model = self.model()
        volume = volume if volume is not None else self.case_volume(name)
        image = preprocess(volume, model.card)
        label = predict_label(model.network, image, model.card, self.settings.device)
        return labels_to_native(label.astype(np.uint8), image.affine.numpy(), volume.array.shape, volume.affine)

    def start_open(self, name: str) -> None:
        """Prepare ``name`` for labelling in the worker: its image and the label to start from, which is its
        newest saved label, else this model's prediction file (Predict remaining), else a fresh prediction.
        :meth:`poll` then holds it in :attr:`opened` for the panel to load into the scene."""
        ok, why = self.check("open")
        if not ok:
            raise ASFDAError(why)
        self.phase = Phase.OPENING
        self.opened = None
        self.progress, self.progress_text = 0.0, f"Opening {name}…"

        def work(cancel: threading.Event) -> None:
            from ASFDALib.data.volumes import read_volume

            volume = self.case_volume(name)
            if cancel.is_set():
                raise Cancelled
            label, source = None, "model prediction"
            for kind, path in (("label", self.labelled().get(name)), ("prediction", self.predictions().get(name))):
                if path is None:
                    continue
                stored = read_volume(path)
                if stored.array.shape == volume.array.shape and np.allclose(stored.affine, volume.affine, atol=1e-3):
                    label, source = stored.array.astype(np.uint8), f"{kind} {path.name}"
                    break
                self._events.put(("message", f"{path.name} is not on {name}'s grid: starting from the model instead"))
            if label is None:
                self._events.put(("progress", 0.5, f"Opening {name}: the model predicts it…"))
                label = self.prefill(name, volume)
            self._grids[name] = self._case_grid(name, volume)
            self._events.put(("opened", OpenedCase(name, volume.array, volume.affine, label, source)))
            self._events.put(("progress", 1.0, f"Opened {name} ({source})"))

        self._start("opening", work)

    def take_opened(self) -> OpenedCase | None:
        """The case the last :meth:`start_open` prepared, once (the panel loads it into the scene)."""
        opened, self.opened = self.opened, None
        return opened

    def class_names(self) -> list[str]:
        return list(self._session().data["model"]["card"]["class_names"])

    def save_label(
        self, name: str, label: np.ndarray, affine: np.ndarray, write_seg: Callable[[Path], None] | None = None
    ) -> tuple[Path, Path | None]:
        """Write the label as a new version (NIfTI, and .seg.nrrd through ``write_seg``), checked first."""
        from ASFDALib.data.labels import check_grid
        from ASFDALib.data.volumes import content_hash, write_nifti

        if name not in self._grids:  # saved without opening it here (a script): read its scan now
            self._grids[name] = self._case_grid(name)
        grid = self._grids[name]
        check_grid(label.shape, affine, grid.shape, grid.affine, Path(name))
        values = np.unique(label)
        if values.max(initial=0) >= len(self.class_names()):
            raise ASFDAError(f"{name}: label value {int(values.max())} is not a class of the model")
        with self._session() as session:
            nifti = session.next_label_path(name, ".nii.gz")
            seg = nifti.with_name(nifti.name.replace(".nii.gz", ".seg.nrrd")) if write_seg else None
            write_nifti(nifti, label.astype(np.uint8), grid.affine)
            if write_seg:
                write_seg(seg)
            # drawn on the scan as opened: were it changed since, the label's record shows it (image_changes)
            image = grid.image
            session.record_label(
                name, nifti, content_hash(nifti), "slicer", image_sha256=image["sha256"], image_stamp=image["stamp"]
            )
            session.save()
        for row in self.rows:
            if row.case == name:
                row.status = "labelled"
        self.message(f"saved {nifti.name}" + (f" and {seg.name}" if seg else ""))
        return nifti, seg

    # --- fine-tune ---------------------------------------------------------------------------------
    def start_finetune(self, mode: str = "new") -> None:
        """Fine-tune in the worker with the engine's ``mode`` (new, resume, extend, restart); the panel's two
        choices map onto it through :meth:`finetune_mode`, and what ran is shown from AdaptResult.summary."""
        ok, why = self.check("finetune_again" if mode == "restart" else "finetune")
        if not ok:
            raise ASFDAError(why)
        settings = self.settings
        # a continued run goes on as it ran (batch size, rate, seed, gate; stage 2's schedule, augmentation,
        # teacher and mix), as asfda finetune's does
        ran = {}
        if mode in ("resume", "extend"):
            from ASFDALib.adaptation.runs import checkpoint_every_of, resume_recipe

            run = self.finetune_run()
            ran = resume_recipe(run)
            if every := checkpoint_every_of(run):  # checkpointing as the run did
                ran["checkpoint_every"] = every
        self.phase = Phase.FINETUNING
        self.last_run = ""
        self.progress, self.progress_text = 0.0, "Fine-tuning…"

        def work(cancel: threading.Event) -> None:
            from ASFDALib.adaptation.pipeline import finetune_session
            from ASFDALib.adaptation.session import Session

            def progress(p) -> None:
                val = "" if p.val_dice is None else f", val Dice {p.val_dice:.3f}"
                text = f"Fine-tuning {p.label}: {p.iteration}/{p.total}, loss {p.loss:.4f}{val}, ETA {_eta(p.eta_s)}"
                self._events.put(("progress", p.iteration / max(p.total, 1), text))

            def status(text: str) -> None:
                self._events.put(("message", text))

            panel = {"iterations": settings.iterations, "pseudo_iterations": settings.pseudo_iterations}
            panel |= {"reliability": settings.pseudo_gate, "device": settings.device, "workers": settings.workers}
            config = FinetuneConfig(**(panel | ran))  # the run's own where it has them
            with Session.open(settings.session) as session:
                try:
                    result = finetune_session(session, config, settings.pseudo, mode, cancel, progress, status)
                except RuntimeError as exc:
                    if "out of memory" not in str(exc).lower() or settings.device == "cpu":
                        raise
                    status("GPU out of memory: continuing on the CPU from the last checkpoint")
                    config.device = "cpu"
                    # The failed run is recorded, unfinished, with its own targets (an extension's included),
                    # so resuming it goes on to them.
                    again = "resume"
                    result = finetune_session(session, config, settings.pseudo, again, cancel, progress, status)
            if result.status == "cancelled":
                raise Cancelled
            self._events.put(("finetuned", result.summary))
            status(f"fine-tuning done, {result.summary}: {result.checkpoint}")

        self._start("fine-tuning", work)

    # --- apply, next round, export -----------------------------------------------------------------
    def remaining(self) -> list[str]:
        done = self.labelled()
        return [r.case for r in self.rows if r.case not in done and not r.status.startswith("skipped")]

    def _predictions_folder(self, session) -> Path:
        """predictions/<round>-<weights>: one folder per model state, so a later model never mixes with an
        earlier one's files and nothing is overwritten."""
        key = self._model_key(session)
        checkpoint = session.adapted_checkpoint()
        stem = checkpoint.parent.name if checkpoint is not None else "base"
        return session.root / PREDICTIONS / f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"

    def predictions(self) -> dict[str, Path]:
        """Case -> prediction file written by "Predict remaining" with the model the session has now."""
        session = self._open_session()
        if session is None or not session.data.get("model"):
            return {}
        manifest = self._predictions_folder(session) / "predictions.json"
        if not manifest.is_file():
            return {}
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        found = {name: session.path(relative) for name, relative in files.items()}
        return {name: path for name, path in found.items() if path.is_file()}

    def _unpredicted(self) -> list[str]:
        predicted = self.predictions()
        return [name for name in self.remaining() if name not in predicted]

    def start_apply(self, names: list[str] | None = None) -> None:
        """Predict the remaining volumes in the worker into the session's predictions folder (NIfTI on each
        volume's own grid), listed in the table as "predicted"; nothing is loaded into the scene until a row
        is opened. Volumes that already have a prediction from this model are skipped; Cancel keeps the
        finished ones."""
        ok, why = self.check("apply")
        if not ok:
            raise ASFDAError(why)
        todo = list(names) if names is not None else self._unpredicted()
        self.phase = Phase.PREDICTING
        self.progress, self.progress_text = 0.0, "Predicting…"

        def work(cancel: threading.Event) -> None:
            from ASFDALib.adaptation.session import Session, storage_stems
            from ASFDALib.atomic import atomic_write_json
            from ASFDALib.data.volumes import content_hash, write_nifti
            from ASFDALib.outputs import record_predictions

            start = time.perf_counter()
            with Session.open(self.settings.session) as session:
                folder = self._predictions_folder(session)
                manifest = folder / "predictions.json"
                info = {"model": self._model_key(session), "files": {}}
                if manifest.is_file():
                    info = json.loads(manifest.read_text(encoding="utf-8"))
                stems = storage_stems({*session.image_names(), *todo})
                for i, name in enumerate(todo):
                    if cancel.is_set():
                        raise Cancelled
                    eta = f" — ETA {_eta((time.perf_counter() - start) / i * (len(todo) - i))}" if i else ""
                    self._events.put(("progress", i / max(len(todo), 1), f"Predicting {i}/{len(todo)} — {name}{eta}"))
                    volume = self.case_volume(name)
                    target = folder / f"{stems[name]}.nii.gz"
                    path = write_nifti(target, self.prefill(name, volume), volume.affine)
                    # as asfda predict records its maps: which model made each, from which scan, so that
                    # asfda evaluate on this folder knows the session and leaves out what it trained on
                    scan = content_hash(session.image_path(name))
                    record_predictions(folder, [path], self.model().made_by, {path.name: scan})
                    info["files"][name] = session.relative(path)
                    atomic_write_json(manifest, info)  # after each volume: a cancel keeps what is written
                    self._events.put(("predicted", name, path))
            self._events.put(("progress", 1.0, f"Predicted {len(todo)} volumes into {folder}"))
            self._events.put(("message", f"predictions written to {folder}: double-click a row to open one"))

        self._start("predicting", work)

    def start_next_round(self) -> None:
        ok, why = self.check("next_round")
        if not ok:
            raise ASFDAError(why)
        self.start_rank()

    def export_format(self) -> str:
        """The format Export offers for the session's model: a MONAI bundle, or where a bundle cannot carry it (an
        nnU-Net residual encoder, a TorchScript model, a program), the one that does. Read from session.json, so
        torch-free: the panel asks it on every refresh. ``asfda export`` without ``--format`` exports in the same."""
        from ASFDALib.models.formats import session_format

        session = self._open_session()
        return session_format(session.data.get("model") if session is not None else None)

    def export_suggestion(self, fmt: str) -> Path:
        """Where the Export dialog starts: beside the session folder (an export never goes inside it); for a
        program, a file named after the session that neither an export nor its card takes yet."""
        from ASFDALib.models.formats import SUFFIXES
        from ASFDALib.models.loading import card_beside

        session = Path(self.settings.session)
        if fmt == "bundle":
            return session.parent
        suffix = SUFFIXES[fmt]
        names = (session.parent / f"{session.name}{f'_{n}' if n > 1 else ''}{suffix}" for n in itertools.count(1))
        return next(p for p in names if not p.exists() and not card_beside(p).exists())

    def export(self, target: Path, fmt: str | None = None) -> Exported:
        """The session's fine-tuned model in ``fmt`` (:meth:`export_format` when not given) at ``target``: the
        bundle's folder, or the program's file (a name without a suffix gets the format's, as a save dialog's
        default suffix does). Every check ``asfda export`` makes, by the same function; the
        :class:`ASFDALib.models.export.Exported` it returns says what was written and how to load it back. Here, on
        the caller's thread (scripts); the panel exports in the worker (:meth:`start_export`)."""
        if self.busy:  # the panel's own fine-tune holds the session's lock in this process, which in_use() allows
            raise ASFDAError(self.check("export")[1])
        return self._export(*self._export_target(target, fmt))

    def _export_target(self, target: Path, fmt: str | None) -> tuple[Path, str]:
        """Where an export named ``target`` is written, and in which format (None: :meth:`export_format`)."""
        from ASFDALib.models.formats import SUFFIXES

        fmt = fmt or self.export_format()
        target = Path(target)
        if fmt in SUFFIXES and not target.suffix:
            target = target.with_name(target.name + SUFFIXES[fmt])
        return target, fmt

    def _export(self, target: Path, fmt: str) -> Exported:
        from ASFDALib.models.export import export_session_model

        return export_session_model(self._session(), target, fmt, cli=False)

    def start_export(self, target: Path, fmt: str | None = None) -> None:
        """:meth:`export` in the worker: tracing a large network for a program (``torch.export``, TorchScript) takes
        minutes, which on the panel's thread would freeze Slicer. :meth:`take_export` then gives what it wrote, or
        why it refused (its checks come first, before the model loads).

        It cannot be cancelled: the long step, the trace, runs inside torch with no point to stop at, so a Cancel
        would wait for it anyway. Slicer quit part-way is safe all the same: a program is written whole beside its
        name (``.NAME.partial``) and a bundle's folder appears whole, so nothing half-written takes the chosen name,
        and the same Export again completes the program or writes the bundle."""
        ok, why = self.check("export")
        if not ok:
            raise ASFDAError(why)
        target, fmt = self._export_target(target, fmt)
        self.phase = Phase.EXPORTING
        self.export_ended = None
        self.progress, self.progress_text = 0.0, f"Exporting {fmt} to {target.name}…"

        def work(cancel: threading.Event) -> None:
            try:
                exported = self._export(target, fmt)
            except Exception as exc:  # said in the panel's message box, and in the log by _start
                self._events.put(("progress", 0.0, "Export failed: see the message"))
                self._events.put(("export_ended", None, str(exc)))
                raise
            self._events.put(("progress", 1.0, f"Exported {fmt} to {exported.path.name}"))
            self._events.put(("message", exported.message))
            self._events.put(("export_ended", exported, ""))

        self._start("exporting", work, cancellable=False)

    def take_export(self) -> tuple[Exported | None, str] | None:
        """How the last :meth:`start_export` ended, once (the panel shows it): what it wrote, or None and why not."""
        ended, self.export_ended = self.export_ended, None
        return ended
