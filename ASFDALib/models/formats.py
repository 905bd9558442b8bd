"""The formats a session's model is exported in (``asfda export --format``, the panel's Export), and which of them
can carry a given model. Torch-free, so the Slicer panel can offer the format that works before torch is imported.

A MONAI bundle names its network for MONAI's bundle runner to build, so it carries a MONAI network by name, or a
bundle re-exported as itself. A TorchScript model or a ``torch.export`` program has no network by name and is
exported as itself; ASFDA's own rebuilds of nnU-Net networks (``ASFDALib.models.resenc``) are networks MONAI does
not have, carried by the programs, which hold the network with them.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("bundle", "pt2", "torchscript")
DEFAULT_NAMES = {"pt2": "model.pt2", "torchscript": "model.ts"}
SUFFIXES = {fmt: Path(name).suffix for fmt, name in DEFAULT_NAMES.items()}  # a program's file type
# The networks ASFDA builds itself (ASFDALib.models.loading.ASFDA_NETWORKS, which imports torch; a test checks
# that the two name the same networks)
OWN_NETWORKS = ("ResidualEncoderUNet",)


def format_named_by(out: Path) -> str | None:
    """The program format an export's file name asks for by its suffix (``m.pt2``, ``m.ts``), else None."""
    return next((fmt for fmt, suffix in SUFFIXES.items() if Path(out).suffix.lower() == suffix), None)


def program_file(out: Path, fmt: str) -> Path:
    """The file a program export given ``out`` writes: ``out`` where it names a file (has a suffix), else the
    format's default name in that folder."""
    return out if out.suffix else out / DEFAULT_NAMES[fmt]


def formats_without_bundle(kind: str, network: str | None) -> tuple[str, ...]:
    """The formats that carry a model which a MONAI bundle cannot, the first preferred; ``()`` when a bundle can.

    ``kind`` is how the model was loaded (``LoadedModel.kind``, as session.json records it) and ``network`` the name
    its network was built by (None for a TorchScript model, a program, or a bundle built by its own config)."""
    if network is None:
        # a bundle built by its own config is re-exported as itself; a program only as the same kind of program
        return () if kind == "bundle" else ("torchscript",) if kind == "torchscript" else ("pt2",)
    return ("pt2", "torchscript") if network in OWN_NETWORKS else ()


def recorded_network(record: dict) -> tuple[str, str | None]:
    """The kind and network name of a model as session.json records it (its ``model``), for the functions here."""
    return record.get("kind", ""), (record.get("network") or {}).get("name")


def default_format(kind: str, network: str | None) -> str:
    """The format a model is exported in unless the user picks another: a bundle where one carries it."""
    return (formats_without_bundle(kind, network) or ("bundle",))[0]


def session_format(record: dict | None) -> str:
    """The format a session's model is exported in unless the user picks another (``asfda export`` without
    ``--format``, and the one the panel's Export offers): :func:`default_format` of the model session.json records
    (``record``, its ``model``); a bundle before any model is recorded."""
    return default_format(*recorded_network(record)) if record else "bundle"
