"""The fine-tuning recipe, defined once: the defaults every caller (CLI, panel, demo, benchmark) starts from,
the learning rates of pre-trained and new parameters, and the pseudo-label weight's ramp. Pure Python,
so the command line's help reads its defaults without loading torch.

docs/method.md, "Fine-tuning recipe", records how the defaults were chosen.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ASFDALib.errors import ValueOutOfRange

LOWER_RATE_FOR = ("encoder", "loaded")
# How a pseudo-label is judged reliable (adaptation/pseudo.py): the model's confidence, or agreement between
# two views, the volume flipped or the model the round started from.
RELIABILITY = ("confidence", "flips", "rounds")
# Which gate judges when the asked one keeps no volume ("none": stage 2 then trains on the labels alone).
# Not "rounds": it needs the round's starting model, and is the gate a fallback stands in for.
FALLBACKS = ("flips", "confidence", "none")
# How stage 2's learning rate runs: held, or decayed to zero along a half cosine, so that the model handed
# over is a settled end point rather than one sample of a walk at a constant rate.
STAGE2_LR = ("constant", "cosine")
# Who labels the pseudo-labelled patches: the stage-1 model once, or an EMA of the student online (trainer.py);
# "ema-if-fallback" is the EMA teacher where the fallback gate judged, the fixed one where the asked gate did
# (stage2_teacher resolves it once the gate has judged).
TEACHERS = ("fixed", "ema", "ema-if-fallback")
# How the pseudo-labelled patches are augmented (adaptation/patches.py); "remap-if-fallback" is "remap" where the
# fallback gate judged, "strong" where the asked gate did (stage2_augment resolves it once the gate has judged).
AUGMENTS = ("weak", "strong", "remap", "remap-if-fallback")
# What the pseudo-labelled patches are mixed with (adaptation/patches.copy_paste): nothing, or a labelled patch
# (bidirectional copy-paste); only the fixed teacher's labels can be mixed (stage2_mix resolves it).
MIXES = ("none", "copy-paste")


@dataclass
class FinetuneConfig:
    """The fine-tuning recipe; the defaults suit a few labelled volumes on a CPU."""

    iterations: int = 200
    pseudo_iterations: int = 200
    batch_size: int = 2
    lr: float = 3e-3
    encoder_lr_scale: float = 0.3
    # Which checkpoint tensors train at lr * encoder_lr_scale: "loaded", every one; "encoder", only those
    # inside the encoder (a loaded decoder then adapts at the full rate). New tensors: the full rate.
    # docs/method.md "Learning rates by what was loaded" has the validation comparison behind the default.
    lower_rate_for: str = "loaded"
    weight_decay: float = 1e-5
    foreground_ratio: float = 0.67
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    keep_fraction: float = 0.5
    # one of RELIABILITY. "rounds" keeps only what the adapted model still agrees with the round's starting
    # model on, which guards what the source model did well; docs/method.md "Gates that guard what the
    # source model did well" has the validation comparison behind the default.
    reliability: str = "rounds"
    # one of FALLBACKS: judges the pool when ``reliability`` keeps no volume, as "rounds" does where the
    # source model segments nothing (docs/method.md "When the source model cannot vouch")
    fallback: str = "flips"
    confidence: float = 0.9  # the voxel gate of "confidence"
    min_agreement: float = 0.5  # the volume floor of "flips" and "rounds"
    pseudo_weight: float = 1.0
    # one of STAGE2_LR; stage 1 always runs at a constant rate. docs/method.md "A stage 2 that settles".
    stage2_lr: str = "cosine"
    ramp_fraction: float = 0.3
    # one of AUGMENTS: how the pseudo-labelled patches are augmented: "weak", as the labelled ones; "strong",
    # more intensity change on top (adaptation/patches.strong_intensity); "remap", strong and then random
    # intensity curves that may swap tissues' brightness (patches.remap_intensity); "remap-if-fallback", the
    # curves only where the fallback judged: the source model could vouch for no volume, as across modalities,
    # where contrast is what changed, while within a modality they cost what the gate's labels teach.
    # docs/method.md "When the source model cannot vouch" and "Intensity curves where the source model cannot
    # vouch" have the validation comparisons behind the default.
    pseudo_augment: str = "remap-if-fallback"
    # who labels the pseudo-labelled patches: "fixed", the stage-1 model once, before stage 2 (the gate's
    # labels); "ema", an exponential moving average of the student's weights, online, on each patch (its
    # confident voxels, ``confidence``), so the labels improve as the student does (Mean Teacher);
    # "ema-if-fallback", the EMA teacher only where the fallback judged: there the source model could vouch
    # for no volume and the kept labels hold the stage-1 model's errors, while the asked gate's are labels the
    # source and adapted models agree on. docs/method.md "Who labels the pseudo-labelled patches".
    teacher: str = "ema-if-fallback"
    # one of MIXES: "copy-paste" mixes each pseudo-labelled patch with the batch's labelled one, a cuboid of two
    # thirds of each side pasted one way or the other, the labels following (bidirectional copy-paste, Bai et
    # al. 2023), so the pool's volumes are not learnt apart from the labelled ones: the labels' anatomy in the
    # pool's context and the pool's in the labels'. Only with the fixed teacher (the gate's labels, made before
    # stage 2): an EMA teacher labels each patch online as it is (stage2_mix resolves it to "none" there).
    # docs/method.md "Mixing pseudo-labelled patches with labelled ones" has the validation comparison.
    pseudo_mix: str = "copy-paste"
    ema_decay: float = 0.99
    # the loss weight of the patches an EMA teacher labels, in place of ``pseudo_weight``: its labels are a
    # consistency target that moves with the student, vouched for by no other model (docs/method.md "How
    # much the EMA teacher's labels weigh" has the validation comparison behind the default)
    ema_weight: float = 0.5
    max_pseudo_volumes: int = 20
    # the share of the round's starting weights in the model a round hands over (adaptation/blend.py), where
    # the starting model vouched for the pool: the "rounds" gate kept volumes it agrees on. Elsewhere (a
    # fallback judged, as across modalities, where the start segments nothing) the tuned weights go as they
    # are. 0 turns it off. docs/method.md "Handing over a blend with the start" has the validation comparison.
    blend_start: float = 0.2
    workers: int | None = None  # data-loader processes; None: none on the CPU, up to 4 beside a GPU

    def __post_init__(self) -> None:
        # a misspelt choice would otherwise run as the other one (the trainer tests == "strong", == "ema")
        choices = {
            "lower_rate_for": LOWER_RATE_FOR,
            "reliability": RELIABILITY,
            "fallback": FALLBACKS,
            "stage2_lr": STAGE2_LR,
            "pseudo_augment": AUGMENTS,
            "teacher": TEACHERS,
            "pseudo_mix": MIXES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueOutOfRange(f"FinetuneConfig.{name} {getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if not 0.0 <= self.blend_start < 1.0:  # 1 would hand over the start itself: nothing fine-tuned
            raise ValueOutOfRange(f"FinetuneConfig.blend_start {self.blend_start}: use a share in [0, 1)")
        # the command line's checks, so a script's wrong number fails here, not as a run recorded as done
        counts = ("iterations", "pseudo_iterations", "batch_size", "checkpoint_every", "seed", "max_pseudo_volumes")
        for name in counts:
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), numbers.Integral):
                raise ValueOutOfRange(f"FinetuneConfig.{name} {getattr(self, name)!r}: use a whole number")
        ranges = {
            "iterations": (self.iterations >= 0, "0 or more"),
            "pseudo_iterations": (self.pseudo_iterations >= 0, "0 or more (0 skips stage 2)"),
            "batch_size": (self.batch_size >= 1, "1 or more"),
            "lr": (self.lr > 0, "above 0"),
            "encoder_lr_scale": (self.encoder_lr_scale >= 0, "0 or more"),
            "weight_decay": (self.weight_decay >= 0, "0 or more"),
            "foreground_ratio": (0 <= self.foreground_ratio <= 1, "in [0, 1]"),
            "checkpoint_every": (self.checkpoint_every >= 1, "1 or more"),
            "keep_fraction": (0 < self.keep_fraction <= 1, "in (0, 1]"),
            "confidence": (0 <= self.confidence < 1, "in [0, 1)"),
            "min_agreement": (0 <= self.min_agreement <= 1, "in [0, 1]"),
            "pseudo_weight": (self.pseudo_weight >= 0, "0 or more"),
            "ramp_fraction": (0 <= self.ramp_fraction <= 1, "in [0, 1]"),
            "ema_decay": (0 <= self.ema_decay < 1, "in [0, 1)"),
            "ema_weight": (self.ema_weight >= 0, "0 or more"),
            "max_pseudo_volumes": (self.max_pseudo_volumes >= 0, "0 or more"),
            "workers": (self.workers is None or self.workers >= 0, "0 or more, or None"),
        }
        for name, (ok, allowed) in ranges.items():
            if not ok:
                raise ValueOutOfRange(f"FinetuneConfig.{name} {getattr(self, name)!r}: use a value {allowed}")


def stage2_teacher(teacher: str, fallback_judged: bool) -> str:
    """The teacher stage 2 trains with ("fixed" or "ema"), once the gate has judged: ``teacher`` itself,
    or for "ema-if-fallback" the EMA teacher where the fallback gate judged the pool."""
    if teacher == "ema-if-fallback":
        return "ema" if fallback_judged else "fixed"
    if teacher not in TEACHERS:
        raise ValueError(f"unknown teacher {teacher!r}; use one of {', '.join(TEACHERS)}")
    return teacher


def stage2_augment(augment: str, fallback_judged: bool) -> str:
    """How stage 2 augments the pseudo-labelled patches ("weak", "strong" or "remap"), once the gate has judged:
    ``augment`` itself, or for "remap-if-fallback" the intensity curves where the fallback gate judged the pool."""
    if augment == "remap-if-fallback":
        return "remap" if fallback_judged else "strong"
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; use one of {', '.join(AUGMENTS)}")
    return augment


def stage2_mix(mix: str, teacher: str) -> str:
    """What stage 2 mixes the pseudo-labelled patches with ("none" or "copy-paste"), once the teacher is resolved
    (:func:`stage2_teacher`): ``mix`` itself under the fixed teacher, whose labels are made before stage 2 and so
    can be cut and pasted with their patches; nothing under an EMA teacher, which labels each patch online."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; use one of {', '.join(MIXES)}")
    if teacher not in ("fixed", "ema"):
        raise ValueError(f"teacher {teacher!r}: resolve it with stage2_teacher first")
    return mix if teacher == "fixed" else "none"


def may_blend(share: float, reliability: str) -> bool:
    """Whether a recipe can hand over a blend at all: a share, and the ``rounds`` gate asked for (only it asks
    the round's starting model to vouch; :func:`handover_share` decides once it has judged)."""
    return share > 0 and reliability == "rounds"


def handover_share(share: float, gate: str, kept: int) -> float:
    """The starting weights' share of the model a round hands over, once its gate has judged: ``share`` where the
    ``rounds`` gate kept ``kept`` > 0 volumes (the round's starting model vouched for them), else 0."""
    return share if gate == "rounds" and kept > 0 else 0.0


def ramp(iteration: int, total: int, fraction: float) -> float:
    """Sigmoid ramp-up of the pseudo-label weight over the first ``fraction`` of stage 2."""
    length = max(1.0, total * fraction)
    t = min(1.0, iteration / length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def lr_factor(schedule: str, iteration: int, total: int) -> float:
    """The multiple of the base learning rate at step ``iteration`` (0-based) of a stage of ``total`` steps."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(iteration, total) / max(total, 1)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use one of {', '.join(STAGE2_LR)}")
