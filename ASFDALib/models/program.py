"""``torch.export`` programs (``.pt2``): writing one from a network, and the module ASFDA runs one as.

TorchScript is deprecated (torch 2.13's ``torch.jit.load`` warns); ``torch.export`` is its successor.
A ``.pt2`` archive holds an ATen-operator graph (JSON, no Python source) and the weights.

Trust: loading one still needs ``--trust``. ``torch.export.load`` unpickles parts of the archive with
the full pickle machinery: the sample inputs fall back to ``torch.load(weights_only=False)`` when the
safe load fails, tensor-subclass weights and constants load with ``weights_only=False``, and opaque
constants with ``pickle.loads``. A crafted archive can therefore run code while it is being loaded,
and torch's own documentation says never to load one from an untrusted source (``Testing/Python/
test_export.py`` shows it with a crafted archive). So ``.pt2`` follows TorchScript's rule, not the
state dict's.

Running: the graph was traced in eval mode, so BatchNorm uses its running statistics whatever mode the
module is in later; ``ExportedNetwork`` makes ``train()``/``eval()`` harmless (the exported module
refuses them). Its layers are not modules that run (the graph is flat), so forward hooks never fire:
ASFDA treats a program like TorchScript (``LoadedModel.scripted``): no feature taps, and ranking
falls back to the free-energy source term.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ASFDALib.errors import ModelError

METADATA_ENTRY = "asfda/metadata.json"  # the provenance ASFDA writes into the archive's extra files
MAX_BATCH = 1024


class ExportedNetwork(torch.nn.Module):
    """An exported program's module, callable like the network it was exported from, and movable.

    Moving it to another device goes through torch's ``move_to_device_pass``: a graph can hold device
    literals from export time (SwinUNETR's attention masks are created on the export device), which a
    plain ``.to()`` leaves behind. The current (possibly fine-tuned) weights are kept across the move.
    """

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        self.program = program.module()
        self._exported = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedNetwork:
        # The exported module raises on train()/eval(); its mode was fixed when it was exported.
        self.training = mode
        return self

    def to(self, *args: Any, **kwargs: Any) -> ExportedNetwork:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self._move(torch.device(device))
        return super().to(*args, **kwargs)

    def cuda(self, device: int | torch.device | None = None) -> ExportedNetwork:
        return self.to(torch.device("cuda", device) if isinstance(device, int) else (device or "cuda"))

    def cpu(self) -> ExportedNetwork:
        return self.to("cpu")

    def _move(self, device: torch.device) -> None:
        from torch.export.passes import move_to_device_pass

        current = next(iter(self.program.state_dict().values()), None)
        if current is None or (
            current.device.type == device.type and device.index in (None, current.device.index or 0)
        ):
            return
        state = {k: v.detach() for k, v in self.program.state_dict().items()}
        moved = move_to_device_pass(self._exported, device)
        module = moved.module()
        module.load_state_dict(state)
        self.program, self._exported = module, moved


def io_shapes(program: torch.export.ExportedProgram) -> tuple[list[Any], list[Any]]:
    """The shapes of the program's one user input and first output (symbolic sizes as strings)."""
    inputs = [
        node.meta.get("val")
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs
    ]
    output = next(node for node in program.graph.nodes if node.op == "output").args[0]
    first = output[0] if isinstance(output, (list, tuple)) else output
    if len(inputs) != 1 or inputs[0] is None or not hasattr(first, "meta") or first.meta.get("val") is None:
        raise ModelError("the exported program must take one image tensor and return the class logits")

    def shape(value: Any) -> list[Any]:
        return [int(s) if isinstance(s, int) or str(s).isdigit() else str(s) for s in value.shape]

    return shape(inputs[0]), shape(first.meta["val"])


def check_program(program: torch.export.ExportedProgram, roi_size: tuple[int, ...], classes: int, path: Path) -> None:
    """The program's input and output against the card, read from the graph without running it."""
    try:
        inp, out = io_shapes(program)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if len(inp) != 5 or inp[1] != 1:
        raise ModelError(
            f"{path}: the program takes input {inp}; ASFDA feeds (batch, 1, X, Y, Z) windows of one image channel"
        )
    fixed = [s for s in inp[2:] if isinstance(s, int)]
    if len(fixed) == 3 and tuple(fixed) != tuple(roi_size):
        raise ModelError(
            f"{path}: the program was exported for {tuple(fixed)} windows but the card's roi_size is "
            f"{tuple(roi_size)}; set roi_size to {list(fixed)} in the card"
        )
    if len(out) < 2 or (isinstance(out[1], int) and out[1] != classes):
        raise ModelError(
            f"{path}: the program returns {out[1] if len(out) > 1 else out} channels but the card lists {classes} "
            "classes; fix class_names in the card"
        )


def export_program(
    network: torch.nn.Module, roi_size: tuple[int, int, int], path: Path, metadata: dict[str, Any] | None = None
) -> Path:
    """``torch.export`` the network in eval mode for (any batch, 1, *roi_size) windows and save it to ``path``.

    ``metadata`` travels inside the archive (``extra/asfda/metadata.json``).
    """
    from ASFDALib.atomic import atomic_write

    if isinstance(network, torch.jit.ScriptModule):
        raise ModelError(f"{path}: a TorchScript model cannot be re-exported as a torch.export program")
    network = network.cpu().eval()
    example = torch.zeros(2, 1, *roi_size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    try:
        program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - torch.export's many failure types; say which network and why
        raise ModelError(
            f"{path}: torch.export cannot trace this network ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "export it as a bundle or torchscript"
        ) from None
    extra = {METADATA_ENTRY: json.dumps(metadata, indent=2)} if metadata else None

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle, so the archive's inner folder is not the temporary name
            torch.export.save(program, handle, extra_files=extra)

    return atomic_write(Path(path), write)


def load_program(path: Path) -> torch.export.ExportedProgram:
    """``torch.export.load``; only after the caller has checked trust (it unpickles, see the module doc)."""
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign archive; one line naming the file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"{path}: not a torch.export program this torch ({torch.__version__}) can load "
            f"({type(exc).__name__}: {first}); re-export it with torch.export.save"
        ) from None
