"""Reading published foundation-model checkpoints into a MONAI network: one reader for every layout.

Its one job: turn whatever a researcher downloaded (a pre-trained SwinUNETR, UNet, SegResNet or nnU-Net-like
network, often with another label set, sometimes an encoder alone) into the target network's weights, with a
report of what was loaded, what was newly initialised and what was ignored, and an error that names every
tensor that silently would not load. Pure torch; no Slicer, no file access (callers ``torch.load`` the file
with ``weights_only=True`` and pass the object in).

Layouts this reader understands were checked against the public loaders that write or read them:

- SuPreM / AbdomenAtlas (github.com/MrGiovanni/SuPreM): ``torch.load(pretrain)['net']``; keys are
  ``module.backbone.<network key>`` (DDP around ``Universal_model``, whose ``backbone`` is the SwinUNETR/UNet),
  plus the pre-training head ``module.precls_conv.*``, ``module.GAP.*``, ``module.controller.*`` and
  ``module.organ_embedding.*`` (supervised_pretraining/backbone/Universal_model.py;
  target_applications/totalsegmentator/train.py strips ``module.backbone.`` and drops the output layer).
  The UNet there uses ``ContBatchNorm3d``, a ``_BatchNorm`` whose forward passes ``training=True`` always
  (backbone/unet.py), so running statistics exist but are never used: see :func:`normalisation_info`.
- MONAI self-supervised Swin encoder (github.com/Project-MONAI/research-contributions SwinUNETR/Pretrain):
  ``SSLHead`` saves ``{"state_dict": {"module.swin_vit.<SwinTransformer key>", "module.rotation_head.*",
  "module.contrastive_head.*", "module.conv.*"}}``; the fine-tuning scripts replace ``module.`` and
  ``swin_vit`` -> ``swinViT`` and load with ``strict=False``. The released ``model_swinvit.pt`` read by
  MONAI's ``SwinUNETR.load_from`` has keys ``module.patch_embed.*`` / ``module.layersN.0.blocks.i.*`` (no
  ``swin_vit``) and the older MLP names ``mlp.fc1``/``mlp.fc2`` that ``load_from`` copies into
  ``mlp.linear1``/``mlp.linear2`` (monai/networks/nets/swin_unetr.py).
- nnU-Net v2 / STU-Net / TotalSegmentator (nnunetv2 ``nnUNetTrainer.save_checkpoint``):
  ``{"network_weights": mod.state_dict(), "optimizer_state": ..., "init_args": ...}`` with ``mod`` taken from
  ``network.module`` (DDP) and ``._orig_mod`` (torch.compile); ``load_checkpoint`` drops ``module.``.
- PyTorch Lightning (``CheckpointConnector.dump_checkpoint``): ``{"state_dict": lightning_module.state_dict(),
  "epoch": ..., "loops": ...}``; keys carry the attribute the LightningModule stores the network under (often
  ``model.``), next to other sub-modules' tensors (losses, metrics) that are ignored.
- torch.compile: ``_orig_mod.`` in front of every key; DeepSpeed: ``{"module": state_dict}``.

How a checkpoint maps onto the network is decided from the tensors, not from per-architecture name lists:
shared wrapper prefixes are stripped, then one re-prefixing (``<checkpoint component>.`` -> ``<network
top-level module>.``, e.g. ``swin_vit.`` -> ``swinViT.``, ``backbone.`` -> ``""``) is chosen when it matches
more network tensors than the keys as they are. The output head is the last layer whose output channel count
is the number of classes, plus the layers just before it whose outputs are also class-sized.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ASFDALib.errors import ModelError

#: Keys under which checkpoints nest the state dict, in the order they are tried.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "network_weights", "net", "model", "module")
#: Prefixes that wrappers (DDP/DataParallel, a training wrapper, Lightning, torch.compile) put before every key.
WRAPPER_PREFIXES = ("module.", "backbone.", "model.", "_orig_mod.")
#: Renames of older MONAI key names, as ``SwinUNETR.load_from`` applies them (``mlp.fc1`` -> ``mlp.linear1``).
LEGACY_RENAMES = ((".mlp.fc1.", ".mlp.linear1."), (".mlp.fc2.", ".mlp.linear2."))
_SHOW = 5  # tensor names listed in an error before "... and N more"


# --- unwrapping ------------------------------------------------------------------------------------------


_PLAIN = (int, float, str, bool, type(None))  # what a state dict may carry beside its tensors (a "version": 1)


def _is_tensor_mapping(obj: Any) -> bool:
    """Tensors by name, plain values aside: Lightning and others keep a version number among them."""
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        return False
    return all(isinstance(v, (torch.Tensor, *_PLAIN)) for v in obj.values())


def state_dict_from(
    obj: Any, network: torch.nn.Module | None = None, source: str = "this checkpoint"
) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint, with wrapper prefixes shared by all keys removed.

    Unwraps nested containers (``net``, ``state_dict``, ``model``, ``network_weights``, ``model_state_dict``,
    ``module``; an ``nn.Module`` gives its ``state_dict()``), then strips ``module.``, ``backbone.``, ``model.``
    and ``_orig_mod.`` as long as every key starts with the same one (so ``module.backbone.`` goes too). With
    ``network``, a shared prefix that is part of the network's own names (MONAI UNet's ``model.``) is kept.
    Raises :class:`ModelError` naming the top-level keys when no tensor mapping is found.
    """
    node, path = obj, []
    for _ in range(8):  # a bound: checkpoints nest two or three levels at most
        if isinstance(node, torch.nn.Module):
            node = node.state_dict()
        if _is_tensor_mapping(node):
            break
        if not isinstance(node, Mapping):
            node = None
            break
        key = next((k for k in CONTAINER_KEYS if isinstance(node.get(k), (Mapping, torch.nn.Module))), None)
        if key is None:
            node = None
            break
        path.append(key)
        node = node[key]
    if not _is_tensor_mapping(node):
        top = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        inside = f" under {'/'.join(path)}" if path else ""
        raise ModelError(
            f"{source}: no state dict (a mapping of names to tensors) found{inside}; top-level keys: {top}"
        )
    state = {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}
    own = set(network.state_dict()) if network is not None else None
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None or any(k == prefix for k in state):
            return state
        stripped = {k[len(prefix) :]: v for k, v in state.items()}
        if own is not None and len(own.intersection(state)) > len(own.intersection(stripped)):
            return state
        state = stripped


# --- the output head -------------------------------------------------------------------------------------


def _out_count(module: torch.nn.Module) -> int | None:
    """Channels a layer produces; None for layers whose parameters do not depend on it (a shared PReLU)."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, torch.nn.modules.batchnorm._NormBase):  # BatchNorm and InstanceNorm
        return module.num_features
    if isinstance(module, torch.nn.GroupNorm):
        return module.num_channels
    if isinstance(module, torch.nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, torch.nn.PReLU):
        return None if module.num_parameters == 1 else module.num_parameters
    return -1  # unknown layer with tensors: ends the head


def _leaves_with_tensors(network: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [
        (name, module)
        for name, module in network.named_modules()
        if next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    ]


def output_head(network: torch.nn.Module, num_classes: int) -> list[str]:
    """Module names of the output head, last first.

    The final layer is the last registered layer whose output channel count is ``num_classes``; the head also
    takes the layers registered just before it whose outputs are class-sized too (MONAI UNet's top up-sampling
    block with residual units, DynUNet's output block before its deep-supervision heads). Channel-agnostic
    layers (a single-parameter PReLU) are passed over; any other layer ends the head.
    """
    leaves = _leaves_with_tensors(network)
    index = next((i for i in range(len(leaves) - 1, -1, -1) if _out_count(leaves[i][1]) == num_classes), None)
    if index is None:
        raise ModelError(
            f"{type(network).__name__} has no layer with {num_classes} output channels; build the network with "
            "out_channels equal to the number of classes in the card"
        )
    head = [leaves[index][0]]
    for name, module in reversed(leaves[:index]):
        count = _out_count(module)
        if count is None:
            continue
        if count != num_classes:
            break
        head.append(name)
    return head


# --- the report ------------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did; names are the network's state-dict names unless stated otherwise.

    ``loaded``: tensors copied bitwise from the checkpoint. ``new``: tensors that kept the network's own
    initialisation (a re-initialised head, the decoder of an encoder-only checkpoint, absent
    ``num_batches_tracked`` counters); a head tensor with copied class rows is listed here too, as it is
    partly new. ``ignored``: checkpoint tensors that went nowhere: the pre-trained head of another class count
    (named as the network tensor it maps to, e.g. ``out.conv.conv.weight``) or a pre-training head that has no
    counterpart (named as in the checkpoint after unwrapping: SuPreM's ``controller.weight``, the SSL
    ``rotation_head.weight``).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    head_reinitialised: bool = False
    mapped_classes: dict[int, int] = field(default_factory=dict)
    encoder_only: bool = False
    encoder: str | None = None
    key_mapping: str = ""
    source_classes: int | None = None
    num_classes: int = 0
    # class names of the target task and of the checkpoint's head, when the card gives them (for the summary)
    class_names: list[str] = field(default_factory=list)
    source_class_names: list[str] = field(default_factory=list)
    # distinct tensors loaded and new: a network that registers a module twice (DynUNet's skip_layers) lists a
    # shared tensor under each of its names in ``loaded`` and ``new``
    loaded_distinct: int = 0
    new_distinct: int = 0
    hint: str = ""  # what would keep more of the pre-trained head (models.loading fills it where it can tell)
    # ignored tensors that land in the network's own blocks where it has none (_stray_tensors)
    stray: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """One line for logs, the ranking output and the panel."""
        shared = len(self.loaded) != self.loaded_distinct or len(self.new) != self.new_distinct
        names = f" (under {len(self.loaded)} names: the network shares tensors)" if shared else ""
        parts = [f"{self.source}: loaded {self.loaded_distinct} tensors{names}"]
        if self.encoder_only:
            parts.append(f"encoder-only checkpoint into {self.encoder!r}; decoder and head newly initialised")
        elif self.head_reinitialised:
            was = f"{self.source_classes}" if self.source_classes is not None else "no"
            parts.append(f"output head re-initialised for {self.num_classes} classes (checkpoint has {was})")
        else:
            parts.append(f"output head kept ({self.num_classes} classes)")
        if self.mapped_classes:
            pairs = ", ".join(self._pair(t, s) for t, s in sorted(self.mapped_classes.items()))
            parts.append(f"pre-trained rows copied for classes {pairs}")
        seeded = [n for n in self.new if n in self.head] if self.mapped_classes else []
        rows = f" (the head's {len(seeded)} among them, with the rows above copied in)" if seeded else ""
        parts.append(f"{self.new_distinct} newly initialised{rows}, {len(self.ignored)} checkpoint tensors ignored")
        beyond = [n for n in self.ignored if n not in self.head]  # a pre-training head, or tensors of no layer here
        if beyond:
            parts.append(f"ignored outside the head: {_names(beyond)}")
        if self.stray:
            parts.append(
                f"{len(self.stray)} of them inside the network's own blocks, where it has no such tensor "
                f"({_names(self.stray)}): if the network's arguments differ from the training's (--network-args, "
                "the card's network), the model is not the one trained"
            )
        if self.key_mapping:
            parts.append(f"keys mapped {self.key_mapping}")
        if self.hint:
            parts.append(self.hint)
        return "; ".join(parts)

    def _pair(self, target: int, source: int) -> str:
        if target < len(self.class_names) and source < len(self.source_class_names):
            return f"{self.class_names[target]}<-{self.source_class_names[source]}"
        return f"{target}<-{source}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mapped_classes"] = {str(k): v for k, v in self.mapped_classes.items()}
        data["summary"] = self.summary
        return data


# --- key mapping -----------------------------------------------------------------------------------------


def _remap(keys: list[str], component: str, module: str, own: set[str]) -> dict[str, str]:
    """checkpoint key -> network name: ``component.rest`` -> ``module.rest`` (empty strings for none)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    lead = component + "." if component else ""
    new_lead = module + "." if module else ""
    for key in keys:
        if lead and not key.startswith(lead):
            continue
        name = new_lead + key[len(lead) :]
        if name not in own:
            for old, new in LEGACY_RENAMES:
                if old in name and name.replace(old, new) in own:
                    name = name.replace(old, new)
                    break
        out[key] = name
        taken.add(name)
    if lead:  # keys outside the re-prefixed component keep their names (an unrelated loss buffer, say)
        out.update({k: k for k in keys if k not in out and k not in taken})
    return out


def _best_mapping(keys: list[str], network: torch.nn.Module, own: set[str]) -> tuple[dict[str, str], str, str]:
    """The re-prefixing of checkpoint keys that names the most network tensors; identity on a tie."""
    components = [""] + sorted({k.split(".", 1)[0] for k in keys if "." in k})
    modules = [""] + [name for name, _ in network.named_children()]
    best = (_remap(keys, "", "", own), "", "")
    best_score = len(set(best[0].values()) & own)
    for component in components:
        for module in modules:
            if not component and not module:
                continue
            mapping = _remap(keys, component, module, own)
            score = len(set(mapping.values()) & own)
            if score > best_score:
                best, best_score = (mapping, component, module), score
    return best


# --- loading ---------------------------------------------------------------------------------------------


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" ... and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _class_dims(net_shape: torch.Size, src_shape: torch.Size, num_classes: int, source_classes: int) -> list[int]:
    """Dimensions indexed by class (output or, for a class-to-class layer, input channels); [] if none fit."""
    if len(net_shape) != len(src_shape) or not net_shape:
        return []
    dims = [d for d in range(min(2, len(net_shape))) if net_shape[d] == num_classes and src_shape[d] == source_classes]
    others = [d for d in range(len(net_shape)) if d not in dims]
    return dims if dims and all(net_shape[d] == src_shape[d] for d in others) else []


def _copy_rows(target: torch.Tensor, source: torch.Tensor, dims: list[int], pairs: list[tuple[int, int]]) -> None:
    """``target[t, ...] = source[s, ...]`` along every class dimension for the mapped (t, s) pairs."""
    tgt = torch.tensor([t for t, _ in pairs], device=target.device)
    src = torch.tensor([s for _, s in pairs], device=source.device)
    values = source
    for d in dims:
        values = values.index_select(d, src)

    def put(out: torch.Tensor, vals: torch.Tensor, rest: list[int]) -> torch.Tensor:
        d, more = rest[0], rest[1:]
        if more:  # keep the unmapped entries of the selected slices, replace the mapped ones
            vals = put(out.index_select(d, tgt), vals, more)
        return out.index_copy(d, tgt, vals.to(out.dtype))

    target.copy_(put(target.detach().clone(), values.to(target.device), dims))


def load_pretrained(
    network: torch.nn.Module,
    state: Mapping[str, torch.Tensor] | Any,
    *,
    num_classes: int,
    class_map: Mapping[int, int] | None = None,
    source: str = "checkpoint",
) -> LoadReport:
    """Load a pre-trained checkpoint into ``network`` (built for ``num_classes`` outputs) and say what happened.

    ``state`` is a state dict or anything :func:`state_dict_from` unwraps. Every network tensor that has a
    checkpoint tensor of the same name and shape is copied bitwise. The output head (:func:`output_head`) is
    kept when the checkpoint's head has the same shape, and otherwise left at the network's own initialisation
    for the target classes; ``class_map`` ({target class index: checkpoint class index}) then copies the
    matching rows of the pre-trained head (weights, biases, a class-sized norm), and also forces that mapping
    when the class counts agree. A checkpoint whose tensors all land in one top-level sub-module (a
    self-supervised Swin encoder into ``swinViT``) is encoder-only: the rest of the network is new. "New" means
    the network's own initialisation is kept, so pass a freshly built network. Copies are bitwise when the
    checkpoint's dtype is the network's (a half-precision checkpoint is widened by the copy).

    Raises :class:`ModelError` naming the tensors when a tensor outside the head (outside the encoder, for an
    encoder-only checkpoint) is missing from the checkpoint or has another shape, when the network has no
    ``num_classes``-channel output layer, or when ``class_map`` points outside either head.
    """
    ckpt = state_dict_from(state, network, source)
    out = getattr(network, "out_channels", None)
    if isinstance(out, int) and out != num_classes:
        raise ModelError(
            f"{source}: the network was built with {out} output channels but the target task has {num_classes} "
            "classes; build it with out_channels equal to the number of class names"
        )
    own_vars = network.state_dict(keep_vars=True)
    own = set(own_vars)
    mapping, component, module = _best_mapping(list(ckpt), network, own)
    mapped_into = module  # the network's module a key prefix was mapped into ("" for none)
    key_mapping = f"'{component}.' -> '{module}.'".replace("'.'", "''") if (component or module) else ""
    by_name = {name: key for key, name in mapping.items() if name in own}

    # Tensors shared under several names (DynUNet's skip_layers alias its blocks) count as one.
    aliases: dict[int, list[str]] = {}
    for name, tensor in own_vars.items():
        aliases.setdefault(id(tensor), []).append(name)
    modules = dict(network.named_modules())

    def tensors_of(module: str) -> list[torch.Tensor]:
        return [*modules[module].parameters(False), *modules[module].buffers(False)]

    def source_of(name: str) -> str | None:
        return next((by_name[a] for a in aliases[id(own_vars[name])] if a in by_name), None)

    names_of = {id(t): n for n, t in own_vars.items()}
    head_modules = output_head(network, num_classes)
    last_weight = getattr(modules[head_modules[0]], "weight", None)
    last_key = source_of(names_of[id(last_weight)]) if last_weight is not None else None
    if last_key is not None and ckpt[last_key].shape != last_weight.shape:
        # The checkpoint's head has other classes, so a class-sized layer before the final one whose checkpoint
        # tensors have the network's shapes is not class-sized there: a decoder as wide as the target has
        # classes (UNet channels (4, ...) for 4 classes). The head ends before it; its tensors load.
        for i, module in enumerate(head_modules[1:], start=1):
            # only the tensors sized by the layer's channels (not a step counter or a shared PReLU slope)
            sized = [t for t in tensors_of(module) if id(t) in names_of and num_classes in t.shape]
            keys = [(source_of(names_of[id(t)]), t) for t in sized]
            if any(k is not None and ckpt[k].shape == t.shape for k, t in keys):
                head_modules = head_modules[:i]
                break
    head_ids = {id(t) for m in head_modules for t in tensors_of(m)}
    head = [n for n, t in own_vars.items() if id(t) in head_ids]
    body = [n for n in own if id(own_vars[n]) not in head_ids]

    matched = {n for n in own if any(a in by_name for a in aliases[id(own_vars[n])])}
    if not matched:
        raise ModelError(
            f"{source}: no tensor of the checkpoint matches a tensor of {type(network).__name__} "
            f"(checkpoint keys look like {_names(sorted(ckpt))}); check the network: --network, or the card's "
            "network"
        )
    tops = {n.split(".", 1)[0] for n in matched}
    encoder = next(iter(tops)) if len(tops) == 1 and next(iter(tops)) in modules else None
    encoder_only = (
        encoder is not None
        and not (matched & set(head))
        and any(n.split(".", 1)[0] != encoder for n in own)
        and not any(n.startswith(encoder + ".") for n in head)
    )
    required = [n for n in body if n.split(".", 1)[0] == encoder] if encoder_only else body

    missing, wrong = [], []
    for name in sorted(required):
        key = source_of(name)
        if key is None:
            if not name.endswith("num_batches_tracked"):  # older checkpoints lack BatchNorm's step counter
                missing.append(name)
        elif ckpt[key].shape != own_vars[name].shape:
            wrong.append(f"{name} (checkpoint {tuple(ckpt[key].shape)}, network {tuple(own_vars[name].shape)})")
    if missing or wrong:
        what = "encoder " + repr(encoder) if encoder_only else "network (outside the output head)"
        detail = "; ".join(
            part
            for part in (
                f"wrong shape: {_names(wrong)}" if wrong else "",
                f"missing from the checkpoint: {_names(missing)}" if missing else "",
            )
            if part
        )
        raise ModelError(
            f"{source}: tensors of the {what} do not load: {detail}; check that the network and its arguments "
            "(--network and --network-args, or the card's network) are the ones the checkpoint was trained with"
        )

    # The head: kept when every class-sized tensor fits and no remapping was asked for.
    final = modules[head_modules[0]]
    final_weight = next((n for n in head if own_vars[n] is getattr(final, "weight", None)), None)
    final_key = source_of(final_weight) if final_weight else None
    source_classes = None
    if final_key is not None:
        out_dim = 1 if isinstance(final, torch.nn.modules.conv._ConvTransposeNd) else 0
        source_classes = int(ckpt[final_key].shape[out_dim]) if ckpt[final_key].dim() > out_dim else None
    head_keys = {n: source_of(n) for n in head if not n.endswith("num_batches_tracked")}
    head_fits = all(k is not None and ckpt[k].shape == own_vars[n].shape for n, k in head_keys.items())
    pairs = sorted((int(t), int(s)) for t, s in (class_map or {}).items())
    # a class map that leaves a target class out ("kidney=") asks for that class's rows anew
    identity = class_map is None or (all(t == s for t, s in pairs) and len(pairs) == num_classes)
    reinit = encoder_only or not head_fits or not identity
    if pairs:
        if encoder_only or source_classes is None:
            raise ModelError(f"{source}: a class map was given but the checkpoint has no output head to copy from")
        bad = [f"{t}<-{s}" for t, s in pairs if not (0 <= t < num_classes and 0 <= s < source_classes)]
        if bad:
            raise ModelError(
                f"{source}: class map entries {bad} are outside the target's {num_classes} or the checkpoint's "
                f"{source_classes} classes; fix the class map"
            )

    report = LoadReport(
        source=source,
        head=sorted(head),
        head_reinitialised=reinit,
        encoder_only=encoder_only,
        encoder=encoder if encoder_only else None,
        key_mapping=key_mapping,
        source_classes=source_classes,
        num_classes=num_classes,
    )
    used: set[str] = set()
    loaded_ids: set[int] = set()
    with torch.no_grad():
        for name in sorted(own):
            tensor, key = own_vars[name], source_of(name)
            if key is None or id(tensor) in loaded_ids:
                continue
            keys = {by_name[a] for a in aliases[id(tensor)] if a in by_name}  # a shared tensor's every name
            in_head = id(tensor) in head_ids
            if (not in_head and name in required) or (in_head and not reinit):
                tensor.copy_(ckpt[key])
                loaded_ids.add(id(tensor))
                used |= keys
            elif in_head and pairs and not name.endswith("num_batches_tracked"):
                dims = _class_dims(tensor.shape, ckpt[key].shape, num_classes, source_classes or 0)
                if dims:
                    _copy_rows(tensor, ckpt[key], dims, pairs)
                    used |= keys
    report.mapped_classes = dict(pairs)
    report.loaded = sorted(n for n in own if id(own_vars[n]) in loaded_ids)
    report.loaded_distinct = len(loaded_ids)
    report.new = sorted(n for n in own if id(own_vars[n]) not in loaded_ids)
    report.new_distinct = len({id(own_vars[n]) for n in report.new})
    # Named as they map onto the network when they do (the pre-trained head), else as in the checkpoint.
    report.ignored = sorted(mapping[k] if mapping.get(k) in own else k for k in ckpt if k not in used)
    report.stray = _stray_tensors(ckpt, mapping, own, modules, used, mapped_into)
    return report


def _stray_tensors(
    ckpt: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str],
    own: set[str],
    modules: dict[str, torch.nn.Module],
    used: set[str],
    prefix: str,
) -> list[str]:
    """Ignored checkpoint tensors that land inside one of the network's own modules where it has no such tensor:
    a unit or block the network lacks (``num_res_units`` 2 against 1, say: then the network is not the one
    trained), but also what published checkpoints carry and inference does not use (an older MONAI's UNETR
    ``cls_token``, a DynUNet's deep-supervision heads, a self-supervised encoder's pretext heads). Named apart in
    the load report, so a user can tell; never refused. Not counted: a training checkpoint's other sub-modules
    (a loss's weights: nothing of theirs is a module here), a module's own non-persistent buffers, a tensor
    stored under a second name of one that loaded (DynUNet's aliases), and heads that land only in the
    top-level module a key prefix was mapped into."""
    loaded = {ckpt[k].untyped_storage().data_ptr() for k in used if k in ckpt}
    stray = []
    for key, tensor in ckpt.items():
        name = mapping.get(key, key)
        if key in used or name in own or tensor.untyped_storage().data_ptr() in loaded:
            continue
        parent, _, leaf = name.rpartition(".")
        ancestors = [parent.rsplit(".", i)[0] for i in range(0, parent.count(".") + 1)] if parent else []
        inside = next((a for a in ancestors if a in modules), None)
        if inside is None or inside == prefix:
            continue
        if inside == parent and hasattr(modules[parent], leaf):
            continue
        stray.append(name)
    return sorted(stray)


# --- class maps --------------------------------------------------------------------------------------------


def class_map_from_names(
    target_names: list[str], source_names: list[str], spec: str | Mapping[str, str] | None = None
) -> dict[int, int]:
    """{target class index: source class index} for :func:`load_pretrained`'s ``class_map``.

    Classes whose names agree (case and surrounding spaces ignored) are paired; ``spec``,
    ``"liver=liver,kidney=right kidney"`` (target=source, as a ``--class-map`` option gives it) or a mapping
    of the same, adds pairs or overrides them for the targets it names, and ``"kidney="`` (no source) leaves
    that target newly initialised. Raises :class:`ModelError` naming any class that is not in its list.
    """

    def key(name: str) -> str:
        return name.strip().lower()

    targets = {key(n): i for i, n in enumerate(target_names)}
    sources = {key(n): i for i, n in enumerate(source_names)}
    pairs = {targets[n]: sources[n] for n in targets if n in sources}
    if spec is None:
        return pairs
    if isinstance(spec, str):
        items = [part.split("=", 1) for part in spec.split(",") if part.strip()]
        if any(len(item) != 2 for item in items):
            raise ModelError(f"class map {spec!r}: write it as target=source pairs separated by commas")
        seen = [key(t) for t, _ in items]
        twice = next((t.strip() for t, _ in items if seen.count(key(t)) > 1), None)
        if twice is not None:  # a dict would keep the last pair silently
            raise ModelError(f"class map {spec!r} pairs {twice!r} twice; keep one pair per class")
        spec = {t: s for t, s in items}

    def named(kind: str, name: str, known: list[str]) -> str:
        close = difflib.get_close_matches(name, known, n=1)
        return f"{kind} {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

    unknown = [named("target", t, list(target_names)) for t in spec if key(t) not in targets]
    unknown += [named("source", s, list(source_names)) for s in spec.values() if key(s) and key(s) not in sources]
    if unknown:
        raise ModelError(
            f"class map names {', '.join(unknown)} are not classes (target: {target_names}; source: "
            f"{source_names}); fix the class map or the card's class_names/source_classes"
        )
    for t, s in spec.items():
        if key(s):
            pairs[targets[key(t)]] = sources[key(s)]
        else:
            pairs.pop(targets[key(t)], None)
    return pairs


# --- fine-tuning learning rates --------------------------------------------------------------------------


def pretrained_parameters(network: torch.nn.Module, report: LoadReport) -> list[str]:
    """Parameter names (as ``named_parameters`` gives them) whose values came from the checkpoint."""
    loaded = set(report.loaded)
    return [name for name, _ in network.named_parameters() if name in loaded]


def param_groups_from_report(
    network: torch.nn.Module,
    report: LoadReport,
    lr: float,
    pretrained_scale: float,
    encoder: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups: checkpoint tensors at ``lr * pretrained_scale``, newly initialised ones at ``lr``.

    Decided by what was loaded: an encoder-only checkpoint puts the encoder in the pre-trained group and the
    decoder in the full-rate one; a re-initialised head trains at the full rate. With ``encoder`` (module
    names), only loaded tensors inside those modules take the lower rate and a loaded decoder adapts at the
    full rate, as the recipe was chosen (an encoder-only checkpoint ignores ``encoder``: what it loaded is the
    encoder). Parameters that do not require gradients are left out; empty groups are dropped.
    """
    pretrained = set(pretrained_parameters(network, report))
    if encoder is not None and not report.encoder_only:
        inside = {f"{m}.{n}" for m in encoder for n, _ in network.get_submodule(m).named_parameters()}
        pretrained &= inside
    groups = [
        {"params": [], "lr": lr, "name": "full"},
        {"params": [], "lr": lr * pretrained_scale, "name": "pretrained"},
    ]
    for name, param in network.named_parameters():
        if param.requires_grad:
            groups[name in pretrained]["params"].append(param)
    return [g for g in groups if g["params"]]


# --- normalisation -------------------------------------------------------------------------------------


NORM_KINDS = ("BatchNorm", "InstanceNorm", "GroupNorm", "LayerNorm")


def _norm_kind(module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return "BatchNorm"
    if isinstance(module, torch.nn.modules.instancenorm._InstanceNorm):
        return "InstanceNorm"
    if isinstance(module, torch.nn.GroupNorm):
        return "GroupNorm"
    if isinstance(module, torch.nn.LayerNorm):
        return "LayerNorm"
    return None


def normalisation_kinds(network: torch.nn.Module) -> set[str]:
    """The kinds of normalisation layers in ``network``: a subset of :data:`NORM_KINDS`."""
    return {kind for module in network.modules() if (kind := _norm_kind(module))}


def _uses_running_stats(module: torch.nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether this BatchNorm normalises with its running statistics in eval mode, by running a copy of it.

    A subclass can override ``forward`` to pass ``training=True`` always (SuPreM's ``ContBatchNorm3d``), so the
    flags alone do not tell; the probe runs on a copy so the real layer's statistics stay untouched.
    """
    if not module.track_running_stats or module.running_mean is None or module.running_var is None:
        return False
    probe = copy.deepcopy(module).eval()
    generator = torch.Generator().manual_seed(0)
    channels = module.num_features
    mean, var = module.running_mean, module.running_var
    for spatial in ((3, 3, 3), (3, 3), (3,), ()):
        x = torch.randn((4, channels, *spatial), generator=generator, dtype=torch.float64) * 3 + 5
        x = x.to(device=mean.device, dtype=mean.dtype)
        try:
            with torch.no_grad():
                got = probe(x)
        except (ValueError, RuntimeError):
            continue  # wrong number of dimensions for this BatchNorm{1,2,3}d
        want = F.batch_norm(x, mean, var, module.weight, module.bias, False, 0.0, module.eps)
        return bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3))
    return False


@dataclass
class NormalisationInfo:
    """The normalisation a network uses and whether BatchNorm running statistics carry source knowledge.

    ``running_stats``: BatchNorm layers that normalise with their running statistics in eval mode (the source
    domain's statistics DKD can compare against). ``batch_stats``: BatchNorm layers that normalise with the
    batch's own statistics even in eval mode (``track_running_stats=False``, no running buffers, or a subclass
    that forces ``training=True``); their buffers, if any, are not what the network uses.
    """

    kinds: set[str]
    running_stats: list[str]
    batch_stats: list[str]

    @property
    def uses_running_statistics(self) -> bool:
        return bool(self.running_stats)


def normalisation_info(network: torch.nn.Module) -> NormalisationInfo:
    running, batch = [], []
    for name, module in network.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            (running if _uses_running_stats(module) else batch).append(name)
    return NormalisationInfo(normalisation_kinds(network), running, batch)
