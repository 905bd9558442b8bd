"""The benchmark commands the README prints made the results it cites: each command, as `asfda benchmark`
parses it, asks for the protocol (options, model, data counts) stored in the results folder its table comes
from, and every row, budget and seed it names is there. A default changed since, or a command edited without
its results, fails here instead of misleading a reader who re-runs it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from ASFDALib.app.cli import build_parser
from ASFDALib.app.commands import benchmark_config
from ASFDALib.bench.benchmark import options_protocol, stored_protocol
from ASFDALib.data.volumes import content_hash
from ASFDALib.models.defaults import default_model_path

ROOT = Path(__file__).resolve().parents[2]
# each printed command's --out, and the folder under benchmarks/results/ its table was made in
RESULTS = {
    "bench-ct": "ct_shift/main",
    "bench-ct-defaults": "ct_shift/defaults",
    "bench-ct-fallback": "ct_shift/fallback",
    "bench-ct-blend": "ct_shift/blend",
    "bench-ct-mix": "ct_shift/copy-paste",
    "bench-ct-full": "ct_shift/upper-bound",
    "bench-ct-s2long": "ct_shift/stage2-long",
    "bench-ct-in": "ct_shift/instance",
    "bench-ct-in-blend": "ct_shift/instance-blend",
    "bench-ct-in4-blend": "ct_shift/instance-4labels-blend",
    "bench-ct-in-mix": "ct_shift/instance-copy-paste",
    "bench-ct-in4-mix": "ct_shift/instance-4labels-copy-paste",
    "bench-mri": "mri_rich/main",
    "bench-mri-defaults": "mri_rich/defaults",
    "bench-mri-fallback": "mri_rich/fallback",
    "bench-mri-ema": "mri_rich/ema",
    "bench-mri-ema-half": "mri_rich/ema-half",
    "bench-mri-remap": "mri_rich/remap",
}


def readme_benchmark_commands() -> list[list[str]]:
    """Every `asfda benchmark` command in the README's code blocks, as arguments; a line that starts
    `asfda benchmark ...` repeats its block's first command with the options it adds (argparse: last wins)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        first: list[str] | None = None
        for line in block.replace("\\\n", " ").splitlines():
            if not line.startswith("asfda benchmark"):  # other blocks need not be shell at all
                continue
            words = shlex.split(line.split("#")[0])
            if "--out" not in words:
                continue
            if words[2] == "...":
                assert first is not None, f"README: {line!r} repeats no command"
                words = first + words[3:]
            elif first is None:
                first = words
            commands.append(words[2:])
    return commands


COMMANDS = [c for c in readme_benchmark_commands() if c[c.index("--out") + 1] in RESULTS]


def test_every_results_folder_the_readme_cites_has_its_command():
    outs = {c[c.index("--out") + 1] for c in COMMANDS}
    assert outs == set(RESULTS)
    for args in readme_benchmark_commands():  # the rest is a template for the user's own data
        assert args[args.index("--out") + 1] in RESULTS or "my_model.pt" in args


@pytest.mark.parametrize("command", COMMANDS, ids=[c[c.index("--out") + 1] + f"-{i}" for i, c in enumerate(COMMANDS)])
def test_a_readme_benchmark_command_asks_for_the_protocol_its_results_were_made_with(command):
    args = build_parser().parse_args(["benchmark", *command])
    config, folders, model = benchmark_config(args)
    stored = json.loads((ROOT / "benchmarks" / "results" / RESULTS[str(args.out)] / "results.json").read_text())
    protocol = stored_protocol(stored["protocol"])
    asked = options_protocol(config)
    assert {k: protocol.get(k) for k in asked} == asked
    if "model" in protocol:  # recorded since inputs were fingerprinted
        assert content_hash(ROOT / model if model else default_model_path()) == protocol["model"]
    assert folders is None and {k: stored["config"][k] for k in ("pool", "test", "validation")} == {
        "pool": config.pool,
        "test": config.test,
        "validation": config.validation,
    }
    ran = {(r["row"], r["budget"], r["seed"]) for r in stored["runs"]}
    for row in config.rows:
        if row in ("source", "full"):  # no labels chosen: one run stands for every budget
            assert any(r == row for r, _, _ in ran), row
            continue
        missing = [(b, s) for b in config.budgets for s in config.seeds if (row, b, s) not in ran]
        assert not missing, f"{row}: no run at (budget, seed) {missing}"


def test_the_readmes_python_example_runs_as_printed(mri_pool, tmp_path, monkeypatch, capsys):
    """The "From Python" block, verbatim, in a folder holding the pool (it ranks the session itself)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### From Python\n.*?```python\n(.*?)^```", text, re.S | re.M).group(1)
    shutil.copytree(mri_pool, tmp_path / "pool")
    shutil.copytree(ROOT / "Resources" / "Model", tmp_path / "Resources" / "Model")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (From Python)", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    session = json.loads(Path("session/session.json").read_text())
    queried = session["rounds"][0]["query"]
    assert [line.split()[:2] for line in printed[:2]] == [["1", queried[0]], ["2", queried[1]]]
    assert all(re.fullmatch(r"\d \S+ DKD \d\.\d{3} ASD \d\.\d{3}", line) for line in printed[:2])
    assert sorted(session["labels"]) == sorted(queried)  # the import is recorded without a save of the caller's
    imported, rest = printed[2].split("] ", 1)
    assert imported == str(sorted(queried))[:-1]
    status, rest = rest.split(" ", 1)
    iterations, checkpoint = rest.rsplit(" ", 1)
    assert (status, iterations, Path(checkpoint)) == (
        "done",
        "{'stage1': 100, 'stage2': 50}",
        Path("session", "checkpoints", "round1", "final.pt"),
    )
    count, held_out, dice = re.fullmatch(r"(\d+) maps, (\d+) held out, mean Dice (\S+)", printed[3]).groups()
    assert int(count) == len(list(Path("pool/images").iterdir())) and 0 < float(dice) <= 1
    assert int(held_out) == int(count) - len(queried)  # the two labelled cases are left out
    made_by = json.loads(Path("pool_pred/asfda_predictions.json").read_text())["made_by"]
    assert {m["model"] for m in made_by.values()} == {"adapted"}
