"""Prediction: softmax probabilities and label maps from the same windows and logits the scoring sweep uses."""

from __future__ import annotations

import numpy as np
import torch

from ASFDALib.errors import ModelError, ValueOutOfRange, brief
from ASFDALib.inference.device import resolve_device
from ASFDALib.inference.windows import run_windows
from ASFDALib.models.card import ModelCard


def predict_probabilities(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    card: ModelCard,
    device: str = "auto",
    keep_mode: bool = False,
) -> torch.Tensor:
    """Softmax probabilities (C, X, Y, Z) at model spacing, float32 on the CPU, with gradients off.

    ``image``: (1, X, Y, Z), at the model's spacing and intensity scale, as
    ``data.preprocess.preprocess(volume, card)`` returns it (raw intensities give another, wrong, segmentation;
    ``adaptation.pipeline.predict_folder`` does it all, file to file). The network runs in eval mode, unless
    ``keep_mode`` leaves the caller's (MC dropout turns dropout on).
    """
    if tuple(image.shape[:1]) != (1,) or len(image.shape) != 4:
        raise ValueOutOfRange(
            f"an image of shape {tuple(image.shape)}: give (1, X, Y, Z), as data.preprocess.preprocess(volume, card) "
            "returns it (one channel, at the model's spacing and intensity scale)"
        )
    dev = resolve_device(device)
    network = network.to(dev)
    if not keep_mode:
        network.eval()
    plan, batches = run_windows(
        network, torch.as_tensor(image), card.roi_size, card.overlap, card.sw_batch_size, dev, card.num_classes
    )
    probs = torch.empty((card.num_classes, *plan.padded), dtype=torch.float32)
    with torch.inference_mode():
        for window_batch in batches:
            for i in range(len(window_batch.windows)):
                owned, core = window_batch.owned(i)
                probs[(slice(None), *core)] = torch.softmax(owned, dim=0).cpu()
    return probs[(slice(None), *plan.valid)]


def predict_label(
    network: torch.nn.Module, image: np.ndarray | torch.Tensor, card: ModelCard, device: str = "auto"
) -> np.ndarray:
    """The label map (X, Y, Z) at model spacing: the argmax of :func:`predict_probabilities` (``image``: (1, X, Y,
    Z), preprocessed as it says)."""
    label = predict_probabilities(network, image, card, device).argmax(0).numpy()
    return label.astype(np.uint8)  # the card allows at most 256 classes


def check_outputs(network: torch.nn.Module, card: ModelCard, model_path: str, device: str = "auto") -> None:
    """One window of zeros through the network: its output channels must be the card's classes.

    Costs one forward pass, so a card that does not belong to the model is refused before any volume is
    scored, not after the first one (minutes on a large volume).
    """
    dev = resolve_device(device)
    network = network.to(dev).eval()
    try:
        with torch.inference_mode():
            out = network(torch.zeros((1, 1, *card.roi_size), device=dev))
    except torch.cuda.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as exc:  # a window the network's layers cannot take
        if "memory" in str(exc).lower() or "cuda" in str(exc).lower():
            raise  # out of memory or a device fault: not the window's shape
        reason = brief(exc)
        raise ModelError(
            f"{model_path}: a window of the card's roi_size {list(card.roi_size)} does not run through the network "
            f"({reason}); give a roi_size the network takes (SwinUNETR: a multiple of 32 and at least 64 per axis; "
            "a U-Net: divisible by the product of its strides)"
        ) from None
    if isinstance(out, (list, tuple)):
        out = out[0]
    channels = int(out.shape[1])
    if channels != card.num_classes:
        raise ModelError(
            f"{model_path}: the network outputs {channels} channels but its card lists {card.num_classes} classes "
            f"({', '.join(card.class_names)}); give the card that belongs to this model, with {channels} class names"
        )
