"""Handing over a round's weights blended with the weights it started from (weight-space ensembling).

Fine-tuning on a few volumes of some sites moves the model away from what it did well on the others. A model
whose weights lie between the fine-tuned and the starting ones keeps more of the start's behaviour at a small
cost where the labels are (WiSE-FT, Wortsman et al. 2022): ``(1 - share) * fine_tuned + share * start``.
Only tensors whose starting value is knowledge are blended: a head or decoder the checkpoint did not hold
starts from a random initialisation, and integer buffers (BatchNorm's step counter) are counts, not weights.
docs/method.md, "Handing over a blend with the start", has the validation comparison behind the share.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch


def blend_state(
    tuned: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], share: float, fresh: Collection[str] = ()
) -> dict[str, torch.Tensor]:
    """``tuned`` with ``share`` of ``start`` mixed into every floating-point tensor not in ``fresh`` (the tensors
    whose start was a new initialisation); the rest as tuned. ``share`` 0 returns the tuned tensors unchanged."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the start's share of the blend must lie in [0, 1], not {share}")
    if tuned.keys() != start.keys():
        raise ValueError(f"the two states hold different tensors: {sorted(set(tuned) ^ set(start))[:3]}")
    blended = {}
    for name, value in tuned.items():
        if share == 0.0 or name in fresh or not value.is_floating_point():
            blended[name] = value
            continue
        wide = torch.promote_types(value.dtype, torch.float32)  # float16 mixes in float32, float64 stays
        mixed = torch.lerp(value.to(wide), start[name].to(value.device, wide), share)  # value + share·(start − value)
        blended[name] = mixed.to(value.dtype)
    return blended
