"""The fine-tuning recipe, defined once: the defaults every caller (CLI, panel, demo, benchmark) starts from,
the learning rates of pre-trained and new parameters, and the pseudo-label weight's ramp.

The defaults were chosen on a validation set (docs/method.md, "Fine-tuning recipe").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ASFDALib.query.features import encoder_stages


@dataclass
class FinetuneConfig:
    """The fine-tuning recipe; the defaults suit a few labelled volumes on a CPU."""

    iterations: int = 200
    pseudo_iterations: int = 200
    batch_size: int = 2
    lr: float = 3e-3
    encoder_lr_scale: float = 0.3
    weight_decay: float = 1e-5
    foreground_ratio: float = 0.67
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    keep_fraction: float = 0.5
    confidence: float = 0.9
    pseudo_weight: float = 1.0
    ramp_fraction: float = 0.3
    max_pseudo_volumes: int = 20
    workers: int | None = None  # data-loader processes; None: none on the CPU, up to 4 beside a GPU


def param_groups(network: torch.nn.Module, config: FinetuneConfig) -> list[dict]:
    """Pre-trained encoder at ``lr * encoder_lr_scale``, everything else (decoder, head) at ``lr``."""
    modules = dict(network.named_modules())
    encoder_ids = {id(p) for name in encoder_stages(network) for p in modules[name].parameters()}
    encoder = [p for p in network.parameters() if id(p) in encoder_ids]
    rest = [p for p in network.parameters() if id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": config.lr}]
    if encoder:
        groups.append({"params": encoder, "lr": config.lr * config.encoder_lr_scale})
    return groups


def ramp(iteration: int, total: int, fraction: float) -> float:
    """Sigmoid ramp-up of the pseudo-label weight over the first ``fraction`` of stage 2."""
    length = max(1.0, total * fraction)
    t = min(1.0, iteration / length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))
