"""Rich phantom anatomy: five organs with smoothly deformed shapes, sized and placed by one body-size factor,
a thin elongated pancreas, a small gallbladder, rare subgroups and partial-volume edges.

Used by ``PhantomConfig(anatomy="rich")`` (:func:`ASFDALib.bench.phantoms.make_phantom`); the default
``"ellipsoid"`` anatomy, which the shipped default model was trained on, is untouched.

* **Body size**: one factor s = body_scale · exp(N(0, body_size_sd)) scales the body and every organ's
  centre and radii, so positions and sizes vary together as they do between patients.
* **Shapes**: each organ is an implicit shape (ellipsoid, or a tube along a curved centre line for the
  pancreas) evaluated at x + D(x), D a smooth random displacement field (white noise smoothed with a
  Gaussian of ``DEFORM_SIGMA`` voxels, scaled to at most ``deform`` mm), so surfaces bend smoothly.
* **Partial volume**: each organ's occupancy of a voxel ramps linearly from 1 to 0 over one voxel
  across its surface (from the approximate signed distance); intensities mix by occupancy, the label is
  the organ covering at least half the voxel.
* **Rare subgroups**: "lesion" (a fluid cyst inside the liver, still labelled liver) and
  "missing_kidney" (no right kidney), the same names as the ellipsoid anatomy.
"""

from __future__ import annotations

import numpy as np

RICH_CLASS_NAMES = ["background", "liver", "spleen", "kidney", "pancreas", "gallbladder"]
ORGANS = RICH_CLASS_NAMES[1:]
DEFORM_SIGMA = 6.0  # voxels: the displacement field's smoothness
# Organ intensities per contrast (body tissues come from phantoms.CONTRASTS). CT phases change the
# enhancement of the organs as iodine arrives: native, arterial, portal venous, delayed.
ORGAN_VALUES = {
    "ct": dict(liver=75, spleen=60, kidney=160, pancreas=50, gallbladder=5),
    "ct_native": dict(liver=55, spleen=45, kidney=35, pancreas=40, gallbladder=5),
    "ct_arterial": dict(liver=70, spleen=125, kidney=190, pancreas=115, gallbladder=8),
    "ct_portal": dict(liver=110, spleen=115, kidney=165, pancreas=95, gallbladder=8),
    "ct_delayed": dict(liver=80, spleen=80, kidney=125, pancreas=65, gallbladder=10),
    "mri": dict(liver=150, spleen=300, kidney=330, pancreas=180, gallbladder=700),
    "mri_t1": dict(liver=320, spleen=200, kidney=230, pancreas=380, gallbladder=60),
    "mri_inv": dict(liver=300, spleen=180, kidney=150, pancreas=250, gallbladder=500),
}
PAINT_ORDER = ("kidney", "spleen", "pancreas", "liver", "gallbladder")  # later organs win overlaps


def displacement_field(shape: tuple[int, ...], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """(3, X, Y, Z) smooth displacement in mm, each component scaled to a maximum of ``amplitude``.

    White noise on a grid 4x coarser, smoothed there (σ = DEFORM_SIGMA / 4) and upsampled trilinearly:
    the same smoothness as smoothing at full resolution, at a sixtieth of the cost.
    """
    import torch

    from ASFDALib.bench.phantoms import _smooth

    coarse = tuple(max(2, -(-n // 4)) for n in shape)
    field = np.stack([_smooth(rng.normal(0, 1, coarse).astype(np.float32), DEFORM_SIGMA / 4) for _ in range(3)])
    field = torch.nn.functional.interpolate(
        torch.from_numpy(field)[None], size=tuple(shape), mode="trilinear", align_corners=True
    )[0].numpy()
    peak = np.abs(field).reshape(3, -1).max(axis=1)
    return (field / np.maximum(peak, 1e-12)[:, None, None, None] * amplitude).astype(np.float32)


def _ellipsoid_distance(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm) to an ellipsoid's surface: (|x'| − 1) · the harmonic mean radius."""
    f = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(axis=0))
    return (f - 1.0) * (3.0 / (1.0 / radii).sum())


def _tube_distance(grid: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (mm) to a tube of ``radius`` around the polyline ``points`` (k, 3)."""
    flat = grid.reshape(3, -1).T
    best = np.full(len(flat), np.inf, dtype=np.float32)
    for a, b in zip(points[:-1], points[1:]):
        ab = b - a
        t = np.clip(((flat - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.linalg.norm(flat - (a + t[:, None] * ab), axis=1))
    return best.reshape(grid.shape[1:]) - radius


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, count: int = 16) -> np.ndarray:
    t = np.linspace(0.0, 1.0, count)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def organ_distances(
    grid: np.ndarray, extent: np.ndarray, size: float, rng: np.random.Generator, subgroup: str = "none"
) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Signed distances (mm, negative inside) of every organ and of the body, evaluated at ``grid``
    (already displaced for the organs), and the drawn geometry (for tests and the lesion)."""

    def jitter(scale: float, n: int = 3) -> np.ndarray:
        return rng.normal(0.0, scale, n)

    body_r = extent * np.array([0.44, 0.36, 0.6]) * size * (1 + jitter(0.03))
    bx, by, bz = body_r
    ez = extent[2]
    geometry: dict = {"body_radii": body_r, "size": size}
    d: dict[str, np.ndarray] = {}
    liver_c = np.array([-0.38 * bx, 0.05 * by, 0.12 * ez * size]) + jitter(3.0)
    liver_r = np.array([0.42 * bx, 0.55 * by, 0.3 * bz]) * (1 + jitter(0.06))
    d["liver"] = _ellipsoid_distance(grid, liver_c, liver_r)
    spleen_c = np.array([0.62 * bx, -0.1 * by, 0.14 * ez * size]) + jitter(2.5)
    d["spleen"] = _ellipsoid_distance(grid, spleen_c, np.array([11.0, 17.0, 22.0]) * size * (1 + jitter(0.1)))
    kidney = []
    for side in (-1, 1):
        if subgroup == "missing_kidney" and side == 1:
            continue  # the kidney at x > 0 is absent, as in the ellipsoid anatomy
        centre = np.array([side * 0.45 * bx, -0.4 * by, -0.12 * ez * size]) + jitter(2.5)
        kidney.append(_ellipsoid_distance(grid, centre, np.array([10.0, 13.0, 19.0]) * size * (1 + jitter(0.08))))
    d["kidney"] = np.minimum.reduce(kidney)
    head = np.array([-0.28 * bx, 0.02 * by, -0.02 * ez * size]) + jitter(2.0)
    tail = np.array([0.5 * bx, -0.28 * by, 0.06 * ez * size]) + jitter(2.0)
    bend = (head + tail) / 2 + np.array([0.0, 0.18 * by, 0.0]) + jitter(2.0)
    centre_line = _bezier(head, bend, tail)
    pancreas_radius = 4.5 * size * float(np.exp(rng.normal(0, 0.08)))
    d["pancreas"] = _tube_distance(grid, centre_line, pancreas_radius)
    gb_c = liver_c + np.array([0.3 * bx, -0.05 * by, -0.1 * bz]) + jitter(2.0)
    d["gallbladder"] = _ellipsoid_distance(grid, gb_c, np.array([6.0, 7.0, 10.0]) * size * (1 + jitter(0.1)))
    geometry.update(
        liver_centre=liver_c, liver_radii=liver_r, pancreas_line=centre_line, pancreas_radius=pancreas_radius
    )
    return d, body_r, geometry


def rich_anatomy(
    grid: np.ndarray, extent: np.ndarray, spacing: np.ndarray, config, rng: np.random.Generator, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(label, occupancy per organ and body tissue, geometry) of one rich phantom on ``grid`` (3, X, Y, Z)."""
    size = float(config.body_scale * np.exp(rng.normal(0.0, config.body_size_sd)))
    field = displacement_field(grid.shape[1:], config.deform, rng)
    distances, body_r, geometry = organ_distances(grid + field, extent, size, rng, config.subgroup)
    voxel = float(np.mean(spacing))
    body_d = _ellipsoid_distance(grid, np.zeros(3), body_r)
    inner_d = _ellipsoid_distance(grid, np.zeros(3), np.maximum(body_r - np.array([8.0, 8.0, 0.0]) * size, 1.0))

    def occupancy(distance: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - distance / voxel, 0.0, 1.0).astype(np.float32)

    occ = {"body": occupancy(body_d), "inner": occupancy(inner_d)}
    spine = (((grid[0] / (9.0 * size)) ** 2 + ((grid[1] + body_r[1] * 0.62) / (9.0 * size)) ** 2) <= 1) & (body_d < 0)
    occ["bone"] = spine.astype(np.float32)
    label = np.zeros(grid.shape[1:], np.uint8)
    for organ in PAINT_ORDER:
        o = occupancy(distances[organ]) * occ["inner"]  # organs stay inside the muscle wall
        occ[organ] = o
        label[o >= 0.5] = RICH_CLASS_NAMES.index(organ)
    _drop_fragments(label)
    occ["lesion"] = np.zeros_like(occ["body"])
    if config.subgroup == "lesion":
        extra = np.random.default_rng(seed + 7_919)
        centre = geometry["liver_centre"] + extra.normal(0, 4, 3)
        lesion_d = _ellipsoid_distance(grid + field, centre, np.full(3, extra.uniform(6, 10) * size))
        occ["lesion"] = occupancy(lesion_d) * (label == 1)
    geometry["field"] = field
    return label, occ, geometry


def _drop_fragments(label: np.ndarray, fraction: float = 0.05) -> None:
    """Give slivers an organ's neighbours cut off (a voxel or two where the pancreas tail crosses the
    spleen's edge) to the label around them, so every organ is whole (the kidneys: two)."""
    from scipy import ndimage

    for c in range(1, len(RICH_CLASS_NAMES)):
        parts, count = ndimage.label(label == c)
        if count < 2:
            continue
        sizes = np.bincount(parts.ravel())[1:]
        for part in np.flatnonzero(sizes < fraction * sizes.max()) + 1:
            mask = parts == part
            ring = ndimage.binary_dilation(mask) & ~mask
            label[mask] = np.bincount(label[ring]).argmax() if ring.any() else 0


def rich_tissue(occ: dict[str, np.ndarray], body: dict, organs: dict, rng: np.random.Generator) -> np.ndarray:
    """Intensities mixed by occupancy: air, fat, muscle wall, spine, then the organs in paint order."""
    tissue = np.full(occ["body"].shape, body["air"], np.float32)
    for name, value in (("body", body["fat"]), ("inner", body["muscle"])):
        tissue += occ[name] * (value - tissue)
    tissue[occ["bone"] > 0] = body["bone"]
    for organ in PAINT_ORDER:
        value = organs[organ] * (1 + rng.normal(0, 0.04))
        tissue += occ[organ] * (value - tissue)
    tissue += occ["lesion"] * (organs["gallbladder"] - tissue)  # a fluid-filled cyst, still liver in the label
    return tissue
