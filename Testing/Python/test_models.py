"""Loading real models in all three forms, and the trust rules that keep loading safe by default."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ASFDALib.errors import ModelError, TrustRequiredError
from ASFDALib.models.card import ModelCard, NetworkSpec, load_card, save_card
from ASFDALib.models.loading import build_network, load_model

CLASSES = ["background", "liver", "kidney", "gallbladder"]
UNET_ARGS = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 4,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "norm": "batch",
}


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return build_network(NetworkSpec("UNet", UNET_ARGS)).eval()


@pytest.fixture
def card():
    return ModelCard(class_names=CLASSES, spacing=(2, 2, 2), roi_size=(32, 32, 32))


def _same_output(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


def test_state_dict_with_network_from_the_card(tmp_path, unet, card):
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    save_card(replace(card, network=NetworkSpec("UNet", UNET_ARGS)), tmp_path / "net.card.json")
    model = load_model(tmp_path / "net.pt")
    assert model.kind == "state_dict"
    assert _same_output(model.network, unet)


def test_state_dict_with_network_given_separately(tmp_path, unet, card):
    torch.save({"state_dict": {f"module.{k}": v for k, v in unet.state_dict().items()}}, tmp_path / "ckpt.pth")
    model = load_model(tmp_path / "ckpt.pth", card, NetworkSpec("UNet", UNET_ARGS))
    assert _same_output(model.network, unet)


def test_state_dict_without_a_network_says_how_to_give_one(tmp_path, unet, card):
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    with pytest.raises(ModelError, match="--network"):
        load_model(tmp_path / "net.pt", card)


def test_pickled_checkpoint_needs_trust(tmp_path, unet, card):
    torch.save({"model": unet}, tmp_path / "pickled.pt")  # a whole module: unpickling runs code
    with pytest.raises(TrustRequiredError, match="trust"):
        load_model(tmp_path / "pickled.pt", card, NetworkSpec("UNet", UNET_ARGS))
    model = load_model(tmp_path / "pickled.pt", card, NetworkSpec("UNet", UNET_ARGS), trust=True)
    assert _same_output(model.network, unet)


@pytest.mark.parametrize("content", [b"model weights: see the README\n", b"\x5c\x01\x00\x00" + bytes(344)])
def test_a_file_that_is_no_checkpoint_is_named_so_not_sent_to_trust(tmp_path, card, content):
    """A text file or a NIfTI header given as --model: --trust would not make either a checkpoint."""
    (tmp_path / "model.pt").write_bytes(content)
    for trust in (False, True):
        with pytest.raises(ModelError, match="not a PyTorch checkpoint") as refused:
            load_model(tmp_path / "model.pt", card, NetworkSpec("UNet", UNET_ARGS), trust=trust)
        assert not isinstance(refused.value, TrustRequiredError) and "--trust" not in str(refused.value)


def test_torchscript_needs_trust_and_then_loads(tmp_path, unet, card):
    torch.jit.script(unet).save(str(tmp_path / "net.ts"))
    with pytest.raises(TrustRequiredError, match="TorchScript runs code"):
        load_model(tmp_path / "net.ts", card)
    model = load_model(tmp_path / "net.ts", card, trust=True)
    assert model.kind == "torchscript" and model.scripted
    assert _same_output(model.network, unet)


def test_a_card_with_other_classes_gets_a_new_head_and_says_so(tmp_path, unet):
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    other = ModelCard(class_names=["background", "liver", "kidney"], network=NetworkSpec("UNet", UNET_ARGS))
    model = load_model(tmp_path / "net.pt", other)
    assert model.spec.args["out_channels"] == 3  # built for the card's classes, not the checkpoint's 4
    report = model.load_report
    assert report.head_reinitialised and report.source_classes == 4 and report.num_classes == 3
    assert "model.2.conv.weight" in report.new and "model.2.conv.weight" in report.ignored
    assert "output head re-initialised for 3 classes (checkpoint has 4)" in report.summary
    assert model.head_is_new


def test_a_model_card_matching_the_checkpoint_keeps_its_head(tmp_path, unet, card):
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    model = load_model(tmp_path / "net.pt", card, NetworkSpec("UNet", UNET_ARGS))
    assert not model.load_report.head_reinitialised and not model.load_report.new and not model.head_is_new
    assert len(model.load_report.loaded) == len(unet.state_dict())


def test_weights_that_do_not_fit_the_network_are_explained(tmp_path, unet, card):
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    other = dict(UNET_ARGS, channels=[8, 16, 32])
    with pytest.raises(ModelError, match=r"net.pt: tensors of the network .*do not load: wrong shape: model.0"):
        load_model(tmp_path / "net.pt", card, NetworkSpec("UNet", other))


def test_unknown_network_suggests_close_names():
    with pytest.raises(ModelError, match="did you mean"):
        build_network(NetworkSpec("Unett", {}))


def test_corrupt_weights_file(tmp_path, card):
    (tmp_path / "net.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError):
        load_model(tmp_path / "net.pt", card, NetworkSpec("UNet", UNET_ARGS))


def test_card_errors_are_specific(tmp_path):
    (tmp_path / "c.json").write_text('{"class_names": ["bg", "a"], "spacin": 1}')
    with pytest.raises(ModelError, match="unknown keys \\['spacin'\\]"):
        load_card(tmp_path / "c.json")
    (tmp_path / "c.yaml").write_text("class_names: [bg]\n")
    with pytest.raises(ModelError, match="background and at least one class"):
        load_card(tmp_path / "c.yaml")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_card(tmp_path / "d.json")


def test_a_misspelt_card_key_is_named_with_the_key_it_likely_meant(tmp_path):
    (tmp_path / "c.json").write_text('{"class_names": ["background", "a"], "roi_sise": [32, 32, 32]}')
    with pytest.raises(ModelError, match=r"c\.json: unknown keys \['roi_sise'\]; roi_sise \(did you mean roi_size\?\)"):
        load_card(tmp_path / "c.json")


def test_a_card_fields_own_error_names_the_card_file(tmp_path):
    (tmp_path / "c.json").write_text('{"class_names": ["background", "a"], "intensity": {"mode": "CT"}}')
    with pytest.raises(ModelError, match=r"c\.json: intensity mode 'CT' unknown; use one of ct, "):
        load_card(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('{"class_names": ["background", "a"], "spacing": [1, 0, 1]}')
    with pytest.raises(ModelError, match=r"d\.json: spacing must be three positive numbers"):
        load_card(tmp_path / "d.json")


@pytest.mark.parametrize(
    "classes, source",
    [
        (["liver", "kidney"], ["background", "spleen", "liver", "kidney"]),  # an organ of the head first
        (["liver", "background", "kidney"], None),  # the background named, but not first
    ],
)
def test_a_card_that_does_not_start_with_the_background_is_refused(classes, source):
    with pytest.raises(ModelError, match=r"class_names starts with 'liver'; the first class is the background"):
        ModelCard(class_names=classes, source_classes=source)


def test_the_background_may_take_another_common_name():
    assert ModelCard(class_names=["Background", "liver"]).num_classes == 2
    assert ModelCard(class_names=["clear label", "liver"], source_classes=["clear label", "liver"]).num_classes == 2


def test_a_card_says_what_the_network_is_given_defaults_included():
    card = ModelCard(class_names=["background", "liver"], intensity={"mode": "ct"})
    assert card.describe_input() == "1.5 x 1.5 x 1.5 mm voxels, 96 x 96 x 96 windows, CT window -1000..1000 HU to 0..1"
    mri = ModelCard(class_names=["background", "liver"], spacing=(2, 2, 3), roi_size=(48, 48, 32))
    assert (
        mri.describe_input()
        == "2 x 2 x 3 mm voxels, 48 x 48 x 32 windows, percentiles 0.5..99.5 of each volume to 0..1"
    )


def test_a_zscore_over_every_voxel_is_a_card_choice_kept_only_where_chosen(tmp_path):
    """MONAI's NormalizeIntensity and nnU-Net z-score every voxel unless told to mask; the card keeps
    ``nonzero`` only where it is false, so cards, model digests and cache keys written before stay as they were."""
    import numpy as np

    from ASFDALib.data.preprocess import intensity_transform

    masked = ModelCard(class_names=["background", "liver"], intensity={"mode": "zscore"})
    every = ModelCard(class_names=["background", "liver"], intensity={"mode": "zscore", "nonzero": False})
    assert "nonzero" not in masked.to_dict()["intensity"] and "nonzero" not in masked.preprocessing_key()
    assert every.to_dict()["intensity"]["nonzero"] is False and every.preprocessing_key() != masked.preprocessing_key()
    assert every.describe_input().endswith("z-score over every voxel")
    assert masked.describe_input().endswith("z-score over non-zero voxels")
    save_card(every, tmp_path / "every.card.json")
    assert load_card(tmp_path / "every.card.json").intensity.nonzero is False
    # a scan with an air-free zero background: the two differ exactly there
    image = torch.tensor(np.r_[np.zeros(6), np.arange(1.0, 7.0)], dtype=torch.float32)[None]
    over_every = intensity_transform(every.intensity)(image)
    assert abs(float(over_every.mean())) < 1e-6 and abs(float(over_every.std(unbiased=False)) - 1) < 1e-5
    over_nonzero = intensity_transform(masked.intensity)(image)
    assert float(over_nonzero[0, 0]) == 0.0 and abs(float(over_nonzero[0, 6:].mean())) < 1e-6
    with pytest.raises(ModelError, match="nonzero false is a z-score's choice; mode 'ct' has none"):
        ModelCard(class_names=["background", "liver"], intensity={"mode": "ct", "nonzero": False})


def _write_bundle(folder: Path, network_def: dict, unet: torch.nn.Module) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(unet.state_dict(), folder / "models" / "model.pt")
    config = {
        "network_def": network_def,
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.5},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    meta = {
        "name": "test bundle",
        "network_data_format": {"outputs": {"pred": {"channel_def": {str(i): name for i, name in enumerate(CLASSES)}}}},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_bundle_with_a_plain_monai_network_loads_without_trust(tmp_path, unet):
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    model = load_model(folder)
    assert model.kind == "bundle"
    assert model.card.class_names == CLASSES
    assert model.card.spacing == (1.5, 1.5, 2.0)
    assert model.card.roi_size == (32, 32, 32)
    # the card's own window: a bundle's inference overlap would change the model's digest, and its sessions
    assert (model.card.overlap, model.card.sw_batch_size) == (0.25, 2)
    assert model.card.intensity.mode == "ct" and model.card.intensity.a_min == -57
    assert _same_output(model.network, unet)


@pytest.mark.parametrize("arguments, nonzero", [({}, False), ({"nonzero": True}, True), ({"nonzero": False}, False)])
def test_a_bundles_normalize_intensity_is_read_with_monais_default_over_every_voxel(tmp_path, unet, arguments, nonzero):
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    config = json.loads((folder / "configs" / "inference.json").read_text())
    config["preprocessing"]["transforms"][1] = {"_target_": "NormalizeIntensityd", "keys": "image", **arguments}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    intensity = load_model(folder).card.intensity
    assert (intensity.mode, intensity.nonzero) == ("zscore", nonzero)


def test_a_bundles_weights_or_config_file_given_as_the_model_loads_the_bundle(tmp_path, unet):
    """A file dialog (the panel's model field) picks files: a bundle's models/model.pt or configs/inference.json."""
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    for picked in (folder / "models" / "model.pt", folder / "configs" / "inference.json"):
        model = load_model(picked)
        assert (model.kind, model.path, model.card.class_names) == ("bundle", folder, CLASSES)
    # another checkpoint beside the bundle's weights is a model of its own, never the bundle's weights instead
    torch.save(unet.state_dict(), folder / "models" / "model_best_epoch90.pt")
    with pytest.raises(ModelError, match="model_best_epoch90.pt: no model card found .* sits in the MONAI bundle"):
        load_model(folder / "models" / "model_best_epoch90.pt")
    # a card beside the weights says the file is meant on its own: it is read as the state dict it is
    (folder / "models" / "model.card.json").write_text(json.dumps({"class_names": CLASSES}))
    with pytest.raises(ModelError, match="model.pt: weights need a network to load into"):
        load_model(folder / "models" / "model.pt")


def test_bundle_with_code_in_its_config_needs_trust(tmp_path, unet):
    expression = {"_target_": "monai.networks.nets.UNet", **UNET_ARGS, "channels": "$[4, 8, 16]"}
    folder = _write_bundle(tmp_path / "bundle", expression, unet)
    with pytest.raises(TrustRequiredError, match="network_def is not a plain MONAI network"):
        load_model(folder)
    model = load_model(folder, trust=True)  # MONAI's own ConfigParser builds it
    assert _same_output(model.network, unet)


def test_a_bundle_whose_network_refers_to_literal_values_of_its_config_loads_without_trust(tmp_path, unet):
    """MONAI's "@num_classes" is a reference to a value, not code: resolved, the network is a plain one."""
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS, "out_channels": "@num_classes"}, unet)
    config = json.loads((folder / "configs" / "inference.json").read_text())
    (folder / "configs" / "inference.json").write_text(json.dumps({**config, "num_classes": 4}))
    assert _same_output(load_model(folder).network, unet)


def test_an_argument_the_network_does_not_take_is_named_with_where_to_correct_it(tmp_path, unet):
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS, "img_size": [32, 32, 32]}, unet)
    with pytest.raises(ModelError, match=r"network UNet: MONAI \S+ takes no argument 'img_size'; remove or correct"):
        load_model(folder)
    # one a published config of an older MONAI still passes is named as such (SwinUNETR's img_size)
    spec = NetworkSpec("SwinUNETR", {"img_size": [64, 64, 64], "in_channels": 1, "out_channels": 2})
    with pytest.raises(ModelError, match="takes no argument 'img_size' \\(an older MONAI's, dropped since\\)"):
        build_network(spec)


def test_bundle_card_file_overrides_metadata(tmp_path, unet, card):
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    save_card(replace(card, name="custom"), folder / "asfda_card.json")
    assert load_model(folder).card.name == "custom"


def test_a_target_card_that_keeps_no_pre_trained_row_names_the_classes_the_bundle_knows(tmp_path, unet):
    """A card for other classes (no source_classes) beside a bundle: its head starts anew, and the load report
    says how to keep the rows of the classes the two share, naming the bundle's own classes."""
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    target = ModelCard(class_names=["background", "liver", "spleen"], spacing=(2, 2, 2), roi_size=(32, 32, 32))
    save_card(target, tmp_path / "target.card.json")
    report = load_model(folder, tmp_path / "target.card.json").load_report
    assert report.head_reinitialised and not report.mapped_classes
    assert (
        "list the checkpoint's 4 classes in the card's source_classes (its metadata names them: "
        f"{', '.join(CLASSES)}) (then --class-map pairs those named otherwise)" in report.summary
    )
    named = replace(target, source_classes=list(CLASSES))
    save_card(named, tmp_path / "named.card.json")
    report = load_model(folder, tmp_path / "named.card.json").load_report
    assert report.mapped_classes == {0: 0, 1: 1} and "source_classes" not in report.summary


def test_bundle_without_weights_is_explained(tmp_path, unet):
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    shutil.rmtree(folder / "models")
    with pytest.raises(ModelError, match="no weights"):
        load_model(folder)


def test_missing_card_lists_where_it_looked(tmp_path, unet):
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    with pytest.raises(ModelError, match="no model card found .*net.card.json"):
        load_model(tmp_path / "net.pt")
