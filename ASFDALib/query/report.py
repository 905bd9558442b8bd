"""What a ranking leaves behind: ranking.csv, ranking.json, a DKD-vs-ASD scatter PNG, and a terminal table."""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from ASFDALib.atomic import atomic_write_json, atomic_write_text
from ASFDALib.plotting import draw_or_explain, new_figure, save_figure
from ASFDALib.query.columns import COLUMN_LEGEND
from ASFDALib.query.ranking import Ranking, RankRow

if TYPE_CHECKING:  # rich is imported where a table is drawn, not with the module
    from rich.console import Console, ConsoleOptions, Group
    from rich.measure import Measurement
    from rich.text import Text

COLUMNS = [f.name for f in fields(RankRow)]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def ranking_dict(ranking: Ranking) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": ranking.model,
        "strategy": ranking.strategy,
        "alpha": ranking.alpha,
        "fusion": ranking.fusion,
        "budget": ranking.budget,
        "knowledge": ranking.knowledge.kind,
        "knowledge_description": ranking.knowledge.describe(),
        "selected": [r.file for r in ranking.selected],
        "skipped": [{"file": r.file, "reason": r.reason} for r in ranking.skipped],
        "columns": COLUMN_LEGEND,
        "rows": [{k: _clean(v) for k, v in asdict(r).items()} for r in ranking.rows],
        "notes": list(ranking.notes),
        "model_load": ranking.load_report,
        "weights": ranking.weights,
    }


def write_csv(ranking: Ranking, path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in ranking.rows:
        writer.writerow(
            {
                k: ("" if _clean(v) is None else (f"{v:.6g}" if isinstance(v, float) else v))
                for k, v in asdict(row).items()
            }
        )
    return atomic_write_text(path, buffer.getvalue())


def write_scatter(ranking: Ranking, path: Path) -> Path | None:
    """DKD (or whole-volume entropy for baselines) against ASD, the query marked with its rank."""
    rows = [r for r in ranking.rows if r.status == "scored"]
    if not rows:
        return None
    use_dkd = any(math.isfinite(r.dkd) for r in rows)
    xs = [r.dkd if use_dkd else r.entropy for r in rows]
    fig, ax = new_figure(6.4, 4.8)
    rest = [(x, r.asd) for x, r in zip(xs, rows) if not r.selected]
    if rest:
        ax.scatter(*zip(*rest), c="#8c8c8c", s=28, label="not queried")
    chosen = [(x, r) for x, r in zip(xs, rows) if r.selected]
    if chosen:
        ax.scatter(
            [x for x, _ in chosen],
            [r.asd for _, r in chosen],
            c="#d62728",
            marker="*",
            s=160,
            label=f"queried (budget {ranking.budget})",
        )
        for x, r in chosen:
            ax.annotate(f"#{r.rank}", (x, r.asd), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("DKD at pick time (knowledge gap x diversity)" if use_dkd else "whole-volume entropy")
    ax.set_ylabel("ASD (class-balanced foreground entropy)")
    ax.set_title(f"{ranking.strategy}: {len(rows)} volumes, K_s = {ranking.knowledge.kind}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    return save_figure(fig, path)


class RankingOutputs(dict):
    """The files written (kind -> path, as a dict) and ``warnings``: one line per output not written."""

    def __init__(self, files: dict[str, Path], warnings: list[str]) -> None:
        super().__init__(files)
        self.warnings = warnings


def write_ranking(ranking: Ranking, folder: Path) -> RankingOutputs:
    """ranking.csv and ranking.json, then the plot, which may fail (no matplotlib) without costing them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # ranking.json first: a rank stopped before the others leaves it new, which says they are (unrecorded_query)
    written_json = atomic_write_json(folder / "ranking.json", ranking_dict(ranking))
    written = {"csv": write_csv(ranking, folder / "ranking.csv"), "json": written_json}
    plot, why = draw_or_explain(folder / "ranking.png", lambda path: write_scatter(ranking, path))
    if plot:
        written["png"] = plot
    elif (folder / "ranking.png").is_file():  # an earlier round's picture must not pass for this ranking's
        (folder / "ranking.png").unlink()
    return RankingOutputs(written, [why] if why else [])


class FileName:
    """A file name in a narrow table cell: it folds after a '_', '-' or '.' where it can, and inside a part
    only where that part is wider than the cell, so a BIDS-like name reads whole (rich folds at the edge)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.parts = re.findall(r"[^_.-]*[_.-]|[^_.-]+$", name)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        from rich.measure import Measurement

        return Measurement(min(max(map(len, self.parts)), options.max_width), len(self.name))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        from rich.text import Text

        width, lines, line = max(1, options.max_width), [], ""
        for part in self.parts:
            if line and len(line) + len(part) > width:
                lines.append(line)
                line = ""
            line += part
            while len(line) > width:
                lines.append(line[:width])
                line = line[width:]
        yield Text("\n".join([*lines, line]))


# How the terminal table's score column was computed, by fusion (None: a strategy without DKD and ASD).
SCORE_CAPTIONS = {
    "gap-first": "score: the first pick's DKD (gap x div), then div x (a*pct(gap) + (1-a)*pct(ASD))",
    "gated": "score = div x (a*pct(gap) + (1-a)*pct(ASD))",
    "sum": "score = a*pct(DKD) + (1-a)*pct(ASD), DKD = gap x div",
    None: "score: the strategy's own",
}


def ranking_table(ranking: Ranking, limit: int = 30) -> Group:
    """The ranking for a terminal: a rich Table (the query first), then a line per skipped file with why.

    Each pick is explained by the terms it was made by: its score, the knowledge gap s_src, the diversity
    s_div to the volumes labelled or picked before it, and ASD. It fits 80 columns: numbers never wrap or
    shrink; a long file name folds onto more lines instead (:class:`FileName`). Skipped files are listed
    below the table, not in it: a reason (an error message naming a path) in a cell would widen the table
    past 80 columns and squeeze every other column to nothing."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    fusion = ranking.fusion
    if fusion == "gap-first" and (ranking.alpha == 0 or any(r.status == "labelled" for r in ranking.rows)):
        fusion = "gated"  # DKD alone only for a first pick with nothing labelled (selection.greedy_dkd_asd)
    table = Table(
        title=f"ASFDA ranking ({ranking.strategy}, alpha={ranking.alpha}, K_s: {ranking.knowledge.kind})",
        caption=f"rank 1 = label first; {SCORE_CAPTIONS.get(fusion, SCORE_CAPTIONS[None])}, "
        "percentiles among the volumes left at that pick; every column in ranking.csv",
        padding=(0, 1),
    )
    # (name, justify, width the values need): numbers are never cut; the file name takes what is left,
    # folding onto more lines where it is longer (the only column rich may narrow: it never narrows a no_wrap one)
    for name, justify, width in (
        ("rank", "right", 4),
        ("file", "left", None),
        ("score", "right", 5),
        ("gap", "right", 5),
        ("div", "right", 5),
        ("ASD", "right", 5),
        ("fg mL", "right", 6),
        ("status", "left", 8),
    ):
        table.add_column(
            name,
            justify=justify,
            no_wrap=name != "file",
            overflow="fold",
            min_width=width,
            ratio=1 if name == "file" else None,
        )

    def num(v: float) -> str:
        return "" if not math.isfinite(v) else f"{v:.3f}"

    scored = [r for r in ranking.rows if r.status == "scored"]
    for row in scored[:limit]:
        style = "bold red" if row.selected else None
        table.add_row(
            str(row.rank),
            FileName(row.file),
            num(row.pick_score),
            num(row.knowledge_gap),
            num(row.diversity),
            num(row.asd),
            f"{row.foreground_ml:.1f}",
            "query" if row.selected else "",
            style=style,
        )
    if len(scored) > limit:
        table.add_row("…", f"{len(scored) - limit} more in ranking.csv", *[""] * 6)
    for row in ranking.rows:
        if row.status == "labelled":
            table.add_row("-", FileName(row.file), *[""] * 5, "labelled", style="green")
    skipped = [Text(f"skipped {row.file}: {row.reason}", style="yellow") for row in ranking.skipped]
    return Group(table, *skipped)
