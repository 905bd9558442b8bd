"""Argument types for the command line: every value is checked while the arguments are parsed, so a
wrong one is a one-line error (``asfda rank: error: argument --alpha: ...``) before any work starts."""

from __future__ import annotations

import argparse
import difflib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def positive_int(text: str) -> int:
    """An integer >= 1 (a budget, iterations, a batch size)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (1 or more)")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a seed, stage-2 iterations where 0 means none)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; use 0 or more")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1] (a weight such as alpha)."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def fraction(text: str) -> float:
    """A share in (0, 1] (of a pool, say)."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]")
    return value


def probability(text: str) -> float:
    """A probability threshold in [0, 1)."""
    value = _number(text, float)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1)")
    return value


def positive_float(text: str) -> float:
    """A number > 0 (a learning rate)."""
    value = _number(text, float)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def existing_dir(text: str) -> Path:
    """A folder that exists."""
    path = Path(text).expanduser()
    if not path.is_dir():
        why = " (it is a file)" if path.is_file() else _spaced(text)
        raise argparse.ArgumentTypeError(f"{path} is not a folder{why}")
    return path


def existing_path(text: str) -> Path:
    """A file or folder that exists (a model, a card, labels to import)."""
    path = Path(text).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path} does not exist{_spaced(text)}")
    return path


def new_path(text: str) -> Path:
    """A file or folder a command writes (an --out): one that exists already is taken as it is, a new one whose
    name begins or ends with a space (a path pasted with one) is refused, since it would be another folder than
    the one meant, and Windows cannot keep a name ending with a space."""
    path = Path(text).expanduser()
    name = path.name
    if not path.exists() and name != name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: the name {_edge_space(name)} (a pasted path?); give it without")
    return path


def _edge_space(name: str) -> str:
    return "ends with a space" if name != name.rstrip() else "begins with a space"


def _spaced(text: str) -> str:
    """Where ``text`` has a space at an end of its name and the name without it exists: say so."""
    path = Path(text).expanduser()
    stripped = path.with_name(path.name.strip()) if path.name.strip() else path
    if stripped != path and stripped.exists():
        return f"; its name {_edge_space(path.name)}, and {stripped} exists: give that"
    return ""


def device(text: str) -> str:
    """auto, cpu, cuda, cuda:N (or mps)."""
    if not DEVICE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    if text.startswith("cuda"):  # checked while parsing, before any command writes a thing (torch only then)
        from ASFDALib.inference.device import cuda_problem

        if problem := cuda_problem(text):
            raise argparse.ArgumentTypeError(problem)
    return text


def json_object(text: str) -> dict:
    """A JSON object (a network's constructor arguments)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('not a JSON object; write it as {"name": value, ...}')
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """Distinct integers >= 1, comma- or space-separated, in the order given (budgets, evaluation points)."""
    values = tuple(_number(word, int) for word in text.replace(",", " ").split())
    if not values:
        raise argparse.ArgumentTypeError("empty; give numbers such as 2,4")
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]} is not a positive integer (1 or more)")
    _refuse_repeats(values)
    return values


def seed_list(text: str) -> tuple[int, ...]:
    """Training seeds: a comma list of distinct integers >= 0 (0,1,2), or one count N >= 1 (seeds 0..N-1)."""
    words = text.replace(",", " ").split()
    values = tuple(_number(word, int) for word in words)
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise argparse.ArgumentTypeError(
                f"{text}: one number is a count of seeds (N: seeds 0..N-1); "
                "use 1 for seed 0 alone, or a list such as 0,1"
            )
        return tuple(range(values[0]))
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are integers 0 or more, e.g. 0,1,2")
    _refuse_repeats(values)
    return values


def choice_list(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """A comma list of names from ``choices`` (at least one), returned in the order of ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        names = [w.strip() for w in text.split(",") if w.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"empty; choose from {', '.join(choices)}")
        for name in names:
            if name not in choices:
                close = difflib.get_close_matches(name, choices, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise argparse.ArgumentTypeError(f"unknown {name!r}; {hint}choose from {', '.join(choices)}")
        return tuple(c for c in choices if c in names)

    return parse


def _refuse_repeats(values: tuple[int, ...]) -> None:
    # A repeated budget or seed would be counted as another run and narrow the interval falsely.
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{repeated[0]} is listed twice; give each value once")


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
