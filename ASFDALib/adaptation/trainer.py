"""The trainer: runs one stage of fine-tuning with AdamW, atomic checkpoints, exact resume, cancel and
progress, alone or under torchrun (DDP).

Batches are seeded by iteration (:mod:`ASFDALib.adaptation.patches`), so a resumed run on the CPU ends in the
same state as an uninterrupted one (torch's generator is stored in every checkpoint too).
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ASFDALib import distributed
from ASFDALib.adaptation.loss import IGNORE_INDEX, dice_ce_loss
from ASFDALib.adaptation.patches import Case, PatchStream
from ASFDALib.adaptation.recipe import FinetuneConfig, lr_factor, ramp, stage2_mix
from ASFDALib.adaptation.runs import SAVED_FILE
from ASFDALib.atomic import atomic_write, atomic_write_json
from ASFDALib.checkpoints import LoadReport, param_groups_from_report
from ASFDALib.evaluation.metrics import dice_per_class
from ASFDALib.inference.device import resolve_device
from ASFDALib.inference.memory import check_training_memory
from ASFDALib.inference.predict import predict_label
from ASFDALib.models.card import ModelCard
from ASFDALib.query.features import encoder_stages


@dataclass
class Progress:
    stage: str
    iteration: int
    total: int
    loss: float
    eta_s: float
    val_dice: float | None = None
    pseudo: bool = False  # whether this stage trains on pseudo-labels too

    @property
    def label(self) -> str:
        """What the stage trains on, for a progress line."""
        if self.stage == "stage1":
            return "stage 1 (labels)"
        return "stage 2 (+ pseudo-labels)" if self.pseudo else "stage 2 (labels alone)"


ProgressFn = Callable[[Progress], None]


def param_groups(network: torch.nn.Module, config: FinetuneConfig, report: LoadReport | None = None) -> list[dict]:
    """Pre-trained parameters at ``lr * encoder_lr_scale``, new ones at ``lr``.

    With a load report, "pre-trained" is what came from the checkpoint: every loaded tensor (the default,
    ``lower_rate_for="loaded"``), or with ``"encoder"`` only those inside the encoder (all of an encoder-only
    checkpoint; the encoder stages, and SwinUNETR's ``swinViT``, of a full one), so a loaded decoder adapts
    at the full rate; a re-initialised head or decoder always trains at the full rate. Without one
    (TorchScript, a network built elsewhere) every parameter counts as loaded, and ``"encoder"`` gives the
    encoder stages found in the network the lower rate.
    """
    every = config.lower_rate_for == "loaded"
    if report is not None:
        names = dict(network.named_modules())
        encoder = None if every else [*encoder_stages(network), *(n for n in ("swinViT",) if n in names)]
        return param_groups_from_report(network, report, config.lr, config.encoder_lr_scale, encoder)
    modules = dict(network.named_modules())
    stages = [""] if every else encoder_stages(network)
    encoder_ids = {id(p) for name in stages for p in modules[name].parameters()}
    encoder = [p for p in network.parameters() if id(p) in encoder_ids]
    rest = [p for p in network.parameters() if id(p) not in encoder_ids]
    groups = [{"params": rest, "lr": config.lr, "name": "full"}] if rest else []
    if encoder:
        groups.append({"params": encoder, "lr": config.lr * config.encoder_lr_scale, "name": "pretrained"})
    return groups


def supervised_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dice + CE of the network's output; with deep supervision (DynUNet in training stacks its full-size
    output and upsampled lower-level outputs on dim 1, full size first) a weighted sum, halving per level as
    nnU-Net does, normalised to sum to one."""
    if logits.dim() == y.dim() + 2:
        weights = [0.5**i for i in range(logits.shape[1])]
        total = sum(weights)
        return sum(w / total * dice_ce_loss(logits[:, i].float(), y) for i, w in enumerate(weights))
    return dice_ce_loss(logits.float(), y)


class Trainer:
    """Runs one stage of fine-tuning with checkpoints; ``state`` survives a kill through ``last.pt``."""

    def __init__(
        self,
        network: torch.nn.Module,
        card: ModelCard,
        config: FinetuneConfig,
        checkpoint_dir: Path,
        load_report: LoadReport | None = None,
    ):
        self.network = network
        self.card = card
        # the mix follows the teacher: an EMA teacher labels each patch online as it is drawn, so it is not mixed
        if (
            config.teacher in ("fixed", "ema")
            and (mix := stage2_mix(config.pseudo_mix, config.teacher)) != config.pseudo_mix
        ):
            config = replace(config, pseudo_mix=mix)
        self.config = config
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = resolve_device(distributed.device_for_rank(config.device))
        check_training_memory(network, config.batch_size, card.roi_size, str(self.device))
        self.network.to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels
            self.network.to(memory_format=torch.channels_last_3d)
        groups = param_groups(network, config, load_report)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        # the rates each step scales (a loaded optimizer state holds the last step's, not these)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        torch.manual_seed(config.seed)
        self.model = network
        if distributed.world() > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(network, device_ids=ids)
        self.stage = "stage1"
        self.iteration = 0
        self.teacher: torch.nn.Module | None = None  # stage 2's EMA teacher (config.teacher == "ema")
        self.saved: tuple[str, int] | None = None  # (stage, iteration) of the newest checkpoint on disk
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
            if self.teacher is not None:
                state["teacher"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
            atomic_write(target, lambda tmp: torch.save(state, tmp))
            if target == self.last_path:
                # what last.pt holds, readable without opening it (the panel polls it; Windows cannot replace
                # a file another reader holds open); written after the checkpoint, so it never says more
                atomic_write_json(self.checkpoint_dir / SAVED_FILE, {"stage": self.stage, "iteration": self.iteration})
        if target == self.last_path:
            self.saved = (self.stage, self.iteration)
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
        self.teacher = None
        if "teacher" in state:
            self._make_teacher().load_state_dict(state["teacher"])
        return True

    def begin_stage(self, stage: str) -> None:
        if self.stage != stage:
            self.stage, self.iteration, self.teacher = stage, 0, None

    def _make_teacher(self) -> torch.nn.Module:
        """The EMA teacher, starting from the student's weights (at stage 2's start: the stage-1 model)."""
        with torch.no_grad():  # a TorchScript module's copy clones its tensors: outside autograd, they are leaves
            self.teacher = copy.deepcopy(self.network).eval()
        for parameter in self.teacher.parameters():  # one by one: a TorchScript module has no requires_grad_()
            parameter.requires_grad_(False)
        return self.teacher

    @torch.no_grad()
    def _teacher_label(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's label of a batch of patches: its confident voxels, IGNORE_INDEX elsewhere."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.teacher(x.to(self.device))
        if logits.dim() == x.dim() + 1:  # deep supervision in eval mode: the full-size output
            logits = logits[:, 0]
        best, label = torch.softmax(logits.float(), dim=1).max(dim=1)
        label[best < self.config.confidence] = IGNORE_INDEX
        return label.cpu()

    @torch.no_grad()
    def _update_teacher(self) -> None:
        decay = self.config.ema_decay
        for t, s in zip(self.teacher.parameters(), self.network.parameters()):
            t.lerp_(s.detach(), 1.0 - decay)
        for t, s in zip(self.teacher.buffers(), self.network.buffers()):
            t.copy_(s)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned host memory (the loader's), asynchronous copies, channels-last
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            x = x.to(memory_format=torch.channels_last_3d)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        return supervised_loss(logits, y)

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
        if pseudo and self.config.teacher not in ("fixed", "ema"):  # a bug, not a user's error
            raise ValueError(f"teacher {self.config.teacher!r}: resolve it with recipe.stage2_teacher first")
        if pseudo and self.config.pseudo_augment not in ("weak", "strong", "remap"):
            raise ValueError(
                f"pseudo_augment {self.config.pseudo_augment!r}: resolve it with recipe.stage2_augment first"
            )
        self.network.train()
        if pseudo and self.config.teacher == "ema" and self.teacher is None:
            self._make_teacher()
        elif self.config.teacher != "ema":  # a loaded checkpoint's teacher, where the run goes on with fixed labels
            self.teacher = None
        start, first = time.perf_counter(), self.iteration
        val_dice = None
        for batch in self.batches(labelled, pseudo, iterations):
            if cancel is not None and cancel.is_set():
                self.save()
                return "cancelled"
            schedule = self.config.stage2_lr if self.stage == "stage2" else "constant"
            factor = lr_factor(schedule, self.iteration, iterations)
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base * factor
            loss = self._loss(*batch[:2])
            if pseudo:
                x, y = batch[2], batch[3]
                weight = self.config.pseudo_weight
                if self.config.teacher == "ema":
                    y, weight = self._teacher_label(batch[4]), self.config.ema_weight
                loss = loss + weight * ramp(self.iteration, iterations, self.config.ramp_fraction) * self._loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.teacher is not None:
                self._update_teacher()
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
                        bool(pseudo),
                    )
                )
        self.network.eval()
        return "done"

    def validate(self, cases: list[Case]) -> float:
        scores = []
        for case in cases:
            pred = predict_label(self.network, case.image, self.card, str(self.device))
            scores += [d for d in dice_per_class(pred, case.label, self.card.num_classes) if not math.isnan(d)]
        return float(np.mean(scores)) if scores else float("nan")
