"""Where the embedded default lives: the small model in Resources/Model and the generated sample pool."""

from __future__ import annotations

from pathlib import Path

from ASFDALib.errors import ASFDAError

DEFAULT_MODEL_NAME = "asfda_default.pt"
SAMPLE_COUNT = 12
SAMPLE_SEED = 7


def resources_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "Resources"  # ASFDALib/models/defaults.py -> the repository


def default_model_path() -> Path:
    path = resources_dir() / "Model" / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise ASFDAError(
            f"{path}: the embedded default model is missing; install ASFDA from its source tree "
            "(pip install -e .) or pass --model"
        )
    return path


def sample_images(folder: Path) -> Path:
    """The sample MRI-like target pool (phantoms), generated once into ``folder`` with a fixed seed; again where a
    rank stopped part-way left it short of a volume or of a label (the same bytes: its scans are unchanged)."""
    from ASFDALib.bench.phantoms import write_phantoms

    images = Path(folder) / "images"
    if any(len(list((Path(folder) / sub).glob("*.nii.gz"))) < SAMPLE_COUNT for sub in ("images", "labels")):
        write_phantoms(Path(folder), SAMPLE_COUNT, "mri", seed=SAMPLE_SEED, labels=True, prefix="sample", replace=True)
    return images
