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


def test_a_card_orients_scans_to_its_axcodes_and_label_maps_come_back_on_the_scans_grid():
    """A network trained on LPS-ordered input (MONAI's Orientationd axcodes LPS) is given LPS; the card stores
    axcodes only where it is not RAS, so every card before it keeps its digest and cache keys."""
    import numpy as np

    from ASFDALib.data.preprocess import labels_to_native, preprocess
    from ASFDALib.data.volumes import Volume

    ras = ModelCard(class_names=["background", "liver"], spacing=(1, 1, 1))
    lps = ModelCard(class_names=["background", "liver"], spacing=(1, 1, 1), axcodes="lps")
    assert "axcodes" not in ras.to_dict() and "axcodes" not in ras.preprocessing_key()
    assert lps.to_dict()["axcodes"] == "LPS" and lps.preprocessing_key() != ras.preprocessing_key()
    assert lps.describe_input().startswith("1 x 1 x 1 mm voxels (axes to LPS), ")
    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    volume = Volume(array, np.eye(4), Path("scan.nii.gz"))  # stored RAS
    given = preprocess(volume, replace(lps, intensity={"mode": "none"}))
    np.testing.assert_array_equal(given[0].numpy(), array[::-1, ::-1, :])  # left and back first
    label = (given[0].numpy() % 2).astype(np.uint8)  # a map in the network's grid goes back to the scan's
    back = labels_to_native(label, given.affine.numpy(), array.shape, volume.affine)
    np.testing.assert_array_equal(back, (array % 2).astype(np.uint8))
    with pytest.raises(ModelError, match="axcodes 'RRS': three letters, one of L/R, A/P, S/I each"):
        ModelCard(class_names=["background", "liver"], axcodes="RRS")


def _write_bundle(
    folder: Path, network_def: dict, unet: torch.nn.Module, sections: dict | None = None, pred: dict | None = None
) -> Path:
    """A bundle of ``unet``'s weights; ``sections``: the config's preprocessing, inferer and the values they refer
    to (a spleen-like one by default); ``pred``: metadata's outputs.pred (CLASSES as channel_def by default)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(unet.state_dict(), folder / "models" / "model.pt")
    config = {"network_def": network_def, **(sections or SPLEEN_LIKE)}
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    pred = pred or {"channel_def": {str(i): name for i, name in enumerate(CLASSES)}}
    meta = {"name": "test bundle", "network_data_format": {"outputs": {"pred": pred}}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    return folder


SPLEEN_LIKE = {
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


# wholeBrainSeg_Large_UNEST_segmentation writes "nonzero": "True"; MONAI tests `if self.nonzero`
@pytest.mark.parametrize(
    "arguments, nonzero",
    [({}, False), ({"nonzero": True}, True), ({"nonzero": False}, False), ({"nonzero": "True"}, True)],
)
def test_a_bundles_normalize_intensity_is_read_with_monais_default_over_every_voxel(tmp_path, unet, arguments, nonzero):
    transform = {"_target_": "NormalizeIntensityd", "keys": "image", **arguments}
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, _spleen_like_with(transform))
    intensity = load_model(folder).card.intensity
    assert (intensity.mode, intensity.nonzero) == ("zscore", nonzero)
    _assert_intensity_as_monai_gives_it([transform], intensity)


def _spleen_like_with(*intensity: dict) -> dict:
    """SPLEEN_LIKE with other intensity transforms in place of its ScaleIntensityRanged."""
    transforms = [SPLEEN_LIKE["preprocessing"]["transforms"][0], *intensity]
    return {**SPLEEN_LIKE, "preprocessing": {"_target_": "Compose", "transforms": transforms}}


# A CT-like scan: air, the soft-tissue window and bone beyond it, and voxels exactly 0 (water) among them
CT_SCAN = torch.cat([torch.linspace(-1024.0, 1800.0, 990), torch.zeros(10)]).reshape(1, 10, 10, 10)


def _monai_intensity(transforms: list[dict], image: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """What MONAI's own transforms, built from a bundle config by MONAI's parser, make of the image."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({**(config or {}), "_intensity": {"_target_": "Compose", "transforms": transforms}})
    return parser.get_parsed_content("_intensity")({"image": image.clone()})["image"].as_tensor()


def _assert_intensity_as_monai_gives_it(transforms: list[dict], intensity, config: dict | None = None) -> None:
    from ASFDALib.data.preprocess import intensity_transform

    ours = intensity_transform(intensity)(CT_SCAN.clone()).as_tensor()
    assert torch.allclose(ours, _monai_intensity(transforms, CT_SCAN, config), atol=1e-5)


@pytest.mark.parametrize("clip", [None, True, False])
def test_a_bundles_ct_window_clips_only_where_it_says_so_as_in_monai(tmp_path, unet, clip):
    """MONAI's ScaleIntensityRange(d) clips only with clip true (its default is false): a bundle that leaves clip
    out gives the network bone and air beyond 0..1, and so does its card."""
    window = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1}
    transform = window if clip is None else {**window, "clip": clip}
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, _spleen_like_with(transform))
    card = load_model(folder).card
    assert (card.intensity.mode, card.intensity.a_min, card.intensity.a_max, card.intensity.clip) == (
        "ct",
        -57.0,
        164.0,
        bool(clip),
    )
    # unclipped it is no window: the map it is, (x - a_min) / (a_max - a_min)
    assert card.describe_input().endswith("CT window -57..164 HU to 0..1" if clip else ", (x + 57) / 221")
    _assert_intensity_as_monai_gives_it([transform], card.intensity)


@pytest.mark.parametrize(
    "transform, described",
    [
        # an MR bundle's fixed z-score by its training set's mean and standard deviation
        ({"_target_": "NormalizeIntensityd", "subtrahend": 310.5, "divisor": 120}, "(x - 310.5) / 120"),
        ({"_target_": "NormalizeIntensityd", "subtrahend": -20, "divisor": 250}, "(x + 20) / 250"),
        # a range to -1..1 centred on 0, unclipped
        (
            {"_target_": "ScaleIntensityRanged", "a_min": -500, "a_max": 500, "b_min": -1, "b_max": 1},
            "x / 500",
        ),
    ],
)
def test_a_bundles_fixed_subtrahend_and_divisor_is_described_as_the_map_it_is_not_as_a_ct_window(
    tmp_path, unet, transform, described
):
    """NormalizeIntensityd by a given subtrahend and divisor (MR bundles normalise so) is stored as an unclipped
    "ct" card; the Input line says the map, in no unit, where it said "CT window ... HU"."""
    transform = {**transform, "keys": "image"}
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, _spleen_like_with(transform))
    card = load_model(folder).card
    assert card.describe_input() == f"1.5 x 1.5 x 2 mm voxels, 32 x 32 x 32 windows, {described}"
    _assert_intensity_as_monai_gives_it([transform], card.intensity)


@pytest.mark.parametrize(
    "transform, expected",
    [
        # ScaleIntensityRangePercentilesd: clip false by default; relative narrows b_min..b_max to 1%..99% of it
        (
            {"_target_": "ScaleIntensityRangePercentilesd", "lower": 1, "upper": 99, "b_min": 0.0, "b_max": 1.0},
            {"mode": "percentile", "lower": 1.0, "upper": 99.0, "clip": False},
        ),
        (
            {
                "_target_": "ScaleIntensityRangePercentilesd",
                "lower": 1,
                "upper": 99,
                "b_min": 0,
                "b_max": 10,
                "clip": True,
                "relative": True,
            },
            {"mode": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.1, "b_max": 9.9},
        ),
        # ScaleIntensityd: each scan's min..max to minv..maxv (0..1 by default)
        ({"_target_": "ScaleIntensityd"}, {"mode": "percentile", "lower": 0.0, "upper": 100.0}),
        # NormalizeIntensityd with a fixed subtrahend and divisor: (x - 40) / 400, unclipped
        (
            {"_target_": "NormalizeIntensityd", "subtrahend": 40, "divisor": 400},
            {"mode": "ct", "a_min": 40.0, "a_max": 440.0, "clip": False},
        ),
        # ScaleIntensityRanged without b_min, b_max: MONAI leaves (x - a_min) / (a_max - a_min)
        (
            {"_target_": "ScaleIntensityRanged", "a_min": -100, "a_max": 300},
            {"mode": "ct", "a_min": -100.0, "a_max": 300.0, "clip": False},
        ),
    ],
)
def test_a_bundles_intensity_transform_becomes_the_card_setting_that_gives_what_monai_gives(
    tmp_path, unet, transform, expected
):
    from ASFDALib.models.card import IntensityConfig

    transform = {**transform, "keys": "image"}
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, _spleen_like_with(transform))
    intensity = load_model(folder).card.intensity
    assert intensity == IntensityConfig(**expected)
    _assert_intensity_as_monai_gives_it([transform], intensity)


def _zoo_preprocessing(*transforms: dict) -> dict:
    return {"_target_": "Compose", "transforms": list(transforms)}


ZOO_INFERER = {"_target_": "SlidingWindowInferer", "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5}
# Model-zoo bundles' own preprocessing (Project-MONAI/model-zoo, models/<name>/configs/inference.json), as written
MODEL_ZOO = {
    "spleen_ct_segmentation": {
        "image_key": "image",
        "preprocessing": _zoo_preprocessing(
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -57,
                "a_max": 164,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ),
        "inferer": ZOO_INFERER,
    },
    "prostate_mri_anatomy": {
        "preprocessing": _zoo_preprocessing(
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [0.5, 0.5, 0.5], "mode": "bilinear"},
            {"_target_": "ScaleIntensityd", "keys": "image", "minv": 0, "maxv": 1},
            {"_target_": "NormalizeIntensityd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image"},
        ),
        "inferer": ZOO_INFERER,
    },
    "wholeBody_ct_segmentation": {
        "image_key": "image",
        "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
        "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
        "preprocessing": _zoo_preprocessing(
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
            {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
            {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0},
        ),
        "inferer": {**ZOO_INFERER, "sw_batch_size": "@displayable_configs#sw_batch_size", "mode": "gaussian"},
    },
    "pediatric_abdominal_ct_segmentation": {
        "image_key": "image",
        "preprocessing": _zoo_preprocessing(
            {"_target_": "LoadImaged", "keys": "@image_key", "reader": "ITKReader"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": ["@image_key"], "pixdim": [1.5, 1.5, 3.0], "mode": ["bilinear"]},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -250,
                "a_max": 400,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "CropForegroundd", "keys": ["@image_key"], "source_key": "@image_key", "mode": ["minimum"]},
            {"_target_": "EnsureTyped", "keys": "image"},
            {"_target_": "CastToTyped", "keys": "@image_key", "dtype": "$torch.float32"},
        ),
        "inferer": ZOO_INFERER,
    },
}
ZOO_CARDS = {  # spacing, intensity and the card notes of what MONAI runs that the card cannot say
    "spleen_ct_segmentation": ((1.5, 1.5, 2.0), {"mode": "ct", "a_min": -57, "a_max": 164}, []),
    "prostate_mri_anatomy": ((0.5, 0.5, 0.5), {"mode": "zscore", "nonzero": False}, []),
    "wholeBody_ct_segmentation": (
        (1.5, 1.5, 1.5),
        {"mode": "percentile", "lower": 0, "upper": 100, "b_min": -1, "b_max": 1},
        [
            "configs/inference.json: NormalizeIntensityd leaves voxels exactly 0 at 0 before ScaleIntensityd, which "
            "the card's percentiles 0..100 of each volume to -1..1 cannot: the two differ where a scan has voxels "
            "exactly 0"
        ],
    ),
    "pediatric_abdominal_ct_segmentation": (
        (1.5, 1.5, 3.0),
        {"mode": "ct", "a_min": -250, "a_max": 400},
        [
            "configs/inference.json: CropForegroundd: MONAI runs the network on each scan's foreground box only, "
            "ASFDA on the whole scan"
        ],
    ),
}


@pytest.mark.parametrize("name", sorted(MODEL_ZOO))
def test_a_model_zoo_bundles_card_is_what_monai_runs_the_bundle_with(tmp_path, unet, name):
    """The zoo's own preprocessing blocks: the card gives the network the spacing, window and intensity MONAI gives
    it (MONAI's transforms, built by its parser from the same config, on the same CT values), and its card notes
    name what no card can say."""
    from ASFDALib.models.card import IntensityConfig

    sections = MODEL_ZOO[name]
    # pediatric_abdominal_ct_segmentation's metadata names its classes in label_def
    pred = {"label_def": {"0": "background", "1": "liver", "2": "spleen", "3": "pancreas"}}
    folder = _write_bundle(tmp_path / name, {"_target_": "UNet", **UNET_ARGS}, unet, sections, pred)
    model = load_model(folder, trust=True)  # wholeBody_ct_segmentation's pixdim is code MONAI evaluates
    spacing, intensity, notes = ZOO_CARDS[name]
    assert (model.card.spacing, model.card.roi_size) == (spacing, (96, 96, 96))
    assert model.card.intensity == IntensityConfig(**intensity)
    assert model.card.class_names == ["background", "liver", "spleen", "pancreas"]
    assert model.card_notes == notes
    from ASFDALib.data.preprocess import intensity_transform

    ours = intensity_transform(model.card.intensity)(CT_SCAN.clone()).as_tensor()
    intensity_steps = [t for t in sections["preprocessing"]["transforms"] if "Intensity" in t["_target_"]]
    monais = _monai_intensity(intensity_steps, CT_SCAN, sections)
    zero = CT_SCAN == 0  # where MONAI's z-score over the non-zero voxels leaves them, and the note says so
    exact = ~zero if notes and "exactly 0" in notes[0] else torch.ones_like(zero)
    assert torch.allclose(ours[exact], monais[exact], atol=1e-5)
    assert exact.all() or not torch.allclose(ours[~exact], monais[~exact], atol=1e-2)


def test_a_bundle_setting_in_code_is_read_only_with_trust_and_a_native_grid_is_refused(tmp_path, unet):
    """wholeBody_ct_segmentation's pixdim is a Python expression: MONAI evaluates it, ASFDA lets it only with
    --trust; wholeBrainSeg_Large_UNEST_segmentation resamples nothing (no Spacingd): no card spacing is its."""
    network = {"_target_": "UNet", **UNET_ARGS}
    folder = _write_bundle(tmp_path / "whole_body", network, unet, MODEL_ZOO["wholeBody_ct_segmentation"])
    with pytest.raises(
        TrustRequiredError,
        match=r"inference.json: preprocessing#transforms#4#pixdim is code \(\$\[1.5, 1.5, 1.5\] if "
        r"@displayable_configs#highres else .*only with --trust .*or give --card",
    ):
        load_model(folder)
    whole_brain = {
        "preprocessing": _zoo_preprocessing(
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": "True", "channel_wise": "True"},
            {"_target_": "EnsureTyped", "keys": "image"},
        ),
        "inferer": {**ZOO_INFERER, "overlap": 0.7},
    }
    folder = _write_bundle(tmp_path / "whole_brain", network, unet, whole_brain)
    with pytest.raises(ModelError, match=r"inference.json: no Spacingd on the image: .* give --card with the spacing"):
        load_model(folder, trust=True)


def test_what_no_card_can_say_is_in_the_models_card_notes_and_other_keys_transforms_are_not_the_images(tmp_path, unet):
    """A transform ASFDA does not run: named in the loaded model's card notes (rank's notes); the
    orientation is the card's axcodes; a label's transforms and a disabled one (MONAI's _disabled_) set nothing."""
    sections = {
        "skip_zscore": True,
        "preprocessing": _zoo_preprocessing(
            {"_target_": "LoadImaged", "keys": ["image", "label"]},
            {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "LPS"},
            {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [0.8], "mode": ["bilinear", "nearest"]},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -100,
                "a_max": 200,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "ScaleIntensityRanged", "keys": "label", "a_min": 0, "a_max": 3, "b_min": 0, "b_max": 1},
            {"_target_": "NormalizeIntensityd", "keys": "image", "_disabled_": "@skip_zscore"},
            {"_target_": "ThresholdIntensityd", "keys": "image", "threshold": -100, "above": True, "cval": -100},
        ),
        "inferer": ZOO_INFERER,
    }
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, sections)
    model = load_model(folder)
    assert model.card.spacing == (0.8, 0.8, 0.8)  # MONAI pads a short pixdim with its last value
    assert (model.card.intensity.mode, model.card.intensity.a_min, model.card.intensity.clip) == ("ct", -100.0, True)
    assert model.card.axcodes == "LPS"  # as MONAI orients its input: the network sees the order it trained on
    notes = [
        "configs/inference.json: ASFDA does not run ThresholdIntensityd on the image; where they change it, the "
        "network is given other input than MONAI gives it",
    ]
    assert model.card_notes == notes


@pytest.mark.parametrize(
    "then, expected",
    [
        # spleen_ct_segmentation's window, clipped to 0..1, then 0..1 to -1..1 unclipped: the window to -1..1, clipped
        (
            {"_target_": "ScaleIntensityRanged", "a_min": 0, "a_max": 1, "b_min": -1, "b_max": 1},
            {"mode": "ct", "a_min": -57, "a_max": 164, "b_min": -1, "b_max": 1},
        ),
        # a clip that changes nothing (the window's 0..1 is inside its 0..2), and a fixed subtrahend and divisor
        (
            {"_target_": "ScaleIntensityRanged", "a_min": 0, "a_max": 2, "b_min": 0, "b_max": 4, "clip": True},
            {"mode": "ct", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 2},
        ),
        (
            {"_target_": "NormalizeIntensityd", "subtrahend": 0.5, "divisor": 0.25},
            {"mode": "ct", "a_min": -57, "a_max": 164, "b_min": -2, "b_max": 2},
        ),
    ],
)
def test_a_fixed_map_after_a_window_is_the_window_to_another_range_as_monai_gives_it(tmp_path, unet, then, expected):
    """A clipped CT window then a fixed linear map (a second ScaleIntensityRanged, as bundles chain them) is one
    card setting: the window to the range the map moves 0..1 to (was refused as a chain no card reproduces)."""
    from ASFDALib.models.card import IntensityConfig

    window = {**SPLEEN_LIKE["preprocessing"]["transforms"][1]}
    chain = [window, {**then, "keys": "image"}]
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, _spleen_like_with(*chain))
    intensity = load_model(folder).card.intensity
    assert intensity == IntensityConfig(**expected)
    _assert_intensity_as_monai_gives_it(chain, intensity)


def test_a_fixed_map_whose_clip_cuts_the_window_is_refused(tmp_path, unet):
    """The second map clips inside the first's range (0.2..0.8 of 0..1): no one window gives that."""
    window = {**SPLEEN_LIKE["preprocessing"]["transforms"][1]}
    cut = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0.2, "a_max": 0.8, "b_min": 0, "b_max": 1}
    sections = _spleen_like_with(window, {**cut, "clip": True})
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, sections)
    with pytest.raises(
        ModelError, match=r"ScaleIntensityRanged \(preprocessing#transforms#2\) after ScaleIntensityRanged"
    ):
        load_model(folder)


def test_an_intensity_chain_no_card_setting_gives_is_refused_naming_the_config_and_card(tmp_path, unet):
    """A CT window clipped, then each scan's min..max: no one card setting gives that (unlike prostate_mri_anatomy's
    min..max then z-score, which is the z-score)."""
    window = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 200, "clip": True}
    sections = _spleen_like_with(window, {"_target_": "ScaleIntensityd", "keys": "image"})
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet, sections)
    with pytest.raises(
        ModelError,
        match=r"inference.json: ScaleIntensityd \(preprocessing#transforms#2\) after ScaleIntensityRanged, which no "
        "card intensity reproduces; give --card with the intensity",
    ):
        load_model(folder)


@pytest.mark.parametrize(
    "intensity, axcodes",
    [
        ({"mode": "ct", "a_min": -57, "a_max": 164, "clip": False}, "RAS"),
        ({"mode": "ct", "a_min": -57, "a_max": 164}, "LPS"),
        ({"mode": "percentile", "lower": 1, "upper": 99, "b_min": -1}, "RAS"),
        ({"mode": "zscore", "nonzero": False}, "RAS"),
        ({"mode": "zscore"}, "RAS"),
        ({"mode": "none"}, "RAS"),
    ],
)
def test_an_exported_bundle_read_without_its_card_gives_the_card_it_was_exported_with(
    tmp_path, unet, intensity, axcodes
):
    """The bundle ASFDA exports says in its own transforms what the card said: read back without asfda_card.json
    (a user who kept the configs only), the card is the same."""
    from ASFDALib.models.export import export_bundle

    card = ModelCard(
        CLASSES, spacing=(2, 1.5, 3), roi_size=(32, 32, 48), intensity=intensity, name="lab-unet", axcodes=axcodes
    )
    torch.save(unet.state_dict(), tmp_path / "net.pt")
    model = load_model(tmp_path / "net.pt", replace(card, network=NetworkSpec("UNet", UNET_ARGS)))
    folder = export_bundle(model, tmp_path / "bundle")
    (folder / "asfda_card.json").unlink()
    back = load_model(folder)
    assert (back.card.class_names, back.card.name, back.card.spacing, back.card.roi_size, back.card.intensity) == (
        CLASSES,
        "lab-unet",
        (2.0, 1.5, 3.0),
        (32, 32, 48),
        card.intensity,
    )
    assert back.card.axcodes == axcodes and back.card_notes == []


def test_an_unclipped_window_is_a_card_choice_kept_only_where_chosen(tmp_path):
    """``clip`` is stored only where it is false, so cards, model digests and cache keys written before it
    existed stay as they were."""
    clipped = ModelCard(class_names=["background", "liver"], intensity={"mode": "ct", "a_min": -57, "a_max": 164})
    unclipped = replace(clipped, intensity=replace(clipped.intensity, clip=False))
    assert "clip" not in clipped.to_dict()["intensity"] and "clip" not in clipped.preprocessing_key()
    assert unclipped.to_dict()["intensity"]["clip"] is False
    assert unclipped.preprocessing_key() != clipped.preprocessing_key()
    save_card(unclipped, tmp_path / "unclipped.card.json")
    assert load_card(tmp_path / "unclipped.card.json").intensity.clip is False
    with pytest.raises(ModelError, match="intensity clip false is a window's choice; mode 'zscore' has none"):
        ModelCard(class_names=["background", "liver"], intensity={"mode": "zscore", "clip": False})


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


def test_a_bundles_malformed_metadata_is_named_in_one_line(tmp_path, unet):
    folder = _write_bundle(tmp_path / "bundle", {"_target_": "UNet", **UNET_ARGS}, unet)
    (folder / "configs" / "metadata.json").write_text('{"name": "test bundle",')
    with pytest.raises(ModelError, match=r"metadata.json: cannot be read \(.*\); correct it, or give --card"):
        load_model(folder)
