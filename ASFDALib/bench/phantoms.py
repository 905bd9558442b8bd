"""Synthetic abdominal phantoms with labels, in a CT-like source domain and an MRI-like target domain.

A body (fat shell, muscle, spine) holds three organs of very different size: a large liver, two
medium kidneys and a small gallbladder, with jittered size and position and partial-volume edges.
The CT domain uses Hounsfield-like values; the MRI domain a T2-like contrast (fluid bright, fat bright,
liver dark), a smooth multiplicative bias field and Rician noise. The domain shift is real for a model
trained on CT: relative contrasts change, not only the scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ASFDALib.errors import ASFDAError

CLASS_NAMES = ["background", "liver", "kidney", "gallbladder"]
TISSUES = ("air", "fat", "muscle", "bone", "liver", "kidney", "gallbladder")
CONTRASTS = {
    "ct": dict(air=-1000, fat=-100, muscle=45, bone=450, liver=75, kidney=160, gallbladder=5),
    "mri": dict(air=0, fat=420, muscle=110, bone=70, liver=150, kidney=330, gallbladder=700),  # T2-like
    "mri_t1": dict(air=0, fat=600, muscle=180, bone=120, liver=320, kidney=230, gallbladder=60),  # T1-like
    "mri_inv": dict(air=0, fat=520, muscle=350, bone=60, liver=300, kidney=150, gallbladder=500),  # CT inverted
}
SUBGROUPS = ("none", "lesion", "missing_kidney")


@dataclass
class PhantomConfig:
    """Grid and appearance of one phantom domain."""

    domain: str = "ct"
    shape: tuple[int, int, int] = (72, 72, 56)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    noise: float = 12.0
    bias: float = 0.0
    blur: float = 0.8
    contrast: str | None = None  # a key of CONTRASTS; default: the domain's own
    subgroup: str = "none"  # the rare subgroup: "lesion" (cyst in the liver) or "missing_kidney"
    slice_factor: int = 1  # thick slices: this many 2 mm slices averaged into one (partial volume)
    fov_cut: float = 0.0  # up to this fraction of the slices cut at each end (field of view)
    # The rich anatomy (ASFDALib.bench.anatomy) and the acquisition knobs only it reads; the defaults
    # leave the ellipsoid phantoms, which the shipped default model was trained on, exactly as they were.
    anatomy: str = "ellipsoid"  # or "rich": five deformed organs (RICH_CLASS_NAMES), body-size factor
    body_scale: float = 1.0  # mean body-size factor (a site's patient population)
    body_size_sd: float = 0.08  # sd of the log body-size factor between patients
    deform: float = 5.0  # mm, largest displacement of the smooth deformation field
    noise_corr: float = 0.0  # voxels: noise correlation length (a soft CT kernel correlates its noise)
    fov_xy: float = 1.0  # fraction of the in-plane field of view kept (a smaller reconstruction circle)


SITES = {
    "A": PhantomConfig("mri", noise=25.0, bias=0.35),
    "B": PhantomConfig("mri", noise=15.0, bias=0.5, contrast="mri_t1", slice_factor=2, fov_cut=0.1),
    "C": PhantomConfig("mri", noise=35.0, bias=0.25, contrast="mri_inv", slice_factor=3, fov_cut=0.15),
}


def domain_config(domain: str) -> PhantomConfig:
    if domain == "ct":
        return PhantomConfig("ct", noise=12.0)
    if domain == "mri":
        return PhantomConfig("mri", noise=25.0, bias=0.35)
    raise ValueError(f"unknown phantom domain {domain!r}; use 'ct' or 'mri'")


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(axis=0) <= 1.0


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    import torch
    from monai.transforms import GaussianSmooth

    if sigma <= 0:
        return image
    return GaussianSmooth(sigma)(torch.from_numpy(image)[None]).numpy()[0]


def make_phantom(seed: int, config: PhantomConfig | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32, label uint8, RAS affine) of one phantom; the same seed gives the same anatomy."""
    config = config or domain_config("ct")
    if config.anatomy == "rich":
        return _make_rich_phantom(seed, config)
    if config.anatomy != "ellipsoid":
        raise ValueError(f"unknown phantom anatomy {config.anatomy!r}; use 'ellipsoid' or 'rich'")
    rng = np.random.default_rng(seed)
    spacing = np.asarray(config.spacing, dtype=np.float64)
    extent = np.asarray(config.shape) * spacing
    axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(config.shape, spacing, extent)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)  # RAS mm, body centred at 0

    def jitter(scale: float, size: int = 3) -> np.ndarray:
        return rng.normal(0.0, scale, size)

    body_r = extent * np.array([0.44, 0.36, 0.6]) * (1 + jitter(0.04))
    body = _ellipsoid(grid, np.zeros(3), body_r)
    inner = _ellipsoid(grid, np.zeros(3), body_r - np.array([8.0, 8.0, 0.0]))
    spine = (((grid[0] / 9.0) ** 2 + ((grid[1] + body_r[1] * 0.62) / 9.0) ** 2) <= 1) & body
    liver_c = np.array([-0.38 * body_r[0], 0.05 * body_r[1], 0.12 * extent[2]]) + jitter(3.0)
    liver = _ellipsoid(grid, liver_c, np.array([0.42, 0.55, 0.3]) * body_r * (1 + jitter(0.08))) & inner
    kidneys = np.zeros_like(body)
    for side in (-1, 1):
        centre = np.array([side * 0.45 * body_r[0], -0.4 * body_r[1], -0.12 * extent[2]]) + jitter(2.5)
        kidneys |= _ellipsoid(grid, centre, np.array([11.0, 14.0, 20.0]) * (1 + jitter(0.1)))
    kidneys &= inner & ~liver
    gb_c = liver_c + np.array([0.25 * body_r[0], 0.35 * body_r[1], -0.2 * extent[2] * 0.3]) + jitter(2.0)
    gallbladder = _ellipsoid(grid, gb_c, np.array([6.0, 7.0, 9.0]) * (1 + jitter(0.12))) & inner

    label = np.zeros(config.shape, np.uint8)
    label[liver] = 1
    label[kidneys] = 2
    label[gallbladder] = 3
    lesion = np.zeros_like(body)
    if config.subgroup != "none":  # a separate generator keeps the common anatomy identical per seed
        extra = np.random.default_rng(seed + 7_919)
        if config.subgroup == "lesion":
            lesion = _ellipsoid(grid, liver_c + extra.normal(0, 4, 3), np.full(3, extra.uniform(6, 10))) & liver
        elif config.subgroup == "missing_kidney":
            label[(label == 2) & (grid[0] > 0)] = 0
        else:
            raise ValueError(f"unknown subgroup {config.subgroup!r}; use one of {SUBGROUPS}")
    values = CONTRASTS[config.contrast or config.domain]
    tissue = np.full(config.shape, values["air"], np.float32)
    tissue[body] = values["fat"]
    tissue[inner] = values["muscle"]
    tissue[spine] = values["bone"]
    for index, organ in enumerate(("liver", "kidney", "gallbladder"), start=1):
        tissue[label == index] = values[organ] * (1 + rng.normal(0, 0.04))
    tissue[lesion] = values["gallbladder"]  # a fluid-filled cyst: still liver in the label
    texture = _smooth(rng.normal(0, 1, config.shape).astype(np.float32), 1.5) * config.noise
    image = _smooth(tissue + texture * (label > 0), config.blur)
    if config.bias:
        coefficients = jitter(config.bias, 3)
        image *= np.exp((coefficients[:, None, None, None] * grid / extent[:, None, None, None]).sum(axis=0))
    noise = rng.normal(0, config.noise, (2, *config.shape)).astype(np.float32)
    image = _add_noise(image, noise, config.domain)
    affine = _centred_affine(spacing, extent)
    image, label, affine = _acquire(image.astype(np.float32), label, affine, config, seed)
    return image, label, affine


def _add_noise(image: np.ndarray, noise: np.ndarray, domain: str) -> np.ndarray:
    """Magnitude (Rician) noise for MRI from two noise fields, additive noise for CT."""
    if domain == "mri":
        return np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return image + noise[0]


def _centred_affine(spacing: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """Voxel-to-world for a grid centred on the origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -extent / 2 + spacing / 2
    return affine


def _make_rich_phantom(seed: int, config: PhantomConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A phantom of the rich anatomy (ASFDALib.bench.anatomy), acquired as ``config`` says."""
    from ASFDALib.bench.anatomy import ORGAN_VALUES, rich_anatomy, rich_tissue

    rng = np.random.default_rng(seed)
    spacing = np.asarray(config.spacing, dtype=np.float64)
    extent = np.asarray(config.shape) * spacing
    axes = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(config.shape, spacing, extent)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    label, occupancy, _ = rich_anatomy(grid, extent, spacing, config, rng, seed)
    contrast = config.contrast or config.domain
    body = CONTRASTS.get(contrast, CONTRASTS["ct" if contrast.startswith("ct") else config.domain])
    tissue = rich_tissue(occupancy, body, ORGAN_VALUES[contrast], rng)
    texture = _smooth(rng.normal(0, 1, config.shape).astype(np.float32), 1.5) * config.noise
    image = _smooth(tissue + texture * (label > 0), config.blur)
    if config.bias:
        coefficients = rng.normal(0.0, config.bias, 3)
        image *= np.exp((coefficients[:, None, None, None] * grid / extent[:, None, None, None]).sum(axis=0))
    noise = rng.normal(0, 1, (2, *config.shape)).astype(np.float32)
    if config.noise_corr > 0:  # correlated noise of a soft reconstruction kernel, at the same sd
        noise = np.stack([_smooth(n, config.noise_corr) for n in noise])
        noise /= noise.reshape(2, -1).std(axis=1)[:, None, None, None]
    noise *= config.noise
    image = _add_noise(image, noise, config.domain)
    affine = _centred_affine(spacing, extent)
    if config.fov_xy < 1.0:  # a smaller reconstruction field: crop in-plane around a jittered centre
        keep = [max(8, int(round(n * config.fov_xy))) for n in config.shape[:2]]
        starts = [int(np.clip((n - k) // 2 + rng.integers(-2, 3), 0, n - k)) for n, k in zip(config.shape, keep)]
        window = tuple(slice(s, s + k) for s, k in zip(starts, keep))
        image, label = image[window], label[window]
        affine[:2, 3] += spacing[:2] * np.array(starts)
    return _acquire(image.astype(np.float32), label, affine, config, seed)


def _acquire(image: np.ndarray, label: np.ndarray, affine: np.ndarray, config: PhantomConfig, seed: int):
    """Thick slices (averaged, so edges get partial volume) and a cut field of view along z."""
    factor = max(1, int(config.slice_factor))
    if factor > 1:
        depth = image.shape[2] // factor * factor
        image = image[:, :, :depth].reshape(*image.shape[:2], -1, factor).mean(axis=3)
        label = label[:, :, factor // 2 : depth : factor]
        affine = affine.copy()
        affine[2, 3] += affine[2, 2] * (factor - 1) / 2
        affine[2, 2] *= factor
    if config.fov_cut > 0:
        rng = np.random.default_rng(seed + 104_729)
        low, high = (int(rng.uniform(0, config.fov_cut) * image.shape[2]) for _ in range(2))
        keep = slice(low, image.shape[2] - high)
        image, label = image[:, :, keep], label[:, :, keep]
        affine = affine.copy()
        affine[2, 3] += affine[2, 2] * low
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def site_config(site: str, subgroup: str = "none") -> PhantomConfig:
    from dataclasses import replace

    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; use one of {', '.join(SITES)}")
    return replace(SITES[site], subgroup=subgroup)


def write_pool(
    folder: Path,
    count: int,
    seed: int = 0,
    sites: str = "ABC",
    rare_fraction: float = 0.1,
    prefix: str = "case",
    anatomy: str = "ellipsoid",
) -> list[dict]:
    """A multi-site MRI-like target pool with labels and ``cases.json`` (site and subgroup of each case).

    Sites take turns; ``rare_fraction`` of the cases (at least one) belong to the rare subgroups.
    ``anatomy="rich"`` draws the rich anatomy (ASFDALib.bench.anatomy) at the same sites.
    """
    from ASFDALib.atomic import atomic_write_json
    from ASFDALib.data.volumes import write_nifti

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    rare = set(rng.permutation(count)[: max(1, int(round(count * rare_fraction)))].tolist()) if count else set()
    cases = []
    for i in range(count):
        site = sites[i % len(sites)]
        subgroup = SUBGROUPS[1 + i % 2] if i in rare else "none"
        config = site_config(site, subgroup)
        if anatomy != "ellipsoid":
            from dataclasses import replace

            config = replace(config, anatomy=anatomy)
        image, label, affine = make_phantom(seed * 100_003 + 50_000 + i, config)
        name = f"{prefix}_{i:03d}_site{site}.nii.gz"
        write_nifti(folder / "images" / name, np.round(image).astype(np.uint16), affine)
        write_nifti(folder / "labels" / name, label, affine)
        cases.append({"name": name, "site": site, "subgroup": subgroup})
    atomic_write_json(folder / "cases.json", {"seed": seed, "cases": cases})
    return cases


def phantom_names(count: int, domain: str, prefix: str | None = None) -> list[str]:
    """The file names ``write_phantoms`` gives its volumes (and their labels)."""
    return [f"{prefix or domain}_{i:03d}.nii.gz" for i in range(count)]


def write_phantoms(
    folder: Path,
    count: int,
    domain: str = "ct",
    seed: int = 0,
    labels: bool = True,
    prefix: str | None = None,
    replace: bool = False,
) -> list[Path]:
    """Write ``count`` phantoms as NIfTI into ``folder/images`` (and ``folder/labels``); returns image paths.

    Refused, before any is written, where a file to write exists (a pool a session ranks may be there), unless
    ``replace`` (a folder of the caller's own phantoms, made again)."""
    from ASFDALib.data.volumes import write_nifti

    folder = Path(folder)
    targets = [
        folder / sub / n for n in phantom_names(count, domain, prefix) for sub in ("images", "labels")[: 1 + labels]
    ]
    there = [p for p in targets if p.exists()]
    if there and not replace:
        raise ASFDAError(
            f"{there[0]}: already exists ({len(there)} of the files to write do); phantoms never replace a volume: "
            "choose a new folder"
        )
    config = domain_config(domain)
    dtype = np.int16 if domain == "ct" else np.uint16
    paths = []
    for i, name in enumerate(phantom_names(count, domain, prefix)):
        image, label, affine = make_phantom(seed * 100_003 + i, config)
        paths.append(write_nifti(folder / "images" / name, np.round(image).astype(dtype), affine))
        if labels:
            write_nifti(folder / "labels" / name, label, affine)
    return paths
