"""Progress on long work: a live bar in a terminal; plain periodic lines (step i/N, elapsed, ETA) where
stdout is not a terminal (CI logs, ``nohup``, Slicer's Python console), so a log never goes silent."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from ASFDALib import PROGRESS_EVERY_S


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainProgress(AbstractContextManager):
    """Writes ``label i/N (p%), elapsed, ETA [detail]`` lines through ``console.print``: at the first step,
    then at most every ``every_s`` seconds, and at the last step. ``clock`` (seconds) is for tests."""

    def __init__(
        self,
        console,
        label: str,
        unit: str,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.console, self.label, self.unit, self.every_s, self.clock = console, label, unit, every_s, clock
        self.start = clock()
        self.last = float("-inf")
        self.first_done: int | None = None
        self.stage_name: str | None = None

    def __exit__(self, *exc) -> None:
        return None

    def step(self, done: int, total: int | None, detail: str = "") -> None:
        now = self.clock()
        if self.first_done is None:
            self.first_done = done
        final = total is not None and done >= total
        if now - self.last < self.every_s and not final:
            return
        self.last = now
        elapsed = now - self.start
        text = f"{self.label} {done}/{total if total is not None else '?'} {self.unit}"
        if total:
            text += f" ({100 * done / total:.0f}%)"
        text += f", elapsed {_clock(elapsed)}"
        progressed = done - self.first_done
        if total and progressed > 0 and not final:
            text += f", ETA {_clock(elapsed / progressed * (total - done))}"
        self.console.print(text + (f" {detail}" if detail else ""), highlight=False, markup=False, soft_wrap=True)

    def stage(self, name: str, fraction: float, detail: str = "") -> None:
        """Writes ``label p% name[; detail], elapsed``: at once for a new stage (a run has a few, each may
        last minutes, so none is held back behind the interval), else at most every ``every_s`` seconds."""
        now = self.clock()
        if name == self.stage_name and now - self.last < self.every_s and fraction < 1:
            return
        self.stage_name, self.last = name, now
        text = f"{self.label} {100 * fraction:.0f}% {name}" + (f"; {detail}" if detail else "")
        self.console.print(f"{text}, elapsed {_clock(now - self.start)}", highlight=False, markup=False, soft_wrap=True)


def volume_progress(console, label: str, unit: str = "volumes"):
    """A progress display for work over volumes (or other ``unit``s: i/N, elapsed, ETA, current name) and
    the callback ``update(done, total, name)`` that drives it: a rich bar in a terminal, plain lines elsewhere."""
    if not console.is_terminal:
        plain = PlainProgress(console, label, unit)
        return plain, lambda done, total, name: plain.step(done, total, name)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
        console=console,
    )
    task = bar.add_task(label, total=None, name="")

    def update(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, name=name)

    return bar, update


def stage_progress(console, label: str) -> tuple[AbstractContextManager, Callable[..., None]]:
    """A progress display for work in named stages (``label``, p%, the stage, a detail such as i/N within it,
    elapsed) and the callback ``update(stage, fraction, detail="")`` that drives it: a rich bar in a
    terminal, plain lines elsewhere."""
    if not console.is_terminal:
        plain = PlainProgress(console, label, "")
        return plain, plain.stage
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        TextColumn("{task.description}", markup=False),  # a stage may name a file, and names may hold [brackets]
        TimeElapsedColumn(),
        console=console,
    )
    task = bar.add_task("starting", total=1.0)

    def update(stage: str, fraction: float, detail: str = "") -> None:
        bar.update(task, completed=fraction, description=stage + (f"; {detail}" if detail else ""))

    return bar, update


def training_progress(console) -> tuple[AbstractContextManager, Callable]:
    """A progress display for fine-tuning (stage, iteration i/N, loss, ETA) and the callback that drives it:
    a rich bar in a terminal, plain lines elsewhere."""
    if not console.is_terminal:
        plains: dict[str, PlainProgress] = {}
        outer = PlainProgress(console, "Fine-tuning", "iterations")

        def plain_update(p) -> None:
            stage = p.label
            line = plains.setdefault(stage, PlainProgress(console, f"Fine-tuning {stage}", "iterations"))
            line.step(p.iteration, p.total, f"loss {p.loss:.4f}")

        return outer, plain_update
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]{task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task("finetune", total=None, stage="stage 1", loss=float("nan"))

    def progress(p) -> None:
        bar.update(task, completed=p.iteration, total=p.total, stage=p.label, loss=p.loss)

    return bar, progress
