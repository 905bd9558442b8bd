"""The source-statistics file: a model provider's privacy-safe summary of the source domain.

It holds the pooled per-channel feature moments of the source volumes at the tapped layers (no images,
no labels), so users of a model without BatchNorm still get the knowledge-gap term of DKD.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ASFDALib.data.preprocess import preprocess
from ASFDALib.data.volumes import discover_volumes, read_scan
from ASFDALib.errors import ASFDAError, VolumeError
from ASFDALib.inference.sweep import SweepConfig, sweep
from ASFDALib.models.loading import LoadedModel
from ASFDALib.query.features import FeatureSummary, mean_summaries


def compute_source_stats(
    model: LoadedModel,
    folder: Path,
    out: Path,
    device: str = "auto",
    recursive: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[FeatureSummary, list[str]]:
    """Summarise every readable volume under ``folder`` and write the pooled summary to ``out`` (.npz)."""
    if model.scripted:
        raise ASFDAError(f"{model.path}: TorchScript models cannot be tapped; load the state dict or bundle instead")
    paths = discover_volumes(folder, recursive)
    summaries, skipped = [], []
    for i, path in enumerate(paths):
        if progress:
            progress(i, len(paths), path.name)
        try:
            image = preprocess(read_scan(path), model.card)  # a label map in the folder is skipped
            summaries.append(sweep(model.network, image, model.card, SweepConfig(device=device)).summary)
        except VolumeError as exc:
            skipped.append(str(exc))
    if progress:
        progress(len(paths), len(paths), "")
    if not summaries:
        raise ASFDAError(f"{folder}: no readable source volumes" + (f" ({skipped[0]})" if skipped else ""))
    pooled = mean_summaries(summaries)
    pooled.save(out)
    return pooled, skipped
