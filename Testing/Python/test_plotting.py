"""Plots never cost a result: drawn on an Agg canvas without pyplot, and when they fail (no matplotlib, as
in a stock Slicer) the ranking is still written and the user is told why in one line."""

from __future__ import annotations

import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from ASFDALib.query.ranking import Ranking, RankRow
from ASFDALib.query.report import write_ranking
from ASFDALib.query.selection import Knowledge

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def _ranking() -> Ranking:
    """Five scored volumes, two of them queried, and one skipped file."""
    rows = [
        RankRow(
            rank=i + 1,
            file=f"case{i}.nii.gz",
            status="scored",
            selected=i < 2,
            priority=1.0 - 0.2 * i,
            dkd=0.9 - 0.15 * i,
            asd=0.3 + 0.05 * i,
            foreground_ml=120.0 + i,
            source_knowledge="bn",
        )
        for i in range(5)
    ]
    rows.append(RankRow(rank=None, file="broken.nii.gz", status="skipped", reason="unreadable"))
    return Ranking(rows=rows, knowledge=Knowledge("bn"), strategy="asfda", alpha=0.5, budget=2, model="net")


def test_the_ranking_plot_is_a_png_drawn_without_pyplot_or_a_backend_switch(tmp_path):
    """In a fresh process, so that nothing else has imported pyplot or chosen a backend before."""
    code = (
        "import sys, matplotlib\n"
        "from ASFDALib.query.report import write_ranking\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from test_plotting import _ranking\n"
        "written = write_ranking(_ranking(), sys.argv[1])\n"
        "print(sorted(written), written.warnings, matplotlib.rcParams._get_backend_or_none())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), str(Path(__file__).parent)],
        env={**{k: v for k, v in os.environ.items() if k != "MPLBACKEND"}, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # No backend was chosen. (pyplot itself may be imported: MONAI's jupyter_utils imports it whenever MONAI
    # is; that ASFDALib never imports pyplot is the AST scan below.)
    assert done.stdout.split("\n")[0] == "['csv', 'json', 'png'] [] None"
    assert (tmp_path / "ranking.png").read_bytes()[:8] == PNG


def test_without_matplotlib_the_ranking_is_written_and_the_reason_given_in_one_line(tmp_path, monkeypatch):
    first = write_ranking(_ranking(), tmp_path)  # an earlier round, with matplotlib
    assert first.warnings == [] and (tmp_path / "ranking.png").read_bytes()[:8] == PNG

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as in a stock Slicer: not installed
    written = write_ranking(_ranking(), tmp_path)

    assert sorted(written) == ["csv", "json"]
    assert json.loads((tmp_path / "ranking.json").read_text(encoding="utf-8"))["selected"] == [
        "case0.nii.gz",
        "case1.nii.gz",
    ]
    assert len((tmp_path / "ranking.csv").read_text().splitlines()) == 7  # header, 5 scored, 1 skipped
    assert not (tmp_path / "ranking.png").exists()  # the earlier round's picture does not pass for this one
    (warning,) = written.warnings
    assert "\n" not in warning
    assert warning.startswith(f"{tmp_path / 'ranking.png'}: not drawn, matplotlib cannot be imported")
    assert warning.endswith("to get it: pip install matplotlib (in Slicer: slicer.util.pip_install('matplotlib'))")


def test_any_other_plotting_failure_is_a_warning_too(tmp_path):
    (tmp_path / "ranking.png").mkdir()  # the picture cannot replace a folder
    written = write_ranking(_ranking(), tmp_path)
    assert sorted(written) == ["csv", "json"] and (tmp_path / "ranking.png").is_dir()
    (warning,) = written.warnings
    assert warning.startswith(f"{tmp_path / 'ranking.png'}: not drawn (IsADirectoryError: ")
    assert warning.endswith("; the other outputs are written")


def test_asfda_rank_without_matplotlib_succeeds_and_prints_why_there_is_no_plot(tmp_path, monkeypatch, capsys):
    from ASFDALib.app.cli import main
    from ASFDALib.bench.phantoms import write_phantoms

    write_phantoms(tmp_path / "pool", 3, "mri", seed=5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "session"
    assert main(["rank", "--images", str(tmp_path / "pool" / "images"), "--out", str(out), "--budget", "1"]) == 0
    printed = capsys.readouterr().out
    assert (out / "ranking.csv").is_file() and (out / "ranking.json").is_file()
    assert not (out / "ranking.png").exists()
    assert f"{out / 'ranking.png'}: not drawn, matplotlib cannot be imported" in printed
    assert json.loads((out / "session.json").read_text(encoding="utf-8"))["rounds"][0]["query"]  # the round is recorded


SWITCHES = ("matplotlib.use", "plt.switch_backend", "pyplot.switch_backend", "matplotlib.pyplot.switch_backend")


def _plotting_sources() -> list[Path]:
    return sorted([*REPO.glob("ASFDALib/**/*.py"), *REPO.glob("benchmarks/**/*.py"), *REPO.glob("ASFDA/**/*.py")])


def test_no_module_imports_pyplot_or_switches_the_backend():
    offenders = []
    for path in _plotting_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                names = [ast.unparse(node.func)]
            bad = [n for n in names if "pyplot" in n.split(".") or n in SWITCHES]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in bad]
    assert len(_plotting_sources()) > 30 and offenders == []


def test_baseline_rankings_plot_entropy_when_there_is_no_dkd(tmp_path):
    """Baselines have no DKD: the x axis is whole-volume entropy, still a picture."""
    ranking = _ranking()
    for i, row in enumerate(ranking.rows[:5]):
        row.dkd, row.entropy = math.nan, 0.1 * (i + 1)
    ranking.strategy = "entropy"
    written = write_ranking(ranking, tmp_path)
    assert written.warnings == [] and written["png"].read_bytes()[:8] == PNG


def _benchmark_report(out: Path) -> dict:
    from ASFDALib.bench.benchmark import BenchmarkConfig, Run, _report
    from ASFDALib.models.defaults import default_model_path

    config = BenchmarkConfig.quick()
    runs = [Run("source", 0, 0, [0.5, 0.4]), Run("random", 2, 0, [0.6, 0.5]), Run("asfda", 2, 0, [0.7, 0.65])]
    return _report(out, config, runs, ["background", "liver", "kidney"], 0.0, default_model_path())


def test_the_benchmark_draws_its_plot_and_keeps_its_results_without_matplotlib(tmp_path, monkeypatch):
    assert _benchmark_report(tmp_path / "with")["warnings"] == []
    assert (tmp_path / "with" / "benchmark.png").read_bytes()[:8] == PNG

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report = _benchmark_report(tmp_path / "without")
    assert (
        json.loads((tmp_path / "without" / "benchmark.json").read_text(encoding="utf-8"))["summary"]["asfda@2"]["runs"]
        == 1
    )
    assert "| ASFDA (DKD + ASD) | 2 |" in (tmp_path / "without" / "benchmark.md").read_text(encoding="utf-8")
    assert not (tmp_path / "without" / "benchmark.png").exists()
    assert report["warnings"][0].startswith(f"{tmp_path / 'without' / 'benchmark.png'}: not drawn, matplotlib")


def test_the_panel_ranks_without_matplotlib_and_logs_why_there_is_no_plot(tmp_path, monkeypatch):
    from ASFDALib.app.workflow import PanelSettings, Phase, Workflow
    from ASFDALib.bench.phantoms import write_phantoms

    write_phantoms(tmp_path / "pool", 3, "mri", seed=5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # a stock Slicer
    session = tmp_path / "session"
    flow = Workflow(
        PanelSettings(images=str(tmp_path / "pool" / "images"), session=str(session), budget=1, device="cpu")
    )
    flow.start_rank()
    flow.wait()
    assert flow.phase is Phase.RANKED and len(flow.rows) == 3 and len(flow.query) == 1
    assert (session / "ranking.csv").is_file() and not (session / "ranking.png").exists()
    assert [m for m in flow.log if "not drawn" in m] == [
        f"{session / 'ranking.png'}: not drawn, matplotlib cannot be imported (import of matplotlib halted; "
        "None in sys.modules); to get it: pip install matplotlib (in Slicer: slicer.util.pip_install('matplotlib'))"
    ]
