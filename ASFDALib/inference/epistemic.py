"""The MC-dropout "epistemic" baseline as MONAI Label scores it: several full sliding-window passes (the
engine prediction uses) with dropout active, then the whole-volume mean entropy of the averaged prediction.

Networks without dropout layers get dropout on their encoder-stage outputs through forward hooks, so
the baseline works on every network rather than only on those built with a dropout argument.
"""

from __future__ import annotations

import math

import torch

from ASFDALib.inference.device import resolve_device
from ASFDALib.inference.predict import predict_probabilities
from ASFDALib.models.card import ModelCard
from ASFDALib.query.features import encoder_stages


def _enable_dropout(network: torch.nn.Module, p: float) -> list:
    dropouts = [m for m in network.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0]
    for module in dropouts:
        module.train()
    if dropouts:
        return []
    modules = dict(network.named_modules())
    return [
        modules[name].register_forward_hook(lambda _m, _a, out: torch.nn.functional.dropout(out, p, training=True))
        for name in encoder_stages(network)
    ]


def epistemic_score(
    network: torch.nn.Module,
    image: torch.Tensor,
    card: ModelCard,
    passes: int = 5,
    p: float = 0.2,
    device: str = "auto",
    seed: int = 0,
) -> float:
    """Mean normalised entropy of the MC-dropout mean prediction over the whole volume."""
    network = network.to(resolve_device(device)).eval()
    handles = _enable_dropout(network, p)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        mean_prob = None
        for _ in range(passes):
            prob = predict_probabilities(network, image, card, device, keep_mode=True)
            mean_prob = prob if mean_prob is None else mean_prob + prob
        mean_prob = (mean_prob / passes).clamp_min(1e-12)
        entropy = -(mean_prob * mean_prob.log()).sum(dim=0) / math.log(card.num_classes)
        return float(entropy.mean())
    finally:
        for handle in handles:
            handle.remove()
        network.eval()
        torch.random.set_rng_state(generator_state)
