"""What the panel installs into Slicer's Python, checked by version, with torch pinned where it is.

torch comes from the PyTorch extension, which picks the CUDA build for the user's driver. MONAI and co.
come from PyPI; without a constraint pip may resolve a PyPI torch over that build (a CPU-only or
wrong-CUDA wheel), so every install runs with a constraints file pinning torch to the installed version.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Optional

# torch.amp.GradScaler("cuda"), used by ASFDALib/adaptation/trainer.py, is new in torch 2.3;
# pyproject.toml says the same.
TORCH_FLOOR = "2.3"
TORCH_REQUIREMENT = f">={TORCH_FLOOR}"  # the form PyTorchUtils' installTorch(torchVersionRequirement=) takes

# Everything ASFDALib imports that a stock Slicer lacks (Slicer ships numpy, SimpleITK and pydicom). matplotlib
# draws ranking.png; it is installed here so a rank never fails at its last step.
REQUIREMENTS = (
    "monai>=1.4",
    "nibabel>=5.0",
    "einops>=0.6",
    "scipy>=1.10",
    "pyyaml>=6.0",
    "rich>=13.0",
    "matplotlib>=3.7",
    "filelock>=3.22",  # the session lock (torch brings it, but not every torch install)
)

_SPEC = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(>=|==)\s*([0-9][0-9A-Za-z.+!-]*)\s*$")


def parse(requirement: str) -> tuple[str, str, str]:
    """``"monai>=1.4"`` -> ``("monai", ">=", "1.4")``; only the two operators the panel uses."""
    match = _SPEC.match(requirement)
    if not match:
        raise ValueError(f"unsupported requirement {requirement!r}: write name>=version or name==version")
    return match.group(1), match.group(2), match.group(3)


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: ``"2.4.1+cu121"`` -> ``(2, 4, 1)``, ``"2.3.0rc1"`` -> ``(2, 3, 0)``."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:  # 2.3 == 2.3.0
        parts.pop()
    return tuple(parts)


def satisfied(requirement: str, installed: Optional[str]) -> bool:
    """Whether an installed version (None: not installed) meets ``requirement``."""
    _name, op, wanted = parse(requirement)
    if installed is None:
        return False
    if op == "==":
        return installed.strip() == wanted or release(installed) == release(wanted) and "+" not in wanted
    return release(installed) >= release(wanted)


def installed_version(name: str) -> Optional[str]:
    """The version pip recorded for a distribution, or None; reads metadata only (imports nothing heavy)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def unmet(
    requirements: Iterable[str] = REQUIREMENTS, version_of: Callable[[str], Optional[str]] = installed_version
) -> list[str]:
    """The requirements that are missing or older than asked, in the given order."""
    return [r for r in requirements if not satisfied(r, version_of(parse(r)[0]))]


def torch_problem(installed: Optional[str]) -> Optional[str]:
    """Why the installed torch cannot run ASFDA (one line naming the fix), or None when it can."""
    if installed is None:
        return "PyTorch is not installed: install the PyTorch extension from the Extensions Manager, then restart."
    if not satisfied(f"torch{TORCH_REQUIREMENT}", installed):
        return (
            f"torch {installed} is older than the {TORCH_FLOOR} ASFDA needs: update it in the PyTorch Utils "
            f"module (requirement torch{TORCH_REQUIREMENT}), then restart."
        )
    return None


def torch_pin(installed: str) -> str:
    """The constraint that keeps pip from moving torch: exactly the installed build, local label included."""
    return f"torch=={installed.strip()}"


def constraints_text(installed_torch: str) -> str:
    return f"# written by ASFDA: never replace the PyTorch extension's torch build\n{torch_pin(installed_torch)}\n"


def write_constraints(folder: Path, installed_torch: str) -> Path:
    """A pip constraints file (``pip install -c``) pinning torch; returns its path."""
    path = Path(folder) / "asfda-constraints.txt"
    path.write_text(constraints_text(installed_torch), encoding="utf-8")
    return path


def pip_arguments(requirements: Iterable[str], constraints: Path) -> list[str]:
    """Arguments for ``slicer.util.pip_install`` of Slicer < 5.12, which passes a list to ``pip install`` as is."""
    return ["-c", str(constraints), *requirements]


def report(version_of: Callable[[str], Optional[str]] = installed_version) -> str:
    """One line for the Setup section: each package's version, and what is missing or too old."""
    parts = []
    for requirement in (f"torch{TORCH_REQUIREMENT}", *REQUIREMENTS[:2]):
        name = parse(requirement)[0]
        found = version_of(name)
        if found is None:
            parts.append(f"{name} missing")
        elif not satisfied(requirement, found):
            parts.append(f"{name} {found} (needs {requirement[len(name) :]})")
        else:
            parts.append(f"{name} {found}")
    others = [parse(r)[0] for r in unmet(REQUIREMENTS[2:], version_of)]
    if others:
        parts.append("to install: " + ", ".join(others))
    return ", ".join(parts)
