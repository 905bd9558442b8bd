"""The training loss: soft Dice + cross-entropy, with an ignore index for voxels that teach nothing
(padding, and pseudo-label voxels below the confidence gate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # a label value no class uses: padding and unconfident pseudo-label voxels


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Soft Dice (per class over the batch) + cross-entropy; voxels equal to ``ignore_index`` count in neither."""
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    num_classes = logits.shape[1]
    ce = F.cross_entropy(logits, target.long(), ignore_index=ignore_index)
    probs = torch.softmax(logits.float(), dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(torch.where(valid, target, 0).long(), num_classes).movedim(-1, 1).float()
    onehot = onehot * valid.unsqueeze(1)
    dims = [0, *range(2, logits.ndim)]
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    dice = 1.0 - (2.0 * intersection + 1e-5) / (denominator + 1e-5)
    return ce + dice.mean()
