"""Published-checkpoint layouts read into real MONAI networks: heads for other label sets, encoder-only
checkpoints, refusals that name the tensor, learning-rate groups and normalisation detection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet, SegResNet, SwinUNETR, UNet

from ASFDALib.checkpoints import (
    LoadReport,
    class_map_from_names,
    load_pretrained,
    normalisation_info,
    normalisation_kinds,
    output_head,
    param_groups_from_report,
    state_dict_from,
)
from ASFDALib.errors import ModelError

SOURCE_CLASSES, TARGET_CLASSES = 14, 4


def unet_batch(classes: int) -> torch.nn.Module:
    return UNet(3, 1, classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")


def unet_instance(classes: int) -> torch.nn.Module:
    return UNet(3, 1, classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=0, norm="instance")


def segresnet(classes: int) -> torch.nn.Module:
    return SegResNet(3, init_filters=8, in_channels=1, out_channels=classes, blocks_down=(1, 1, 1), blocks_up=(1, 1))


def swin(classes: int) -> torch.nn.Module:
    return SwinUNETR(in_channels=1, out_channels=classes, feature_size=12, depths=(1, 1, 1, 1))


def dynunet(classes: int) -> torch.nn.Module:
    return DynUNet(
        3,
        1,
        classes,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[8, 16, 32],
        norm_name="instance",
        deep_supervision=True,
        deep_supr_num=1,
    )


def pair(factory, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A pre-trained 14-class source and a freshly built 4-class target with other random weights."""
    torch.manual_seed(seed)
    source = factory(SOURCE_CLASSES)
    torch.manual_seed(seed + 1)
    return source, factory(TARGET_CLASSES)


def save_and_read(obj, path: Path):
    torch.save(obj, path)
    return torch.load(path, map_location="cpu", weights_only=True)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def assert_loaded_bitwise(network: torch.nn.Module, report: LoadReport, source_state: dict[str, torch.Tensor]):
    own = network.state_dict()
    assert report.loaded
    for name in report.loaded:
        assert bits(own[name]) == bits(source_state[name]), name


class Universal(torch.nn.Module):
    """SuPreM's pre-training wrapper: the segmentation network as ``backbone`` plus a text-driven dynamic head."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.controller = torch.nn.Conv3d(16, 8, 1)
        self.organ_embedding = torch.nn.Embedding(25, 8)


class SSLHead(torch.nn.Module):
    """MONAI's Swin self-supervised pre-training model: the encoder as ``swin_vit`` plus three pretext heads."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.swin_vit = encoder
        self.rotation_head = torch.nn.Linear(192, 4)
        self.contrastive_head = torch.nn.Linear(192, 32)
        self.conv = torch.nn.Sequential(torch.nn.Conv3d(192, 1, 1))


# --- unwrapping ------------------------------------------------------------------------------------------


def test_state_dict_from_strips_supreme_module_backbone_prefix_inside_net():
    torch.manual_seed(0)
    net = segresnet(4)
    ckpt = {"net": torch.nn.DataParallel(Universal(net)).state_dict(), "epoch": 400}
    # SuPreM's own pre-training head is not under backbone., so only module. is shared by every key
    state = state_dict_from(ckpt)
    assert "backbone.conv_final.2.conv.weight" in state and "controller.weight" in state
    only_backbone = {"net": {k: v for k, v in ckpt["net"].items() if k.startswith("module.backbone.")}}
    assert set(state_dict_from(only_backbone)) == set(net.state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"network_weights": sd, "optimizer_state": {}, "current_epoch": 3},  # nnU-Net v2
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1},  # Lightning
        lambda sd: {"model_state_dict": {f"_orig_mod.{k}": v for k, v in sd.items()}},  # torch.compile
        lambda sd: {"model": {"module": {f"module.backbone.{k}": v for k, v in sd.items()}}},  # nested
    ],
    ids=["nnunet", "lightning", "compile", "nested"],
)
def test_state_dict_from_unwraps_layout_to_the_networks_own_keys(wrap, tmp_path):
    torch.manual_seed(0)
    sd = segresnet(4).state_dict()
    state = state_dict_from(save_and_read(wrap(sd), tmp_path / "ckpt.pt"))
    assert set(state) == set(sd)
    assert all(bits(state[k]) == bits(sd[k]) for k in sd)


def test_state_dict_from_keeps_a_shared_prefix_that_is_the_networks_own():
    torch.manual_seed(0)
    net = unet_batch(4)  # every MONAI UNet key starts with model.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
    assert set(state_dict_from(wrapped, net)) == set(net.state_dict())
    assert all(not k.startswith("model.") for k in state_dict_from(wrapped))


def test_plain_monai_unet_state_dict_loads_without_key_mapping():
    source, target = pair(unet_batch)
    report = load_pretrained(target, source.state_dict(), num_classes=TARGET_CLASSES)
    assert report.key_mapping == "" and report.head_reinitialised
    assert_loaded_bitwise(target, report, source.state_dict())


def test_state_dict_from_refuses_a_file_without_tensors_naming_it_and_its_keys():
    with pytest.raises(ModelError, match=r"lab.ckpt: no state dict.*\['epoch', 'optimizer'\]"):
        state_dict_from({"epoch": 3, "optimizer": {"lr": 0.1}}, source="lab.ckpt")


def test_a_state_dict_with_a_version_number_among_its_tensors_is_still_one():
    sd = segresnet(4).state_dict()
    state = state_dict_from(
        {"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "model.version": 1}, "epoch": 1}
    )
    assert set(state) == set(sd)


# --- output heads ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "head"),
    [
        (unet_batch, ["model.2.1.conv.unit0.conv", "model.2.0.adn.N", "model.2.0.conv"]),
        (unet_instance, ["model.2.conv"]),
        (segresnet, ["conv_final.2.conv"]),
        (swin, ["out.conv.conv"]),
        (dynunet, ["deep_supervision_heads.0.conv.conv", "output_block.conv.conv"]),
    ],
    ids=["unet-batch", "unet-instance", "segresnet", "swinunetr", "dynunet"],
)
def test_output_head_is_the_trailing_class_sized_layers(factory, head):
    assert output_head(factory(TARGET_CLASSES), TARGET_CLASSES) == head


# --- a 14-class checkpoint into a 4-class task -----------------------------------------------------------


def test_unet_batchnorm_supreme_layout_reinitialises_head_and_copies_mapped_rows(tmp_path):
    source, target = pair(unet_batch)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ckpt = save_and_read({"net": torch.nn.DataParallel(Universal(source)).state_dict()}, tmp_path / "supreme.pth")
    class_map = {0: 0, 1: 6, 3: 2}

    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES, class_map=class_map, source="supreme.pth")

    assert report.head_reinitialised and not report.encoder_only
    assert report.source_classes == SOURCE_CLASSES and report.mapped_classes == class_map
    assert "model.2.1.conv.unit0.conv.weight" in report.head and "model.2.0.adn.N.running_mean" in report.head
    assert set(report.new) == set(report.head)
    assert {"controller.weight", "organ_embedding.weight"} <= set(report.ignored)
    assert report.key_mapping == "'backbone.' -> ''"
    assert_loaded_bitwise(target, report, source.state_dict())
    assert len(report.loaded) + len(report.new) == len(target.state_dict())

    own, src = target.state_dict(), source.state_dict()
    pairs = sorted(class_map.items())
    t, s = torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])
    # A class-to-class conv: rows and columns both follow the class map; the unmapped class 2 keeps its init
    conv = "model.2.1.conv.unit0.conv.weight"
    assert torch.equal(own[conv][t][:, t], src[conv][s][:, s])
    assert torch.equal(own[conv][2], before[conv][2])
    # The transposed conv produces classes along dim 1, the BatchNorm along dim 0
    assert torch.equal(own["model.2.0.conv.weight"][:, t], src["model.2.0.conv.weight"][:, s])
    assert torch.equal(own["model.2.0.adn.N.running_var"][t], src["model.2.0.adn.N.running_var"][s])
    assert "14 tensors" not in report.summary and "re-initialised for 4 classes (checkpoint has 14)" in report.summary


def test_unet_instancenorm_nnunet_layout_loads_body_and_names_new_head(tmp_path):
    source, target = pair(unet_instance)
    ckpt = save_and_read(
        {"network_weights": source.state_dict(), "optimizer_state": {}, "current_epoch": 1000, "init_args": {}},
        tmp_path / "checkpoint_final.pth",
    )
    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES)
    assert report.new == ["model.2.conv.bias", "model.2.conv.weight"]
    # the pre-trained 14-class head, named as the network tensor it would have filled
    assert report.ignored == ["model.2.conv.bias", "model.2.conv.weight"] and report.mapped_classes == {}
    assert report.key_mapping == ""
    assert_loaded_bitwise(target, report, source.state_dict())


def test_segresnet_lightning_layout_ignores_other_module_tensors(tmp_path):
    source, target = pair(segresnet)
    lightning = {f"model.{k}": v for k, v in source.state_dict().items()}
    lightning["loss_fn.class_weight"] = torch.ones(SOURCE_CLASSES)
    ckpt = save_and_read({"state_dict": lightning, "epoch": 9, "global_step": 90}, tmp_path / "epoch=9.ckpt")

    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES, class_map={1: 1, 2: 3})

    assert report.new == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]
    assert report.ignored == ["loss_fn.class_weight"]  # the pre-trained head's rows were used, not ignored
    assert "ignored outside the head: loss_fn.class_weight" in report.summary  # named where users read it
    assert_loaded_bitwise(target, report, source.state_dict())
    w = target.state_dict()["conv_final.2.conv.weight"]
    assert torch.equal(w[[1, 2]], source.state_dict()["conv_final.2.conv.weight"][[1, 3]])


def test_checkpoint_tensors_inside_the_networks_own_blocks_are_named_apart_not_refused(tmp_path):
    """Trained with two residual units, built with one: the second unit's tensors land in the network's own
    blocks where it has none, which the report names apart (the network's arguments may differ from the
    training's); published checkpoints carry such tensors too, so it loads. A loss's weights are not among them."""
    trained = UNet(3, 1, SOURCE_CLASSES, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm="batch")
    state = {f"module.{k}": v for k, v in trained.state_dict().items()} | {"module.loss.weight": torch.ones(3)}
    ckpt = save_and_read({"model": state}, tmp_path / "m.pt")
    report = load_pretrained(unet_batch(TARGET_CLASSES), ckpt, num_classes=TARGET_CLASSES)
    assert report.stray and all(".unit1." in n for n in report.stray) and "loss.weight" not in report.stray
    assert "inside the network's own blocks, where it has no such tensor (model.0.conv.unit1." in report.summary
    assert "the model is not the one trained" in report.summary


def test_a_dynunet_trained_with_deep_supervision_loads_into_one_built_without(tmp_path):
    """The usual way to run inference: the deep-supervision heads are left out, named, never refused."""
    args = dict(spatial_dims=3, in_channels=1, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2])
    trained = DynUNet(out_channels=TARGET_CLASSES, deep_supervision=True, deep_supr_num=1, **args)
    ckpt = save_and_read(trained.state_dict(), tmp_path / "dyn.pt")
    target = DynUNet(out_channels=TARGET_CLASSES, deep_supervision=False, **args)
    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES)
    assert not report.head_reinitialised and report.ignored


def test_swinunetr_supreme_layout_loads_all_but_head(tmp_path):
    source, target = pair(swin)
    ckpt = save_and_read({"net": torch.nn.DataParallel(Universal(source)).state_dict()}, tmp_path / "supreme_swin.pth")
    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES)
    assert report.new == ["out.conv.conv.bias", "out.conv.conv.weight"] and report.head_reinitialised
    assert set(report.ignored) == {
        "out.conv.conv.bias",
        "out.conv.conv.weight",
        "controller.bias",
        "controller.weight",
        "organ_embedding.weight",
    }
    assert_loaded_bitwise(target, report, source.state_dict())


def test_dynunet_compiled_layout_reinitialises_output_and_deep_supervision_heads(tmp_path):
    source, target = pair(dynunet)
    # torch.compile(source).state_dict() names every key _orig_mod.<key> (checked; compiling here costs seconds);
    # DeepSpeed stores the state dict under "module"
    compiled = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    ckpt = save_and_read({"module": compiled}, tmp_path / "dyn.pt")

    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES, class_map={3: 13})

    assert set(report.new) == {
        "output_block.conv.conv.weight",
        "output_block.conv.conv.bias",
        "deep_supervision_heads.0.conv.conv.weight",
        "deep_supervision_heads.0.conv.conv.bias",
        # DynUNet's skip_layers alias the same deep-supervision head
        "skip_layers.next_layer.super_head.conv.conv.weight",
        "skip_layers.next_layer.super_head.conv.conv.bias",
    }
    assert_loaded_bitwise(target, report, source.state_dict())
    for head in ("output_block", "deep_supervision_heads.0"):
        bias = f"{head}.conv.conv.bias"
        assert bits(target.state_dict()[bias][3]) == bits(source.state_dict()[bias][13])


@pytest.mark.parametrize(
    "factory",
    [
        # decoders whose top width equals the target's class count (4): class-sized in the network, not in
        # the 14-class checkpoint, so they are decoder, not head
        lambda c: UNet(3, 1, c, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance"),
        lambda c: DynUNet(
            3, 1, c, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16], norm_name="instance", deep_supervision=True
        ),
    ],
    ids=["unet", "dynunet"],
)
def test_a_decoder_as_wide_as_the_target_has_classes_loads_and_only_the_head_is_new(factory):
    source, target = pair(factory)
    report = load_pretrained(target, source.state_dict(), num_classes=TARGET_CLASSES)
    fresh = {n for n, t in source.state_dict().items() if t.shape != target.state_dict()[n].shape}
    assert set(report.new) == fresh != set()  # exactly the tensors whose shapes name the classes
    assert set(report.ignored) == fresh
    assert_loaded_bitwise(target, report, source.state_dict())
    assert len(report.loaded) + len(fresh) == len(target.state_dict())


def test_same_class_count_keeps_the_pretrained_head_bitwise(tmp_path):
    torch.manual_seed(0)
    source = segresnet(TARGET_CLASSES)
    torch.manual_seed(1)
    target = segresnet(TARGET_CLASSES)
    ckpt = save_and_read({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "a.pt")
    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES)
    assert not report.head_reinitialised and report.new == [] and report.ignored == []
    assert "output head kept (4 classes)" in report.summary
    assert_loaded_bitwise(target, report, source.state_dict())


# --- encoder-only checkpoints ----------------------------------------------------------------------------


def test_swin_ssl_encoder_checkpoint_loads_into_swinvit_and_reports_decoder_new(tmp_path):
    source, target = pair(swin)
    ssl = torch.nn.DataParallel(SSLHead(source.swinViT)).state_dict()
    ckpt = save_and_read({"state_dict": ssl, "epoch": 100}, tmp_path / "ssl_swin.pt")

    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES, source="ssl_swin.pt")

    assert report.encoder_only and report.encoder == "swinViT" and report.head_reinitialised
    assert report.key_mapping == "'swin_vit.' -> 'swinViT.'"
    assert set(report.loaded) == {k for k in target.state_dict() if k.startswith("swinViT.")}
    assert {"decoder1.conv_block.conv1.conv.weight", "encoder1.layer.conv1.conv.weight", "out.conv.conv.weight"} <= (
        set(report.new)
    )
    assert not any(n.startswith("swinViT.") for n in report.new)
    assert all(k.split(".")[0] in ("rotation_head", "contrastive_head", "conv") for k in report.ignored)
    assert_loaded_bitwise(target, report, source.state_dict())
    assert "encoder-only checkpoint into 'swinViT'" in report.summary


def test_swin_encoder_in_monai_load_from_layout_with_legacy_mlp_names(tmp_path):
    """``model_swinvit.pt`` as ``SwinUNETR.load_from`` reads it: ``module.layers1.0...``, ``mlp.fc1``."""
    source, target = pair(swin)
    legacy = {
        "module." + k.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2"): v
        for k, v in source.swinViT.state_dict().items()
    }
    ckpt = save_and_read({"state_dict": legacy}, tmp_path / "model_swinvit.pt")
    report = load_pretrained(target, ckpt, num_classes=TARGET_CLASSES)
    assert report.encoder_only and report.key_mapping == "'' -> 'swinViT.'"
    assert "swinViT.layers1.0.blocks.0.mlp.linear1.weight" in report.loaded and report.ignored == []
    assert_loaded_bitwise(target, report, source.state_dict())


def test_incomplete_encoder_checkpoint_is_refused_by_name():
    source, target = pair(swin)
    state = {f"swinViT.{k}": v for k, v in source.swinViT.state_dict().items()}
    del state["swinViT.layers2.0.blocks.0.attn.qkv.weight"]
    with pytest.raises(ModelError, match=r"encoder 'swinViT'.*missing.*swinViT\.layers2\.0\.blocks\.0\.attn\.qkv"):
        load_pretrained(target, state, num_classes=TARGET_CLASSES)


# --- refusals --------------------------------------------------------------------------------------------


def test_wrong_shape_outside_the_head_is_refused_by_name(tmp_path):
    source, target = pair(unet_batch)
    state = dict(source.state_dict())
    state["model.1.submodule.0.conv.unit0.conv.weight"] = torch.zeros(16, 9, 3, 3, 3)
    ckpt = save_and_read({"state_dict": state}, tmp_path / "bad.pt")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(
        ModelError,
        match=r"bad\.pt: .*wrong shape: model\.1\.submodule\.0\.conv\.unit0\.conv\.weight "
        r"\(checkpoint \(16, 9, 3, 3, 3\)",
    ):
        load_pretrained(target, ckpt, num_classes=TARGET_CLASSES, source="bad.pt")
    # nothing was copied before the refusal
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_missing_tensor_outside_the_head_is_refused_by_name():
    source, target = pair(segresnet)
    state = dict(source.state_dict())
    del state["down_layers.1.1.conv1.conv.weight"]
    with pytest.raises(ModelError, match=r"missing from the checkpoint: down_layers\.1\.1\.conv1\.conv\.weight"):
        load_pretrained(target, state, num_classes=TARGET_CLASSES)


def test_checkpoint_of_another_network_is_refused():
    source, _ = pair(segresnet)
    _, target = pair(unet_instance)
    with pytest.raises(ModelError, match="do not load|no tensor of the checkpoint matches"):
        load_pretrained(target, source.state_dict(), num_classes=TARGET_CLASSES)


def test_class_map_outside_either_head_is_refused():
    source, target = pair(segresnet)
    with pytest.raises(ModelError, match=r"class map entries \['1<-14'\]"):
        load_pretrained(target, source.state_dict(), num_classes=TARGET_CLASSES, class_map={1: 14})


def test_network_built_for_other_class_count_is_refused():
    source, _ = pair(unet_instance)
    with pytest.raises(ModelError, match="built with 5 output channels but the target task has 4"):
        load_pretrained(unet_instance(5), source.state_dict(), num_classes=TARGET_CLASSES)
    # SegResNet does not say its output count; the head search says it instead
    with pytest.raises(ModelError, match="SegResNet has no layer with 4 output channels"):
        load_pretrained(segresnet(5), pair(segresnet)[0].state_dict(), num_classes=TARGET_CLASSES)


# --- class maps by name ---------------------------------------------------------------------------------

TARGET_NAMES = ["background", "liver", "kidney", "tumour"]
SOURCE_NAMES = ["background", "spleen", "Kidney", "gallbladder", "liver"]


def test_class_map_pairs_equal_names_by_default():
    assert class_map_from_names(TARGET_NAMES, SOURCE_NAMES) == {0: 0, 1: 4, 2: 2}


def test_class_map_option_adds_to_and_overrides_the_name_pairs():
    assert class_map_from_names(TARGET_NAMES, SOURCE_NAMES, "tumour = gallbladder") == {0: 0, 1: 4, 2: 2, 3: 3}
    assert class_map_from_names(TARGET_NAMES, SOURCE_NAMES, "liver=spleen") == {0: 0, 1: 1, 2: 2}


def test_a_class_map_that_pairs_one_class_twice_is_refused_not_resolved_silently():
    with pytest.raises(ModelError, match=r"pairs 'kidney' twice; keep one pair per class"):
        class_map_from_names(TARGET_NAMES, SOURCE_NAMES, "kidney=gallbladder, Kidney =spleen")


def test_class_map_entry_without_a_source_leaves_that_class_newly_initialised():
    assert class_map_from_names(TARGET_NAMES, SOURCE_NAMES, "kidney=") == {0: 0, 1: 4}


def test_blanking_a_class_re_initialises_its_rows_even_when_the_head_fits():
    torch.manual_seed(0)
    source, target = unet_batch(3), unet_batch(3)
    names = ["background", "liver", "kidney"]
    report = load_pretrained(
        target, source.state_dict(), num_classes=3, class_map=class_map_from_names(names, names, "kidney=")
    )
    assert report.head_reinitialised and report.mapped_classes == {0: 0, 1: 1}
    kept = load_pretrained(
        unet_batch(3), source.state_dict(), num_classes=3, class_map=class_map_from_names(names, names)
    )
    assert not kept.head_reinitialised  # every class pairs with itself: the head is kept whole


def test_class_map_with_unknown_name_is_refused_naming_it():
    with pytest.raises(ModelError, match="source 'pancreas'"):
        class_map_from_names(TARGET_NAMES, SOURCE_NAMES, "liver=pancreas")
    with pytest.raises(ModelError, match="target 'kidny' \\(did you mean 'kidney'\\?\\)"):
        class_map_from_names(TARGET_NAMES, SOURCE_NAMES, "kidny=Kidney")


# --- learning-rate groups --------------------------------------------------------------------------------


def test_param_groups_put_loaded_tensors_at_the_pretrained_rate():
    source, target = pair(swin)
    report = load_pretrained(
        target, {f"module.swin_vit.{k}": v for k, v in source.swinViT.state_dict().items()}, num_classes=4
    )
    groups = {g["name"]: g for g in param_groups_from_report(target, report, lr=1e-3, pretrained_scale=0.1)}
    assert groups["pretrained"]["lr"] == pytest.approx(1e-4) and groups["full"]["lr"] == 1e-3
    assert {id(p) for p in groups["pretrained"]["params"]} == {id(p) for p in target.swinViT.parameters()}
    head = target.out.conv.conv.weight
    assert any(p is head for p in groups["full"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(target.parameters()))
    torch.optim.AdamW(list(groups.values()))  # a valid optimizer configuration


# --- normalisation ---------------------------------------------------------------------------------------


class BatchStatsBatchNorm3d(torch.nn.modules.batchnorm._BatchNorm):
    """A BatchNorm that always normalises with the batch's statistics, as SuPreM's UNet does."""

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError("expected 5D input")

    def forward(self, input):
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, 0.1, self.eps)


@pytest.mark.parametrize(
    ("factory", "kinds"),
    [
        (unet_batch, {"BatchNorm"}),
        (unet_instance, {"InstanceNorm"}),
        (segresnet, {"GroupNorm"}),
        (swin, {"LayerNorm", "InstanceNorm"}),
        (dynunet, {"InstanceNorm"}),
    ],
    ids=["unet-batch", "unet-instance", "segresnet", "swinunetr", "dynunet"],
)
def test_normalisation_kinds_of_monai_networks(factory, kinds):
    network = factory(TARGET_CLASSES)
    assert normalisation_kinds(network) == kinds
    info = normalisation_info(network)
    assert info.uses_running_statistics == (kinds == {"BatchNorm"})


def test_batchnorm_that_ignores_running_statistics_is_detected_without_changing_them():
    network = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3),
        torch.nn.BatchNorm3d(4),
        BatchStatsBatchNorm3d(4),
        torch.nn.BatchNorm3d(4, track_running_stats=False),
    )
    network[1].running_mean.fill_(0.5)
    network[2].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    info = normalisation_info(network.eval())
    assert info.running_stats == ["1"] and info.batch_stats == ["2", "3"]
    assert info.kinds == {"BatchNorm"} and info.uses_running_statistics
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    only_batch = torch.nn.Sequential(BatchStatsBatchNorm3d(4))
    assert not normalisation_info(only_batch).uses_running_statistics


def test_the_report_counts_a_tensor_the_network_shares_under_two_names_once():
    source, target = dynunet(4), dynunet(4)
    report = load_pretrained(target, source.state_dict(), num_classes=4)
    distinct = {id(t) for t in target.state_dict(keep_vars=True).values()}
    assert report.loaded_distinct == len(distinct) < len(report.loaded)  # skip_layers name them again
    assert report.loaded_distinct == len(list(target.named_parameters()))  # InstanceNorm: no buffers
    assert report.summary.startswith(
        f"checkpoint: loaded {len(distinct)} tensors (under {len(report.loaded)} names: the network shares tensors)"
    )
    # the head re-initialised for other classes: its new tensors are counted once too, as loaded ones are
    target = dynunet(3)
    report = load_pretrained(target, source.state_dict(), num_classes=3)
    new = {id(t) for n, t in target.state_dict(keep_vars=True).items() if n in report.new}
    assert report.new_distinct == len(new) < len(report.new)  # the deep-supervision head is shared too
    assert f"; {len(new)} newly initialised" in report.summary
