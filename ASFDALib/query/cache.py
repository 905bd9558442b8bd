"""On-disk cache of per-volume sweep results, keyed by file content, model and preprocessing.

Re-ranking with another alpha, budget or strategy reads these instead of running the network, and an
interrupted ranking resumes: each volume's result is written atomically as soon as it is scored.
A small index maps (path, size, mtime) to the content hash so a re-rank does not re-read every file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ASFDALib.atomic import atomic_write_json, atomic_write_npz
from ASFDALib.data.volumes import content_hash, content_stamp
from ASFDALib.inference.sweep import SweepResult
from ASFDALib.query.features import FeatureSummary

# "2": scans only; a "1" entry may hold the sweep of a label map scored before pools told them apart
SCORING_VERSION = "2"


# entries (sweeps .npz; scalars and class entropies .json), the index, unfinished writes
_ENTRY = re.compile(r"^[0-9a-f]{32}\.(npz|json)$|^index\.json$|^\..+\.tmp$")


def is_score_cache(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but a score cache (what an interrupted first rank leaves behind)."""
    folder = Path(folder)
    return folder.is_dir() and all(p.is_file() and _ENTRY.match(p.name) for p in folder.iterdir())


@dataclass
class ScoreCache:
    folder: Path

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index_path = self.folder / "index.json"
        try:
            self._index = json.loads(self._index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._index = {}

    def file_hash(self, path: Path) -> str:
        """Content hash of ``path``, reused while its size and modification time are unchanged."""
        stamp = content_stamp(path)
        entry = self._index.get(str(path.resolve()))
        if entry and entry["stamp"] == stamp:
            return entry["sha256"]
        digest = content_hash(path)
        self._index[str(path.resolve())] = {"stamp": stamp, "sha256": digest}
        atomic_write_json(self._index_path, self._index)
        return digest

    @staticmethod
    def key(file_hash: str, model_digest: str, preprocessing: str, extra: str = "") -> str:
        text = "|".join((SCORING_VERSION, file_hash, model_digest, preprocessing, extra))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.npz"

    def get(self, key: str) -> SweepResult | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            return SweepResult(
                asd=float(arrays["asd"]),
                entropy=float(arrays["entropy"]),
                energy=float(arrays["energy"]),
                fg_ml=float(arrays["fg_ml"]),
                otsu=float(arrays["otsu"]),
                class_fractions=arrays["class_fractions"],
                summary=FeatureSummary.from_arrays(arrays),
                shape=tuple(int(s) for s in arrays["shape"]),
                windows=int(arrays["windows"]),
                prototype_gap=float(arrays.get("prototype_gap", np.nan)),
            )
        except Exception:  # noqa: BLE001 - a damaged cache entry is simply recomputed
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, result: SweepResult) -> None:
        arrays = {
            "asd": np.float64(result.asd),
            "entropy": np.float64(result.entropy),
            "energy": np.float64(result.energy),
            "fg_ml": np.float64(result.fg_ml),
            "otsu": np.float64(result.otsu),
            "class_fractions": result.class_fractions,
            "shape": np.asarray(result.shape),
            "windows": np.int64(result.windows),
            "prototype_gap": np.float64(result.prototype_gap),
            **result.summary.to_arrays(),
        }
        atomic_write_npz(self._path(key), arrays)

    def get_scalar(self, key: str) -> float | None:
        path = self.folder / f"{key}.json"
        try:
            return float(json.loads(path.read_text(encoding="utf-8"))["value"])
        except (OSError, ValueError, KeyError):
            return None

    def put_scalar(self, key: str, value: float) -> None:
        atomic_write_json(self.folder / f"{key}.json", {"value": value})
