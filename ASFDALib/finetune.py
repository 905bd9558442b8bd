"""Fine-tuning: foreground-oversampled patches, 3D augmentation, Dice + CE with an ignore index, AdamW
with a lower encoder learning rate, atomic checkpoints, exact resume, cancel and progress.

Batch i of a stage comes from its own NumPy generator seeded by (seed, rank, stage, i): any data-loader
worker process can make any batch, each rank of a DDP job draws its own patches, and a resumed run draws
exactly the batches an uninterrupted one would, so on the CPU it ends in the same state (torch's
generator is stored in every checkpoint too).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed
from .atomic import atomic_write
from .features import encoder_stages
from .memory import check_training_memory
from .modelcard import ModelCard
from .sweep import resolve_device

IGNORE_INDEX = 255


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


@dataclass
class Case:
    """One training volume at model spacing: image (1, X, Y, Z) float32, label (X, Y, Z) uint8."""

    name: str
    image: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        fg = np.flatnonzero((self.label > 0) & (self.label != IGNORE_INDEX))
        if fg.size > 20000:  # a sample of foreground positions is plenty to centre patches on
            fg = fg[np.linspace(0, fg.size - 1, 20000).astype(np.int64)]
        self.foreground = fg


def load_case(name: str, image_path: Path, label_path: Path, card: ModelCard) -> Case:
    """An image and its label file as a training/evaluation case at the model's spacing."""
    from .preprocess import preprocess, preprocess_label
    from .volume_io import read_volume

    image = preprocess(read_volume(image_path), card)
    label = read_volume(label_path, allow_constant=True)
    return Case(name, image.numpy(), preprocess_label(label.array, label.affine, card))


@dataclass
class Progress:
    stage: str
    iteration: int
    total: int
    loss: float
    eta_s: float
    val_dice: float | None = None


ProgressFn = Callable[[Progress], None]


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


def _crop(case: Case, roi: tuple[int, int, int], rng: np.random.Generator, foreground_ratio: float):
    """A patch centred on foreground with probability ``foreground_ratio``, else anywhere; padded as needed."""
    shape = np.array(case.label.shape)
    if case.foreground.size and rng.random() < foreground_ratio:
        centre = np.array(np.unravel_index(case.foreground[rng.integers(case.foreground.size)], shape))
    else:
        centre = np.array([rng.integers(0, s) for s in shape])
    roi_arr = np.array(roi)
    start = np.clip(centre - roi_arr // 2, 0, np.maximum(shape - roi_arr, 0))
    window = tuple(slice(s, s + r) for s, r in zip(start, roi_arr))
    image = case.image[(slice(None), *window)]
    label = case.label[window]
    pad = [(0, max(0, r - s)) for r, s in zip(roi_arr, label.shape)]
    if any(p[1] for p in pad):
        image = np.pad(image, [(0, 0), *pad], constant_values=float(case.image.min()))
        label = np.pad(label, pad, constant_values=IGNORE_INDEX)
    return image, label


def _augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Random flips, intensity scale/shift, gamma and noise (numpy, from the run's one generator)."""
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis + 1)
            label = np.flip(label, axis)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    if rng.random() < 0.3:
        low, high = float(image.min()), float(image.max())
        span = max(high - low, 1e-6)
        image = ((image - low) / span) ** rng.uniform(0.7, 1.5) * span + low
    if rng.random() < 0.2:
        image = image + rng.normal(0.0, 0.03, image.shape)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(label)


def sample_batch(cases: list[Case], roi, batch_size: int, rng: np.random.Generator, foreground_ratio: float):
    images, labels = [], []
    for _ in range(batch_size):
        image, label = _crop(cases[rng.integers(len(cases))], roi, rng, foreground_ratio)
        image, label = _augment(image, label, rng)
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels).astype(np.int64))


class PatchStream(torch.utils.data.Dataset):
    """Item i is batch i of a stage (labelled, and pseudo-labelled when given), from its own generator."""

    def __init__(self, labelled: list[Case], pseudo: list[Case] | None, roi, config: FinetuneConfig, stage: str):
        self.labelled, self.pseudo, self.roi, self.config = labelled, pseudo, tuple(roi), config
        self.key = [config.seed, distributed.rank(), zlib.crc32(stage.encode())]

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, i: int):
        rng = np.random.default_rng([*self.key, int(i)])
        batch = sample_batch(self.labelled, self.roi, self.config.batch_size, rng, self.config.foreground_ratio)
        if self.pseudo:
            batch += sample_batch(self.pseudo, self.roi, self.config.batch_size, rng, self.config.foreground_ratio)
        return batch


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


def dice_per_class(pred: np.ndarray, label: np.ndarray, num_classes: int) -> list[float]:
    """Dice of every foreground class (NaN where the class is absent from both)."""
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        total = p.sum() + g.sum()
        out.append(float(2 * np.logical_and(p, g).sum() / total) if total else float("nan"))
    return out


def predict_array(
    network: torch.nn.Module,
    image: np.ndarray | torch.Tensor,
    card: ModelCard,
    device: str = "auto",
    flip: bool = False,
) -> torch.Tensor:
    """Softmax probabilities (C, X, Y, Z) at model spacing by MONAI sliding-window inference."""
    from monai.inferers import sliding_window_inference

    dev = resolve_device(device)
    x = torch.as_tensor(image).as_subclass(torch.Tensor).float()[None].to(dev)
    network = network.to(dev).eval()
    with torch.inference_mode(), torch.autocast(dev.type, enabled=dev.type == "cuda"):

        def run(inp):
            return torch.softmax(
                sliding_window_inference(inp, card.roi_size, card.sw_batch_size, network, card.overlap).float(), 1
            )

        probs = run(x)
        if flip:
            for axis in (2, 3, 4):
                probs = probs + run(x.flip(axis)).flip(axis)
            probs = probs / 4
    return probs[0].cpu()


class Trainer:
    """Runs one stage of fine-tuning with checkpoints; ``state`` survives a kill through ``last.pt``."""

    def __init__(self, network: torch.nn.Module, card: ModelCard, config: FinetuneConfig, checkpoint_dir: Path):
        self.network = network
        self.card = card
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = resolve_device(distributed.device_for_rank(config.device))
        check_training_memory(config.batch_size, card.roi_size, str(self.device))
        self.network.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
            self.network.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.AdamW(param_groups(network, config), weight_decay=config.weight_decay)
        torch.manual_seed(config.seed)
        self.model = network
        if distributed.world() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(network, device_ids=ids)
        self.stage = "stage1"
        self.iteration = 0
        self.amp_dtype = None
        if config.amp and self.device.type == "cuda":
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    @property
    def workers(self) -> int:
        if self.config.workers is not None:
            return self.config.workers
        # On the CPU the cores are busy with the network; beside a GPU, workers hide the sampling.
        return min(4, (os.cpu_count() or 2) // 2) if self.device.type == "cuda" else 0

    @property
    def last_path(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    def save(self, path: Path | None = None) -> Path:
        """Checkpoint atomically (rank 0 writes). Batches are seeded by iteration, so no data state is needed."""
        target = path or self.last_path
        if distributed.is_main():
            state = {
                "stage": self.stage,
                "iteration": self.iteration,
                "network": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "config": json.dumps(asdict(self.config)),
            }
            atomic_write(target, lambda tmp: torch.save(state, tmp))
        distributed.barrier()
        return target

    def load(self, path: Path | None = None) -> bool:
        """Restore the newest checkpoint; False when there is none."""
        path = path or self.last_path
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.network.load_state_dict(state["network"])
        self.network.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.stage, self.iteration = state["stage"], int(state["iteration"])
        torch.set_rng_state(state["torch_rng"])
        return True

    def begin_stage(self, stage: str) -> None:
        if self.stage != stage:
            self.stage, self.iteration = stage, 0

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned host memory (the loader's), asynchronous copies, channels-last
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = x.to(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        return dice_ce_loss(logits.float(), y)

    def batches(self, labelled: list[Case], pseudo: list[Case] | None, iterations: int):
        """Batches ``self.iteration`` .. ``iterations - 1`` of this stage, made by worker processes if any."""
        stream = PatchStream(labelled, pseudo, self.card.roi_size, self.config, self.stage)
        workers = self.workers
        return torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            sampler=range(self.iteration, iterations),
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2 if workers else None,
        )

    def run(
        self,
        labelled: list[Case],
        iterations: int,
        pseudo: list[Case] | None = None,
        cancel: threading.Event | None = None,
        progress: ProgressFn | None = None,
        validation: list[Case] | None = None,
    ) -> str:
        """Train the current stage up to ``iterations``; returns "done" or "cancelled" (checkpoint saved)."""
        self.network.train()
        start, first = time.perf_counter(), self.iteration
        val_dice = None
        for batch in self.batches(labelled, pseudo, iterations):
            if cancel is not None and cancel.is_set():
                self.save()
                return "cancelled"
            loss = self._loss(*batch[:2])
            if pseudo:
                loss = loss + self.config.pseudo_weight * ramp(
                    self.iteration, iterations, self.config.ramp_fraction
                ) * self._loss(*batch[2:])
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.iteration += 1
            at_checkpoint = self.iteration % self.config.checkpoint_every == 0 or self.iteration == iterations
            if at_checkpoint:
                self.save()
                if validation and distributed.is_main():
                    val_dice = self.validate(validation)
                    self.network.train()
            if progress and distributed.is_main():
                done = self.iteration - first
                rate = (time.perf_counter() - start) / max(done, 1)
                progress(
                    Progress(
                        self.stage,
                        self.iteration,
                        iterations,
                        float(loss.detach()),
                        rate * (iterations - self.iteration),
                        val_dice,
                    )
                )
        self.network.eval()
        return "done"

    def validate(self, cases: list[Case]) -> float:
        scores = []
        for case in cases:
            pred = predict_array(self.network, case.image, self.card, str(self.device)).argmax(0).numpy()
            scores += [d for d in dice_per_class(pred, case.label, self.card.num_classes) if not math.isnan(d)]
        return float(np.mean(scores)) if scores else float("nan")
