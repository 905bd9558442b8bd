"""A researcher's published foundation-model checkpoint, end to end from the command line.

Each network (UNet with BatchNorm or InstanceNorm, SegResNet, SwinUNETR, DynUNet with deep supervision) is
pre-trained for 14 classes (random weights here) and saved in a published layout; the target task has 4 classes.
``asfda rank`` gets the file, ``--network`` with the published arguments and a card, and every later command
(``labels import``, ``finetune``, ``predict``, ``export``, a re-rank) gets only the session.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ASFDALib.adaptation.pipeline import session_model
from ASFDALib.adaptation.recipe import FinetuneConfig
from ASFDALib.adaptation.rounds import NEW_HEAD_NOTE, ranking_model
from ASFDALib.adaptation.session import Session
from ASFDALib.adaptation.trainer import param_groups
from ASFDALib.app.cli import main
from ASFDALib.bench.phantoms import CLASS_NAMES
from ASFDALib.errors import ModelError, TrustRequiredError
from ASFDALib.models.card import NetworkSpec
from ASFDALib.models.loading import build_network, load_model, load_weights

SOURCE_CLASSES = [
    "background",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
]
CLASS_MAP = "kidney=right kidney"  # background, liver and gallbladder pair by name
MAPPED = {0: 0, 1: 6, 2: 2, 3: 4}  # target index <- source index: the name pairs plus CLASS_MAP's

# The published networks' constructor arguments, 14 output classes as they were pre-trained.
NETWORKS = {
    "unet-batch": (
        "UNet",
        dict(spatial_dims=3, in_channels=1, out_channels=14, channels=[8, 16, 32], strides=[2, 2], num_res_units=1),
    ),
    "unet-instance": (
        "UNet",
        dict(
            spatial_dims=3,
            in_channels=1,
            out_channels=14,
            channels=[8, 16, 32],
            strides=[2, 2],
            num_res_units=0,
            norm="instance",
        ),
    ),
    "segresnet": (
        "SegResNet",
        dict(spatial_dims=3, init_filters=8, in_channels=1, out_channels=14, blocks_down=[1, 1, 1], blocks_up=[1, 1]),
    ),
    "swinunetr": ("SwinUNETR", dict(in_channels=1, out_channels=14, feature_size=12, depths=[1, 1, 1, 1])),
    "dynunet": (
        "DynUNet",
        dict(
            spatial_dims=3,
            in_channels=1,
            out_channels=14,
            kernel_size=[3, 3, 3],
            strides=[1, 2, 2],
            upsample_kernel_size=[2, 2],
            filters=[8, 16, 32],
            norm_name="instance",
            deep_supervision=True,
            deep_supr_num=1,
        ),
    ),
}


class Universal(torch.nn.Module):
    """SuPreM's pre-training wrapper: the network as ``backbone`` beside its own text-driven head."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.controller = torch.nn.Conv3d(8, 8, 1)


class SSLHead(torch.nn.Module):
    """MONAI's Swin self-supervised pre-training model: the encoder as ``swin_vit`` and a pretext head."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.swin_vit = encoder
        self.rotation_head = torch.nn.Linear(16, 4)


# How each network's checkpoint is published (facts from the public loaders; see ASFDALib/checkpoints.py).
LAYOUTS = {
    "unet-batch": lambda net: {"net": torch.nn.DataParallel(Universal(net)).state_dict(), "epoch": 10},  # SuPreM
    "unet-instance": lambda net: {"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}},  # Lightning
    "segresnet": lambda net: {"model_state_dict": {f"_orig_mod.{k}": v for k, v in net.state_dict().items()}},
    "swinunetr": lambda net: {"net": torch.nn.DataParallel(Universal(net)).state_dict()},  # SuPreM
    "dynunet": lambda net: {"network_weights": net.state_dict(), "optimizer_state": {}, "current_epoch": 5},  # nnU-Net
}


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Three tiny MRI-like phantoms with labels, and cards for a 4-class task, with the checkpoint's
    ``source_classes`` (card*.json) and without (plain*.json): 32^3 windows at 4 mm, and for SwinUNETR
    32 x 32 x 64 windows at 5 x 5 x 2 mm (its InstanceNorm bottleneck at 1/32 of the window needs more than one
    voxel; one window covers a phantom)."""
    from ASFDALib.bench.phantoms import write_phantoms

    folder = tmp_path_factory.mktemp("fm_pool")
    write_phantoms(folder, 3, "mri", seed=11)
    for kind, spacing, roi in (("", [4, 4, 4], [32, 32, 32]), ("-swin", [5, 5, 2], [32, 32, 64])):
        card = {"name": "abdomen", "class_names": CLASS_NAMES, "spacing": spacing, "roi_size": roi}
        (folder / f"card{kind}.json").write_text(json.dumps({**card, "source_classes": SOURCE_CLASSES}))
        (folder / f"plain{kind}.json").write_text(json.dumps(card))
    return folder


def _publish(key: str, folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A pre-trained 14-class network saved as its authors publish it; its own state dict to compare with."""
    name, args = NETWORKS[key]
    torch.manual_seed(1)
    net = build_network(NetworkSpec(name, args))
    path = folder / f"{key}.pth"
    torch.save(LAYOUTS[key](net), path)
    return path, {k: v.clone() for k, v in net.state_dict().items()}


def _rank_args(model: Path, key: str, pool: Path, session: Path, card: str = "card") -> list[str]:
    name, args = NETWORKS[key]
    card_path = pool / f"{card}{'-swin' if key == 'swinunetr' else ''}.json"
    return [
        "rank",
        *("--model", str(model), "--network", name, "--network-args", json.dumps(args)),
        *("--card", str(card_path), "--images", str(pool / "images"), "--out", str(session), "--budget", "1"),
    ]


def _finetune(session: Path) -> list[str]:
    return ["finetune", str(session), "--iterations", "1", "--no-pseudo", "--batch-size", "1", "--checkpoint-every=1"]


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def _assert_rows_copied(own: dict, source: dict, names: list[str], pairs: dict[int, int]) -> None:
    """Every class-indexed dimension of the head's tensors holds the checkpoint's rows for the mapped classes."""
    t = torch.tensor(sorted(pairs))
    s = torch.tensor([pairs[i] for i in sorted(pairs)])
    checked = 0
    for name in names:
        if name.endswith("num_batches_tracked") or name not in source:
            continue
        a, b = own[name], source[name]
        dims = [d for d in range(min(2, a.dim())) if a.shape[d] == 4 and b.shape[d] == 14]
        for d in dims:
            a, b = a.index_select(d, t), b.index_select(d, s)
        if dims:
            assert torch.equal(a, b), name
            checked += 1
    assert checked, "no class-indexed tensor in the head"


@pytest.mark.parametrize("key", list(NETWORKS))
def test_a_published_checkpoint_with_another_label_set_runs_every_command(key, pool, tmp_path, capsys):
    model_path, source = _publish(key, tmp_path)
    session = tmp_path / "session"

    assert main([*_rank_args(model_path, key, pool, session), "--class-map", CLASS_MAP]) == 0
    out = capsys.readouterr().out
    assert "output head re-initialised for 4 classes (checkpoint has 14)" in out
    copied = "background<-background, liver<-liver, kidney<-right kidney, gallbladder<-gallbladder"
    assert f"pre-trained rows copied for classes {copied}" in out
    assert "newly initialised (the head's " in " ".join(out.split())  # the head's tensors, rows copied in
    assert NEW_HEAD_NOTE not in out  # liver and kidney keep what the head knew: ASD ranks from round 1

    recorded = json.loads((session / "session.json").read_text())["model"]
    report = recorded["load_report"]
    assert report["head_reinitialised"] and report["source_classes"] == 14
    assert report["mapped_classes"] == {str(t): s for t, s in MAPPED.items()}
    assert report["head"] and set(report["head"]) <= set(report["new"])  # the head is named as newly made
    assert recorded["network"] == {"name": NETWORKS[key][0], "args": {**NETWORKS[key][1], "out_channels": 4}}
    assert recorded["class_map"] == CLASS_MAP
    ranking = json.loads((session / "ranking.json").read_text())
    assert ranking["model_load"]["head"] == report["head"] and ranking["alpha"] == 0.5 and ranking["notes"] == []

    # The session alone rebuilds the same model: same report, checkpoint tensors bitwise, mapped rows copied.
    base = session_model(Session.open(session), adapted=False)
    assert base.load_report.to_dict() == report
    own = base.network.state_dict()
    assert all(_bits(own[n]) == _bits(source[n]) for n in report["loaded"])
    _assert_rows_copied(own, source, report["head"], MAPPED)
    # New head tensors train at the full rate, checkpoint tensors at the pre-trained rate.
    groups = {g["name"]: g for g in param_groups(base.network, FinetuneConfig(lr=1e-3), base.load_report)}
    head_params = {id(p) for n, p in base.network.named_parameters() if n in report["head"]}
    assert head_params <= {id(p) for p in groups["full"]["params"]}
    assert groups["pretrained"]["lr"] == pytest.approx(1e-3 * FinetuneConfig().encoder_lr_scale)

    assert main(["labels", "import", str(session), "--from", str(pool / "labels")]) == 0
    assert main(_finetune(session)) == 0
    pred = tmp_path / "pred"
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(pred)]) == 0
    labels = [np.asarray(nib.load(p).dataobj) for p in sorted(pred.glob("*.nii.gz"))]
    assert len(labels) == 3 and all(set(np.unique(lab)) <= {0, 1, 2, 3} for lab in labels)
    assert main(["export", str(session), "--format", "bundle", "--out", str(tmp_path / "bundle")]) == 0

    # The bundle holds the adapted 4-class head: it loads with its head kept and predicts as the session does.
    exported = load_model(tmp_path / "bundle")
    adapted = session_model(Session.open(session), adapted=True)
    assert not exported.load_report.head_reinitialised and exported.card.class_names == CLASS_NAMES
    x = torch.randn(1, 1, *exported.card.roi_size)
    with torch.no_grad():
        assert torch.allclose(exported.network.eval()(x), adapted.network.eval()(x), atol=1e-5)


def test_a_published_checkpoint_with_another_label_set_is_benchmarked_as_rank_reads_it(pool, tmp_path, capsys):
    """A researcher's check before a clinician's time is spent: the 14-class state dict, its network named by
    --network and the target's classes paired by --class-map, benchmarked on labelled folders; every row starts
    from the model rank would load, and the class map is part of the protocol, so a resume under another is
    refused."""
    import shutil

    from ASFDALib.bench.benchmark import evaluate_cases, load_cases
    from ASFDALib.models.loading import ModelSource

    model_path, _ = _publish("unet-instance", tmp_path)
    scans = sorted(p.name for p in (pool / "images").iterdir())
    for folder, names in (("pool", scans[:2]), ("test", scans[2:])):
        for sub in ("images", "labels"):
            (tmp_path / folder / sub).mkdir(parents=True)
            for name in names:
                shutil.copy(pool / sub / name, tmp_path / folder / sub / name)
    name, args = NETWORKS["unet-instance"]
    out = tmp_path / "bench"
    argv = [
        "benchmark", "--model", str(model_path), "--card", str(pool / "card.json"), "--network", name,
        "--network-args", json.dumps(args), "--pool", str(tmp_path / "pool"), "--test", str(tmp_path / "test"),
        "--budgets", "1", "--seeds", "0,", "--rows", "source,random", "--iterations", "1", "--device", "cpu",
        "--out", str(out),
    ]  # fmt: skip
    assert main([*argv, "--class-map", CLASS_MAP]) == 0
    copied = "background<-background, liver<-liver, kidney<-right kidney, gallbladder<-gallbladder"
    assert f"pre-trained rows copied for classes {copied}" in " ".join(capsys.readouterr().out.split())
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["class_map"] == CLASS_MAP and results["class_names"] == CLASS_NAMES
    assert results["protocol"]["network"] == {"name": name, "args": args} and copied in results["weights"]
    # the source row is the model as rank loads it with these options: the mapped rows, scored on the test set
    mapped = ModelSource(model_path, pool / "card.json", NetworkSpec(name, args), class_map=CLASS_MAP).load()
    cases = evaluate_cases(mapped, mapped.network, load_cases(tmp_path / "test", mapped.card), "cpu")
    source = next(r for r in results["runs"] if r["row"] == "source")
    assert list(source["cases"]) == list(cases)
    assert all(source["cases"][k] == pytest.approx(list(v), nan_ok=True) for k, v in cases.items())
    capsys.readouterr()
    assert main(argv) == 1  # the same runs under the card's name pairs alone would be other runs
    err = " ".join(capsys.readouterr().err.split())
    assert f"its runs were made with other class_map ({CLASS_MAP} here, the default now: give it again)" in err
    # another spelling of the same pairs resumes them; another network (a dropout) does not
    assert main([*argv, "--class-map", "Liver=liver, kidney = right kidney"]) == 0
    assert "resuming: 2 of 2 runs" in capsys.readouterr().out
    other = argv[: argv.index("--network-args") + 1] + [json.dumps({**args, "dropout": 0.5})]
    assert main([*other, *argv[argv.index("--network-args") + 2 :], "--class-map", CLASS_MAP]) == 1
    assert "its runs were made with other network" in " ".join(capsys.readouterr().err.split())
    # a report reads the class names from results.json: no card or network options needed
    report = [a for a in argv if a not in (name, json.dumps(args), "--network", "--network-args", "--card")]
    report.remove(str(pool / "card.json"))
    assert main([*report, "--report-only"]) == 0


def test_an_encoder_only_checkpoint_ranks_by_dkd_alone_until_the_first_finetune(pool, tmp_path, capsys):
    name, args = NETWORKS["swinunetr"]
    torch.manual_seed(2)
    pretrained = build_network(NetworkSpec(name, args))
    ssl = torch.nn.DataParallel(SSLHead(pretrained.swinViT)).state_dict()
    model_path = tmp_path / "ssl_swin.pt"
    torch.save({"state_dict": ssl, "epoch": 100}, model_path)
    session = tmp_path / "session"

    assert main(_rank_args(model_path, "swinunetr", pool, session, "plain")) == 0
    out = capsys.readouterr().out
    assert "encoder-only checkpoint into 'swinViT'; decoder and head newly initialised" in out
    assert NEW_HEAD_NOTE in out
    assert "DKD is its diversity term alone" in " ".join(out.split())  # a new head's energy knows nothing
    first = json.loads((session / "ranking.json").read_text())
    assert first["alpha"] == 1.0 and first["notes"] == [NEW_HEAD_NOTE] and first["model_load"]["encoder_only"]
    assert first["knowledge"] == "none"
    recorded = json.loads((session / "session.json").read_text())
    assert recorded["rounds"][0]["strategy"]["alpha"] == 1.0
    # The decoder is new and trains at the full rate; the encoder came from the checkpoint.
    base = session_model(Session.open(session), adapted=False)
    groups = {g["name"]: g for g in param_groups(base.network, FinetuneConfig(lr=1e-3), base.load_report)}
    encoder = {id(p) for p in base.network.swinViT.parameters()}
    assert {id(p) for p in groups["pretrained"]["params"]} == encoder
    assert not encoder & {id(p) for p in groups["full"]["params"]}

    assert main(["labels", "import", str(session), "--from", str(pool / "labels")]) == 0
    assert main(_finetune(session)) == 0
    capsys.readouterr()
    assert main(["rank", "--out", str(session), "--budget", "1"]) == 0  # round 2: only the session
    assert NEW_HEAD_NOTE not in capsys.readouterr().out
    second = json.loads((session / "ranking.json").read_text())
    assert second["alpha"] == 0.5 and second["notes"] == [] and second["strategy"] == "asfda"
    assert second["knowledge"] == "none"  # still the pre-trained model's knowledge: ASD joined, not a gap
    energy = ["rank", "--out", str(session), "--knowledge", "energy"]
    assert main(energy) == 1
    assert "its energy measures nothing the model learnt" in " ".join(capsys.readouterr().err.split())
    rounds = json.loads((session / "session.json").read_text())["rounds"]
    assert [r["strategy"]["alpha"] for r in rounds] == [1.0, 0.5]


def test_a_tensor_that_does_not_fit_is_refused_by_name(pool, tmp_path, capsys):
    model_path, source = _publish("segresnet", tmp_path)
    ckpt = torch.load(model_path, weights_only=True)
    ckpt["model_state_dict"]["_orig_mod.convInit.conv.weight"] = torch.zeros(8, 1, 1, 3, 3)  # a 2-D stem
    torch.save(ckpt, model_path)
    session = tmp_path / "session"
    assert main(_rank_args(model_path, "segresnet", pool, session)) == 1
    err = capsys.readouterr().err
    assert "convInit.conv.weight (checkpoint (8, 1, 1, 3, 3), network (8, 1, 3, 3, 3))" in err
    assert f"{model_path}: tensors of the network (outside the output head) do not load" in err


def test_a_class_map_without_source_classes_in_the_card_is_refused(pool, tmp_path, capsys):
    model_path, _ = _publish("unet-instance", tmp_path)
    args = [*_rank_args(model_path, "unet-instance", pool, tmp_path / "s", "plain"), "--class-map", CLASS_MAP]
    assert main(args) == 1
    assert "add 'source_classes' to the card" in capsys.readouterr().err


def test_round_one_ranks_by_dkd_alone_whenever_no_foreground_class_keeps_its_head_rows(pool, tmp_path):
    from ASFDALib.adaptation.rounds import NEW_HEAD_ASD_NOTE, round_config
    from ASFDALib.query.ranking import RankConfig

    model_path, _ = _publish("unet-instance", tmp_path)
    spec = NetworkSpec(*NETWORKS["unet-instance"])

    def load(card: str, class_map: str | None = None):
        return load_model(model_path, pool / f"{card}.json", spec, class_map=class_map)

    by_name = load("card")  # no --class-map: classes with the same name keep their rows
    assert by_name.load_report.mapped_classes == {0: 0, 1: 6, 3: 4} and not by_name.head_is_new
    assert load("card", CLASS_MAP).load_report.mapped_classes == MAPPED
    assert load("card", "liver=,gallbladder=").head_is_new  # background alone segments nothing
    unmapped = load("plain")
    assert unmapped.load_report.head_reinitialised and unmapped.head_is_new

    session = Session.open(tmp_path / "s", create=True)
    assert round_config(session, unmapped, RankConfig(alpha=0.3)) == (RankConfig(alpha=1.0), [NEW_HEAD_NOTE])
    assert round_config(session, unmapped, RankConfig(strategy="asd")) == (
        RankConfig(strategy="asd"),
        [NEW_HEAD_ASD_NOTE],
    )
    assert round_config(session, unmapped, RankConfig(strategy="dkd")) == (RankConfig(strategy="dkd"), [])
    assert round_config(session, by_name, RankConfig(alpha=0.3)) == (RankConfig(alpha=0.3), [])


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Hugging Face's safetensors layout, written by hand: u64 header length, JSON header, raw little-endian data."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, tensor in tensors.items():
        blob = tensor.contiguous().numpy().tobytes()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def test_a_safetensors_file_loads_as_its_state_dict_without_trust(pool, tmp_path):
    _, source = _publish("unet-instance", tmp_path)
    (tmp_path / "model.safetensors").write_bytes(_safetensors(source))
    model = load_model(tmp_path / "model.safetensors", pool / "card.json", NetworkSpec(*NETWORKS["unet-instance"]))
    own = model.network.state_dict()
    body = [k for k in source if not k.startswith("model.2")]  # the output block is the 4-class head now
    assert body and all(torch.equal(own[k], source[k]) for k in body)
    (tmp_path / "cut.safetensors").write_bytes(_safetensors(source)[:-100])
    with pytest.raises(ModelError, match="cut.safetensors: cannot read it as safetensors .*damaged or incomplete"):
        load_model(tmp_path / "cut.safetensors", pool / "card.json", NetworkSpec(*NETWORKS["unet-instance"]))


def test_numpy_values_of_a_training_log_load_without_trust(pool, tmp_path):
    """nnU-Net's and Lightning's checkpoints keep numpy scalars and arrays beside the weights: data, no code."""
    path, source = _publish("unet-instance", tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["logging"] = {"mean_fg_dice": [np.float64(0.5)], "ema": np.float32(0.4), "curve": np.arange(3.0)}
    torch.save(ckpt, path)
    model = load_model(path, pool / "card.json", NetworkSpec(*NETWORKS["unet-instance"]))
    assert model.load_report.loaded


def test_numpy_values_pickled_under_numpy_1_load_without_trust_too(pool, tmp_path):
    """Checkpoints saved before numpy 2 (most published ones) name numpy.core, not numpy._core."""
    import zipfile

    path, _ = _publish("unet-instance", tmp_path)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "_best_ema": np.float64(0.8), "curve": np.arange(3.0)}, tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as new, zipfile.ZipFile(tmp_path / "old.pth", "w") as old:
        for name in new.namelist():
            data = new.read(name)
            old.writestr(name, data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in zipfile.ZipFile(tmp_path / "old.pth").read("new/data.pkl")
    assert load_model(tmp_path / "old.pth", pool / "card.json", NetworkSpec(*NETWORKS["unet-instance"])).load_report


def test_a_safetensors_tensor_of_a_type_not_read_is_named_not_called_damaged(pool, tmp_path):
    body = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "fp8.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + b"\0\0")
    with pytest.raises(ModelError, match="tensor w is of safetensors dtype F8_E4M3, which ASFDA does not read"):
        load_model(tmp_path / "fp8.safetensors", pool / "card.json", NetworkSpec(*NETWORKS["unet-instance"]))


class TrainConfig:  # a training script's own class, pickled into its checkpoint
    lr = 1e-3


def test_a_cut_short_checkpoint_is_called_damaged_and_code_in_one_names_what_it_holds(pool, tmp_path, capsys):
    path, _ = _publish("unet-instance", tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])  # a download cut short
    spec = NetworkSpec(*NETWORKS["unet-instance"])
    with pytest.raises(
        ModelError, match="cut.pth: cannot read weights .*damaged or incomplete: download or save"
    ) as cut:
        load_model(tmp_path / "cut.pth", pool / "card.json", spec)
    assert not isinstance(cut.value, TrustRequiredError) and "--trust" not in str(cut.value)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "config": TrainConfig()}, tmp_path / "config.pth")
    with pytest.raises(TrustRequiredError, match=r"\(it holds test_foundation_models.TrainConfig\)"):
        load_model(tmp_path / "config.pth", pool / "card.json", spec)
    assert load_model(tmp_path / "config.pth", pool / "card.json", spec, trust=True).load_report.loaded
    # where the training code is not importable, trust cannot help: say where to re-save
    (tmp_path / "lab_training_code.py").write_text("class RunConfig:\n    lr = 1e-3\n")
    sys.path.insert(0, str(tmp_path))
    try:
        torch.save({**ckpt, "config": importlib.import_module("lab_training_code").RunConfig()}, tmp_path / "x.pth")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("lab_training_code")
    (tmp_path / "lab_training_code.py").unlink()
    (tmp_path / "x.pth").rename(tmp_path / "elsewhere.pth")
    with pytest.raises(ModelError, match="holds objects of its training code; re-save its state dict where that code"):
        load_model(tmp_path / "elsewhere.pth", pool / "card.json", spec, trust=True)


# An nnU-Net v2 training output as nnU-Net writes one: anisotropic strides and a transpose_forward, so a wrong axis
# order or a misplaced kernel shows; CT normalisation from the dataset's foreground intensities.
NNUNET_ARCH = {
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 64],
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 4,
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 1]],
    "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2],
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
NNUNET_LABELS = {"background": 0, "liver": 1, "right kidney": 2, "gallbladder": 3, "spleen": 4}
# nnU-Net's residual-encoder presets (nnUNetResEncUNet{M,L,XL}Plans) as their plans word them, smaller: blocks per
# encoder stage, one convolution per decoder stage; kernels that differ by stage and axis (anisotropic data)
RESENC_ARCH = {k: v for k, v in NNUNET_ARCH.items() if k != "n_conv_per_stage"} | {
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 1, 3], [3, 3, 3]],
    "n_blocks_per_stage": [1, 2, 2, 2],
    "n_conv_per_stage_decoder": [1, 1, 1],
}


def _nnunet_output(
    root: Path, arch: dict | None = None, network: str = "PlainConvUNet", configuration: dict | None = None
) -> tuple[Path, torch.nn.Module]:
    """fold_0/checkpoint_final.pth with plans.json and dataset.json above it, and the network it holds: nnU-Net's
    PlainConvUNet, or its ResidualEncoderUNet of ``arch``'s stages, blocks, kernels, biases and stem (the plans
    say ``network``; any other name gets a PlainConvUNet, which the plans' name refuses first)."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet", reason="make install installs it")
    arch = arch or NNUNET_ARCH
    torch.manual_seed(3)
    common = {
        "norm_op": torch.nn.InstanceNorm3d,
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": torch.nn.LeakyReLU,
        "nonlin_kwargs": {"inplace": True},
        "deep_supervision": False,
    }
    shape = (1, 4, arch["features_per_stage"], torch.nn.Conv3d, arch["kernel_sizes"], arch["strides"])
    if network == "ResidualEncoderUNet":
        blocks, decoder = arch["n_blocks_per_stage"], arch["n_conv_per_stage_decoder"]
        net = unet.ResidualEncoderUNet(
            *shape,
            blocks,
            len(NNUNET_LABELS),
            decoder,
            arch["conv_bias"],
            stem_channels=arch.get("stem_channels"),
            **common,
        )
    else:
        net = unet.PlainConvUNet(*shape, 2, len(NNUNET_LABELS), 2, conv_bias=True, **common)
    for module in net.modules():  # trained-looking affine norms and biases, so a wrong mapping shows
        if isinstance(module, torch.nn.InstanceNorm3d):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
        elif isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and module.bias is not None:
            torch.nn.init.normal_(module.bias, 0.0, 0.5)
    plans = {
        "dataset_name": "Dataset017_Abdomen",
        "plans_name": "nnUNetPlans",
        "transpose_forward": [2, 0, 1],  # a 3-cycle: not its own inverse, so forward and backward differ
        "transpose_backward": [1, 2, 0],
        "foreground_intensity_properties_per_channel": {
            "0": {"percentile_00_5": -200.0, "percentile_99_5": 300.0, "mean": 50.0, "std": 100.0}
        },
        "configurations": {
            "3d_fullres": {
                "patch_size": [32, 16, 32],
                "spacing": [4.0, 5.0, 4.0],
                "normalization_schemes": ["CTNormalization"],
                "architecture": {
                    "network_class_name": f"dynamic_network_architectures.architectures.unet.{network}",
                    "arch_kwargs": arch,
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                **(configuration or {}),
            }
        },
    }
    dataset = {"channel_names": {"0": "CT"}, "labels": NNUNET_LABELS, "numTraining": 40, "file_ending": ".nii.gz"}
    fold = root / "Dataset017_Abdomen" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold.parent / "plans.json").write_text(json.dumps(plans))
    (fold.parent / "dataset.json").write_text(json.dumps(dataset))
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": {},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.81)], "ema_fg_dice": [np.float64(0.8)]},
        "_best_ema": np.float64(0.8),
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": dataset,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, fold / "checkpoint_final.pth")
    return fold / "checkpoint_final.pth", net.eval()


def test_an_nnunet_training_output_loads_as_a_dynunet_computing_what_nnunets_own_network_computes(tmp_path):
    path, plain = _nnunet_output(tmp_path)
    model = load_model(path)  # no card, no --network: the plans and dataset.json say both
    card = model.card
    assert card.class_names == list(NNUNET_LABELS) and card.source_classes == list(NNUNET_LABELS)
    # nnU-Net's array is the file's (S, A, R), permuted by transpose_forward [2, 0, 1] to (R, S, A): RAS order back
    assert card.spacing == (4.0, 4.0, 5.0) and card.roi_size == (32, 32, 16)
    assert (card.intensity.mode, card.intensity.a_min, card.intensity.a_max) == ("ct", -200.0, 300.0)
    assert (card.intensity.b_min, card.intensity.b_max) == (-2.5, 2.5)  # clip, then z-score with mean 50, std 100
    assert model.spec.name == "DynUNet" and "PlainConvUNet to MONAI's DynUNet" in model.load_report.summary
    torch.manual_seed(0)
    sar = torch.randn(1, 1, 16, 32, 32)  # a RAS-stored image as nnU-Net reads it: (S, A, R)
    with torch.no_grad():
        theirs = plain(sar.permute(0, 1, 4, 2, 3))  # transpose_forward [2, 0, 1]: (R, S, A)
        ours = model.network(sar.permute(0, 1, 4, 3, 2))  # ASFDA's (R, A, S)
    theirs = theirs.permute(0, 1, 2, 4, 3)  # (R, S, A) -> (R, A, S)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_an_nnunet_model_adapts_to_a_target_task_through_every_command(pool, tmp_path, capsys):
    path, _ = _nnunet_output(tmp_path)
    session = tmp_path / "session"
    args = ["rank", "--model", str(path), "--card", str(pool / "plain.json"), "--images", str(pool / "images")]
    assert main([*args, "--out", str(session), "--budget", "1", "--class-map", "kidney=right kidney"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "liver<-liver, kidney<-right kidney, gallbladder<-gallbladder" in said
    first = json.loads((session / "ranking.json").read_text())
    query = first["selected"]
    assert first["weights"]["model"] == "source"
    (tmp_path / "gt").mkdir()
    (tmp_path / "gt" / query[0]).write_bytes((pool / "labels" / query[0]).read_bytes())
    assert main(["labels", "import", str(session), "--from", str(tmp_path / "gt")]) == 0
    assert main(_finetune(session)) == 0
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(tmp_path / "maps")]) == 0
    assert main(["rank", "--out", str(session)]) == 0  # the session rebuilds the converted model by itself
    weights = json.loads((session / "ranking.json").read_text())["weights"]  # round 2 ranked with round 1's model
    assert (weights["model"], weights["round"], weights["checkpoint"]) == ("adapted", 1, "checkpoints/round1/final.pt")
    recorded = json.loads((session / "session.json").read_text())["model"]
    assert recorded["network"]["name"] == "DynUNet" and recorded["card"]["source_classes"] == list(NNUNET_LABELS)


@pytest.mark.parametrize(
    ("network", "arch", "encoder"),
    [("PlainConvUNet", NNUNET_ARCH, "n_conv_per_stage"), ("ResidualEncoderUNet", RESENC_ARCH, "n_blocks_per_stage")],
)
def test_the_first_nnunet_v2_plans_format_describes_the_same_network(network, arch, encoder):
    """nnU-Net before 2.4 wrote the architecture as UNet_* keys (a residual encoder's blocks per stage as
    n_conv_per_stage_encoder); TotalSegmentator's older models carry them."""
    from ASFDALib.models.nnunet import plans_architecture

    old = {
        "UNet_class_name": network,
        "UNet_base_num_features": 8,
        "unet_max_num_features": 64,
        "conv_kernel_sizes": arch["kernel_sizes"],
        "pool_op_kernel_sizes": arch["strides"],
        "n_conv_per_stage_encoder": arch[encoder],
        "n_conv_per_stage_decoder": arch["n_conv_per_stage_decoder"],
    }
    new = {"architecture": {"network_class_name": f"x.{network}", "arch_kwargs": arch}}
    assert plans_architecture(old, Path("plans.json")) == plans_architecture(new, Path("plans.json")) | {
        "norm": "InstanceNorm",
        "nonlin": "LeakyReLU",
    }


def test_an_nnunet_network_no_model_here_rebuilds_is_refused_in_one_line_leaving_no_session(pool, tmp_path, capsys):
    """nnU-Net's ResidualUNet (residual decoder too) is neither of the networks a model here is built as."""
    path, _ = _nnunet_output(tmp_path, network="ResidualUNet")
    args = ["rank", "--model", str(path), "--images", str(pool / "images"), "--out", str(tmp_path / "s")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "plans.json: this nnU-Net model cannot be built here: its network is ResidualUNet" in err
    assert "(nnU-Net's PlainConvUNet and ResidualEncoderUNet models load); trace it to TorchScript" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "variant",
    [
        {},  # the presets' own: conv_bias, nnU-Net's stem of the first stage's width
        # nnU-Net takes one number for every decoder stage too
        {"kernel_sizes": [[3, 3, 3]] * 4, "conv_bias": False, "stem_channels": 6, "n_conv_per_stage_decoder": 2},
    ],
    ids=["anisotropic-kernels", "bias-free-own-stem-one-count"],
)
def test_an_nnunet_residual_encoder_loads_computing_what_nnunets_own_network_computes(tmp_path, variant):
    path, resenc = _nnunet_output(tmp_path, RESENC_ARCH | variant, network="ResidualEncoderUNet")
    model = load_model(path)  # no card, no --network: the plans and dataset.json say both
    assert model.card.class_names == list(NNUNET_LABELS) and model.card.roi_size == (32, 32, 16)
    assert type(model.network).__module__ == "ASFDALib.models.resenc"  # not nnU-Net's package
    assert model.spec.name == "ResidualEncoderUNet" and "ResidualEncoderUNet to ASFDA's" in model.load_report.summary
    kernels = (RESENC_ARCH | variant)["kernel_sizes"]  # nnU-Net's (R, S, A) order -> ASFDA's (R, A, S)
    assert model.spec.args["kernel_sizes"] == [[k[0], k[2], k[1]] for k in kernels]
    assert model.spec.args["strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 1, 2]]
    assert not model.load_report.new and len(model.load_report.loaded) == len(model.network.state_dict())
    torch.manual_seed(0)
    sar = torch.randn(1, 1, 16, 32, 32)  # a RAS-stored image as nnU-Net reads it: (S, A, R)
    with torch.no_grad():
        theirs = resenc(sar.permute(0, 1, 4, 2, 3)).permute(0, 1, 2, 4, 3)  # (R, S, A) -> (R, A, S)
        ours = model.network(sar.permute(0, 1, 4, 3, 2))  # ASFDA's (R, A, S)
    assert ours.shape == (1, len(NNUNET_LABELS), 32, 32, 16)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert theirs.std() > 0.1  # trained-looking norms and biases: a wrong kernel order or skip would show


@pytest.fixture(scope="module")
def resenc_session(pool, tmp_path_factory) -> tuple[Path, str]:
    """A session on an nnU-Net residual-encoder model, fine-tuned on one label; what its rank printed."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("resenc")
    path, _ = _nnunet_output(root, RESENC_ARCH, network="ResidualEncoderUNet")
    session = root / "session"
    args = ["rank", "--model", str(path), "--card", str(pool / "plain.json"), "--images", str(pool / "images")]
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert main([*args, "--out", str(session), "--budget", "1", "--class-map", "kidney=right kidney"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    (root / "gt").mkdir()
    (root / "gt" / query[0]).write_bytes((pool / "labels" / query[0]).read_bytes())
    assert main(["labels", "import", str(session), "--from", str(root / "gt")]) == 0
    assert main(_finetune(session)) == 0
    return session, said.getvalue()


def test_an_nnunet_residual_encoder_model_ranks_fine_tunes_and_predicts(resenc_session, pool, tmp_path, capsys):
    session, ranked = resenc_session
    assert "liver<-liver, kidney<-right kidney" in " ".join(ranked.split())
    # the session rebuilds the network by its name, as a card would name it
    recorded = json.loads((session / "session.json").read_text())["model"]["network"]
    assert recorded["name"] == "ResidualEncoderUNet" and recorded["args"]["n_blocks_per_stage"] == [1, 2, 2, 2]
    assert main(["predict", str(session), "--images", str(pool / "images"), "--out", str(tmp_path / "maps")]) == 0
    maps = sorted((tmp_path / "maps").glob("*.nii.gz"))
    assert len(maps) == 3 and set(np.unique(nib.load(maps[0]).get_fdata())) <= {0, 1, 2, 3}
    capsys.readouterr()
    # MONAI's bundle runner has no such network: refused in one line naming the model and the formats that carry it
    assert main(["export", str(session), "--format", "bundle", "--out", str(tmp_path / "bundle")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err == (
        f"asfda export: error: {session}: round 1's fine-tuned model (checkpoints/round1/final.pt) is a "
        "ResidualEncoderUNet (ASFDA's rebuild of an nnU-Net network), which MONAI's bundle runner cannot build, so it "
        "cannot be a MONAI bundle; "
        "export it with --format pt2 (or --format torchscript)"
    )
    assert not (tmp_path / "bundle").exists()
    assert main(["export", str(session), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    exported, adapted = load_model(tmp_path / "m.pt2", trust=True), session_model(Session.open(session))
    window = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported.network(window), adapted.network(window), atol=1e-5)


def test_asfda_export_without_a_format_writes_a_residual_encoder_session_as_pt2(resenc_session, tmp_path, capsys):
    """The default is the format that carries the session's model, the one the panel offers: no bundle carries a
    ResEnc, so the command does what the user asked (export the model) instead of refusing a format never asked for."""
    session, _ = resenc_session
    capsys.readouterr()
    assert main(["export", str(session), "--out", str(tmp_path / "liver.pt2")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert said.startswith(
        f"Exported pt2 to {tmp_path / 'liver.pt2'}, its card to {tmp_path / 'liver.card.json'}: round 1's fine-tuned "
        f"model (checkpoints/round1/final.pt). Load it back with asfda rank --model {tmp_path / 'liver.pt2'} --trust "
        "--images SCANS --out NEW_SESSION"
    )
    assert load_model(tmp_path / "liver.pt2", trust=True).kind == "pt2"


def test_the_panel_exports_a_residual_encoder_session_as_pt2_and_names_its_model_where_a_bundle_is_asked(
    resenc_session, tmp_path
):
    """No bundle carries an nnU-Net ResEnc network: the panel offers pt2, and a bundle asked for anyway is refused,
    naming the session's fine-tuned model (not the base checkpoint it started from) and the formats that work."""
    from ASFDALib.app.workflow import PanelSettings, Workflow

    session, _ = resenc_session
    flow = Workflow(PanelSettings(session=str(session)))
    assert flow.export_format() == "pt2"
    with pytest.raises(ModelError) as refused:
        flow.export(tmp_path / "bundle", "bundle")
    assert str(refused.value) == (
        f"{session}: round 1's fine-tuned model (checkpoints/round1/final.pt) is a ResidualEncoderUNet (ASFDA's "
        "rebuild of an nnU-Net network), which MONAI's bundle runner cannot build, so it cannot be a MONAI bundle; "
        "export it as pt2 (or torchscript)"
    )
    assert not (tmp_path / "bundle").exists()
    exported = flow.export(tmp_path / "liver")  # the format offered, its suffix added as a save dialog adds it
    assert exported.path == tmp_path / "liver.pt2" and (tmp_path / "liver.card.json").is_file()
    assert exported.message.endswith(
        "round 1's fine-tuned model (checkpoints/round1/final.pt). Load it back as the Setup's model with Trust this "
        "file ticked (it runs code stored in the file)"
    )
    program, adapted = load_model(exported.path, trust=True), session_model(Session.open(session))
    window = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(program.network(window), adapted.network(window), atol=1e-5)


def test_the_ranking_taps_each_residual_stage_of_an_nnunet_residual_encoder(tmp_path):
    """The feature moments DKD compares come from every resolution of the encoder, as DynUNet's stages."""
    from ASFDALib.query.features import encoder_stages

    path, _ = _nnunet_output(tmp_path, RESENC_ARCH, network="ResidualEncoderUNet")
    assert encoder_stages(load_model(path).network) == [f"encoder.stages.{s}" for s in range(4)]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {"block": "dynamic_network_architectures.building_blocks.residual.BottleneckD"},
            "its residual blocks are BottleneckD",
        ),
        (
            {"norm_op": "torch.nn.modules.batchnorm.BatchNorm3d"},
            "it normalises with torch.nn.modules.batchnorm.BatchNorm3d (the rebuild's norm is instance norm); trace",
        ),
        (
            {"nonlin": "torch.nn.ReLU"},
            "it activates with torch.nn.ReLU (the rebuild's is leaky ReLU); trace",
        ),
        ({"dropout_op": "torch.nn.modules.dropout.Dropout3d"}, "it trains with dropout"),
    ],
    ids=["bottleneck-blocks", "batchnorm", "relu", "dropout"],
)
def test_an_nnunet_residual_encoder_the_rebuild_lacks_is_refused_naming_why_and_the_way_round(tmp_path, change, why):
    path, _ = _nnunet_output(tmp_path, RESENC_ARCH | change, network="ResidualEncoderUNet")
    with pytest.raises(ModelError, match=re.escape(why)) as refused:
        load_model(path)
    said = str(refused.value)
    assert "\n" not in said and "plans.json: this nnU-Net model cannot be built as ASFDA's ResidualEncoderUNet" in said
    assert said.endswith(
        "trace it to TorchScript where nnU-Net runs (torch.jit.trace on a patch) and load that with --card and --trust"
    )


def test_a_residual_encoder_unet_named_with_stages_that_disagree_is_refused_in_one_line():
    args = {k: RESENC_ARCH[k] for k in ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage")}
    spec = NetworkSpec(
        "ResidualEncoderUNet", {**args, "in_channels": 1, "out_channels": 3, "n_conv_per_stage_decoder": [1, 1]}
    )
    with pytest.raises(
        ModelError,
        match=r"network ResidualEncoderUNet: 4 stages in features_per_stage, but "
        r"n_conv_per_stage_decoder has 2 \(one fewer is needed\)",
    ):
        build_network(spec)


def test_a_residual_encoder_unet_given_an_argument_it_does_not_take_names_asfdas_class_not_monais():
    """nnU-Net's class-valued arch_kwargs (n_stages, conv_op, norm_op_kwargs...) are not the rebuild's arguments:
    the refusal names the class that lists them, which is ASFDA's, not a MONAI network that does not exist."""
    args = {k: RESENC_ARCH[k] for k in ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage")}
    spec = NetworkSpec(
        "ResidualEncoderUNet",
        {**args, "in_channels": 1, "out_channels": 3, "n_conv_per_stage_decoder": [1, 1, 1], "n_stages": 4},
    )
    with pytest.raises(
        ModelError,
        match=r"network ResidualEncoderUNet: ASFDA's ResidualEncoderUNet takes no argument 'n_stages'; .*"
        r"ASFDALib\.models\.resenc\.ResidualEncoderUNet lists those it takes\)$",
    ):
        build_network(spec)


@pytest.mark.parametrize("masked", [False, True])
def test_an_nnunet_zscore_model_normalises_over_the_voxels_its_plans_say(tmp_path, masked):
    """nnU-Net's ZScoreNormalization z-scores every voxel unless use_mask_for_norm (its non-zero mask) is set."""
    zscore = {"normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [masked]}
    path, _ = _nnunet_output(tmp_path, configuration=zscore)
    intensity = load_model(path).card.intensity
    assert (intensity.mode, intensity.nonzero) == ("zscore", masked)
    assert intensity.describe() == f"z-score over {'non-zero voxels' if masked else 'every voxel'}"


def test_an_nnunet_ignore_label_is_no_class_of_the_card(tmp_path):
    """nnU-Net v2's sparse-annotation label "ignore" (the highest value) has no output channel."""
    path, _ = _nnunet_output(tmp_path)
    dataset = path.parent.parent / "dataset.json"
    data = json.loads(dataset.read_text())
    dataset.write_text(json.dumps({**data, "labels": {**NNUNET_LABELS, "ignore": len(NNUNET_LABELS)}}))
    assert load_model(path).card.class_names == list(NNUNET_LABELS)  # the folder's dataset.json, as nnU-Net reads


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 3}, "its kernels differ by stage"),
        ({"n_conv_per_stage_decoder": [1, 1, 1]}, "its stages have [1, 2] convolutions"),
        ({"conv_bias": False}, "its convolutions have conv_bias False"),
    ],
)
def test_an_nnunet_model_dynunet_cannot_build_is_refused_naming_why(tmp_path, change, why, capsys):
    path, _ = _nnunet_output(tmp_path, {**NNUNET_ARCH, **change})
    with pytest.raises(ModelError, match=f"cannot be built as MONAI's DynUNet: {re.escape(why)}"):
        load_model(path)


def _cascade_output(tmp_path: Path) -> tuple[Path, Path]:
    """The second stage of nnU-Net's cascade (3d_cascade_fullres, previous_stage 3d_lowres): its checkpoint, whose
    stem takes the scan plus 3d_lowres's segmentation one-hot per foreground label (nnU-Net's
    determine_num_input_channels: 1 + 4 input channels), and the 3d_fullres trainer folder it was made from."""
    path, _ = _nnunet_output(tmp_path, configuration={"previous_stage": "3d_lowres"})
    trainer = path.parent.parent
    cascade = trainer.with_name("nnUNetTrainer__nnUNetPlans__3d_cascade_fullres")
    trainer.rename(cascade)
    plans = json.loads((cascade / "plans.json").read_text())
    plans["configurations"] = {
        "3d_fullres": {k: v for k, v in plans["configurations"]["3d_fullres"].items() if k != "previous_stage"},
        "3d_lowres": plans["configurations"]["3d_fullres"],
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
    }
    (cascade / "plans.json").write_text(json.dumps(plans))
    path = cascade / "fold_0" / "checkpoint_final.pth"
    checkpoint = load_weights(path)  # nnU-Net's training log keeps numpy values
    checkpoint["init_args"]["configuration"] = "3d_cascade_fullres"
    stem = "encoder.stages.0.0.convs.0.conv.weight"
    checkpoint["network_weights"][stem] = checkpoint["network_weights"][stem].repeat(1, 5, 1, 1, 1)
    torch.save(checkpoint, path)
    return path, trainer


def test_an_nnunet_cascade_stage_is_refused_in_one_line_naming_the_channels_it_needs(pool, tmp_path, capsys):
    path, trainer = _cascade_output(tmp_path)
    args = ["rank", "--model", str(path), "--images", str(pool / "images"), "--out", str(tmp_path / "s")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(
        f"{path}: this nnU-Net model is the second stage of a cascade (configuration 3d_cascade_fullres, "
        "previous_stage 3d_lowres): its network takes the scan plus the 3d_lowres model's segmentation as 4 one-hot "
        "channels, which ASFDA cannot give it (it feeds one scan per volume, from the panel or the command line); "
        f"load the 3d_lowres model of the same training ({trainer.with_name('nnUNetTrainer__nnUNetPlans__3d_lowres')}"
        "/fold_0/checkpoint_final.pth), or a 3d_fullres one"
    )
    assert not (tmp_path / "s").exists()


def test_a_region_based_nnunet_cascade_stage_is_refused_as_region_based_not_counted_as_channels(tmp_path):
    """Region-based training (BraTS: labels of several values each, regions_class_order) is refused before the
    cascade's refusal, which counts one one-hot channel per class."""
    path, _ = _cascade_output(tmp_path)
    dataset = path.parent.parent / "dataset.json"
    regions = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
    dataset.write_text(
        json.dumps({**json.loads(dataset.read_text()), "labels": regions, "regions_class_order": [1, 2, 3]})
    )
    with pytest.raises(ModelError) as refused:
        load_model(path)
    assert (
        str(refused.value) == f"{dataset}: dataset.json's labels are not one value per class (region-based training?)"
    )


# --- nnssl self-supervised pre-training checkpoints -------------------------------------------------------------

# the pre-training plan nnssl's trainer keeps in the checkpoint (adaptation_planning/adaptation_plan.py, as the
# OpenMind checkpoints' adaptation_plan.json words it); spacing and patch in nnssl's array order, not RAS
NNSSL_PLAN = {
    "architecture_plans": {
        "arch_class_name": "ResidualEncoderUNet",
        "arch_kwargs": RESENC_ARCH,
        "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"],
    },
    "pretrain_plan": {
        "dataset_name": "Dataset745_OpenNeuro_v2",
        "plans_name": "nnsslPlans",
        "original_median_spacing_after_transp": [1, 1, 1],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "onemmiso": {
                "data_identifier": "nnsslPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "spacing_style": "onemmiso",
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_mask": "resample_data_or_seg_to_shape",
                "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "spacing": [1.0, 1.5, 2.0],
                "patch_size": [160, 160, 160],
            }
        },
        "experiment_planner_used": "FixedResEncUNetPlanner",
    },
    "pretrain_num_input_channels": 1,
    "recommended_downstream_patchsize": [32, 48, 64],
    "key_to_encoder": "encoder.stages",
    "key_to_stem": "encoder.stem",
    "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
    "key_to_lpe": None,
}


def _as_nnssl_saves(state: dict[str, torch.Tensor], features: list[int]) -> dict[str, torch.Tensor]:
    """The rebuild's state dict under the names nnssl's MAE saves its ResidualEncoderUNet with
    (dynamic_network_architectures'): every convolution and norm of a conv-norm block also as all_modules.0/1, the
    decoder's copy of the encoder, and a 1x1x1 reconstruction layer per decoder stage, the last at full resolution."""
    stages = len(features)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("decoder.head."):
            out[f"decoder.seg_layers.{stages - 2}.{name.rsplit('.', 1)[1]}"] = tensor
            continue
        out[name] = tensor
        if block := re.fullmatch(r"(.+)\.(conv|norm)\.(weight|bias)", name):
            out[f"{block[1]}.all_modules.{0 if block[2] == 'conv' else 1}.{block[3]}"] = tensor
    out |= {f"decoder.{k}": v for k, v in out.items() if k.startswith("encoder.")}
    for s in range(stages - 2):  # the lower resolutions' (deep supervision's) layers
        out[f"decoder.seg_layers.{s}.weight"] = torch.randn(1, features[-(s + 2)], 1, 1, 1)
        out[f"decoder.seg_layers.{s}.bias"] = torch.randn(1)
    return out


def _nnssl_checkpoint(folder: Path, **plan: object) -> tuple[Path, torch.nn.Module]:
    """checkpoint_final.pth as nnssl's BaseMAETrainer saves it (AbstractBaseTrainer.save_checkpoint) and the
    Hugging Face repositories ship it, adaptation_plan.json beside it; and the pretext network it holds (a
    ResidualEncoderUNet reconstructing the one input channel, in nnssl's array order). ``plan`` overrides keys of
    the adaptation plan."""
    adaptation = {**NNSSL_PLAN, **plan}
    torch.manual_seed(5)
    args = {k: RESENC_ARCH[k] for k in ("features_per_stage", "kernel_sizes", "strides", "n_blocks_per_stage")}
    pretext = build_network(
        NetworkSpec(
            "ResidualEncoderUNet", {**args, "in_channels": 1, "out_channels": 1, "n_conv_per_stage_decoder": [1] * 3}
        )
    )
    for module in pretext.modules():  # trained-looking norms, so a wrong mapping shows
        if isinstance(module, torch.nn.InstanceNorm3d):
            torch.nn.init.normal_(module.weight, 1.0, 0.2)
            torch.nn.init.normal_(module.bias, 0.0, 0.2)
    checkpoint = {
        "network_weights": _as_nnssl_saves(pretext.state_dict(), RESENC_ARCH["features_per_stage"]),
        "optimizer_state": {},
        "grad_scaler_state": None,
        "logging": {"train_losses": [0.9, 0.4]},
        "_best_ema": None,
        "current_epoch": 1000,
        "init_args": {
            "plan": adaptation["pretrain_plan"],
            "configuration_name": "onemmiso",
            "fold": 0,
            "pretrain_json": {"collection_name": "OpenMind"},
            "device": torch.device("cpu"),
        },
        "trainer_name": "BaseMAETrainer",
        "nnssl_adaptation_plan": adaptation,
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, folder / "checkpoint_final.pth")
    (folder / "adaptation_plan.json").write_text(json.dumps(adaptation))
    return folder / "checkpoint_final.pth", pretext.eval()


def test_nnssls_checkpoint_layout_here_is_what_dynamic_network_architectures_names(tmp_path):
    """The test checkpoints' names and shapes are those of nnU-Net's own ResidualEncoderUNet, which nnssl saves."""
    unet = pytest.importorskip("dynamic_network_architectures.architectures.unet", reason="make install installs it")
    arch = RESENC_ARCH
    theirs = unet.ResidualEncoderUNet(
        1,
        4,
        arch["features_per_stage"],
        torch.nn.Conv3d,
        arch["kernel_sizes"],
        arch["strides"],
        arch["n_blocks_per_stage"],
        1,
        arch["n_conv_per_stage_decoder"],
        True,
        torch.nn.InstanceNorm3d,
        {"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    ).state_dict()
    ours = torch.load(_nnssl_checkpoint(tmp_path)[0], weights_only=True)["network_weights"]
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_an_nnssl_pretraining_checkpoint_loads_its_encoder_into_a_network_for_the_cards_classes(tmp_path):
    path, pretext = _nnssl_checkpoint(tmp_path / "ResEncL-OpenMind-MAE")
    model = load_model(path, {"class_names": CLASS_NAMES})  # the classes only: the rest is the checkpoint's
    card = model.card
    assert card.class_names == CLASS_NAMES and card.source_classes is None
    # nnssl's array order (S, A, R for a RAS-stored image) reversed: RAS
    assert card.spacing == (2.0, 1.5, 1.0) and card.roi_size == (64, 48, 32)
    assert (card.intensity.mode, card.intensity.nonzero) == ("zscore", False)
    assert model.spec.name == "ResidualEncoderUNet" and model.spec.args["out_channels"] == len(CLASS_NAMES)
    assert model.spec.args["kernel_sizes"] == [k[::-1] for k in RESENC_ARCH["kernel_sizes"]]
    report, file = model.load_report, torch.load(path, weights_only=True)["network_weights"]
    own = model.network.state_dict()
    assert report.encoder_only and report.loaded == sorted(k for k in own if k.startswith("encoder."))
    for name in report.loaded:  # the file's tensors, kernels in RAS order
        want = file[name].permute(0, 1, 4, 3, 2) if file[name].dim() == 5 else file[name]
        assert torch.equal(own[name], want), name
    assert report.new == sorted(k for k in own if k.startswith("decoder."))  # the decoder and the head: new
    # the MAE's decoder and reconstruction layers are ignored and named; second names of loaded tensors are not
    assert report.ignored == sorted(
        k for k in file if k.startswith(("decoder.stages", "decoder.transp", "decoder.seg"))
    )
    assert "encoder-only checkpoint into 'encoder'; decoder and head newly initialised" in report.summary
    assert "keys mapped from nnssl's ResidualEncoderUNet pre-training (BaseMAETrainer): its stem and encoder" in (
        report.summary
    )
    torch.manual_seed(0)
    sar = torch.randn(1, 1, 32, 32, 32)  # as nnssl's reader gives a RAS-stored image: (S, A, R)
    with torch.no_grad():
        theirs, ours = pretext.encoder(sar), model.network.encoder(sar.permute(0, 1, 4, 3, 2))
    for stage, (a, b) in enumerate(zip(ours, theirs)):  # the pre-trained encoder computes what it did
        assert torch.allclose(a, b.permute(0, 1, 4, 3, 2), atol=1e-4), stage


def test_an_nnssl_checkpoints_card_beside_it_is_read_as_written_as_a_card_given_is(tmp_path):
    """A card found beside the checkpoint, as one given with --card: its keys as written, the plan's spacing and
    patch where it leaves them out (not the card defaults' 1 mm and 96 voxels)."""
    path, _ = _nnssl_checkpoint(tmp_path / "mae")
    path.with_name("checkpoint_final.card.json").write_text(json.dumps({"class_names": CLASS_NAMES}))
    for card in (None, path.with_name("checkpoint_final.card.json")):
        model = load_model(path, card)
        assert model.card.class_names == CLASS_NAMES
        assert model.card.spacing == (2.0, 1.5, 1.0) and model.card.roi_size == (64, 48, 32)


def test_an_nnssl_training_output_loads_as_nnssl_though_plans_json_lies_above_it_as_for_nnunet(tmp_path):
    """nnssl's trainer writes its plans.json above the fold folders, as nnU-Net does: plans of no segmentation
    network, so the checkpoint's own adaptation plan decides."""
    trainer = tmp_path / "Dataset745_OpenNeuro_v2" / "BaseMAETrainer__nnsslPlans__onemmiso"
    path, _ = _nnssl_checkpoint(trainer / "fold_all")
    (trainer / "plans.json").write_text(json.dumps(NNSSL_PLAN["pretrain_plan"]))
    model = load_model(path, {"class_names": CLASS_NAMES})
    assert model.spec.name == "ResidualEncoderUNet" and model.load_report.encoder_only


def _as_spark_saves(path: Path) -> None:
    """Re-save an nnssl checkpoint as nnssl's SparkTrainer saves it: without the adaptation plan, with its sparse
    pretext network's weights beside the architecture's."""
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["nnssl_adaptation_plan"]
    checkpoint["spark_weights"] = {"architecture.encoder.stem.convs.0.conv.weight": torch.zeros(1)}
    checkpoint["trainer_name"] = "SparkTrainer"
    torch.save(checkpoint, path)


@pytest.mark.parametrize("layout", ["beside", "above"])
def test_an_nnssl_checkpoint_saved_without_its_plan_loads_with_the_adaptation_plan_json_of_its_folder(tmp_path, layout):
    """SparkTrainer saves no plan in the checkpoint: the plan is adaptation_plan.json, beside it as Hugging Face
    repositories ship it, or in the folder above as nnssl's trainer writes it (with plans.json, above fold_N)."""
    path, _ = _nnssl_checkpoint(tmp_path / "Spark")
    _as_spark_saves(path)
    if layout == "above":
        (tmp_path / "Spark" / "plans.json").write_text(json.dumps(NNSSL_PLAN["pretrain_plan"]))
        (tmp_path / "Spark" / "fold_all").mkdir()
        path = path.rename(tmp_path / "Spark" / "fold_all" / path.name)
    model = load_model(path, {"class_names": CLASS_NAMES})
    assert model.spec.name == "ResidualEncoderUNet" and model.load_report.encoder_only
    assert model.card.spacing == (2.0, 1.5, 1.0) and model.card.roi_size == (64, 48, 32)  # the plan's, in RAS
    assert "from nnssl's ResidualEncoderUNet pre-training (SparkTrainer)" in model.load_report.summary


def test_an_nnssl_checkpoint_without_a_plan_in_it_or_beside_it_is_refused_naming_nnssls_add_adaptation_plan(tmp_path):
    path, _ = _nnssl_checkpoint(tmp_path / "Spark")
    _as_spark_saves(path)
    (tmp_path / "Spark" / "adaptation_plan.json").unlink()
    with pytest.raises(ModelError) as refused:
        load_model(path, {"class_names": CLASS_NAMES})
    assert str(refused.value) == (
        f"{path}: an nnssl pre-training checkpoint (SparkTrainer) that holds no adaptation plan, and no "
        "adaptation_plan.json lies beside it or in the folder above; copy its training output's adaptation_plan.json "
        "beside it, or add the plan to it with nnssl's add_adaptation_plan (nnssl/utilities/add_adaptation_plan.py)"
    )


def test_an_nnssl_plan_whose_keys_name_no_tensor_is_refused_naming_them_and_what_the_checkpoint_holds(tmp_path):
    """A plan of other weights (SparkTrainer's sparse pretext network names its encoder under architecture.):
    refused before any load, naming the plan's keys and the checkpoint's tensors, not as a state dict of none."""
    plan = {"key_to_stem": "architecture.encoder.stem", "key_to_encoder": "architecture.encoder.stages"}
    path, _ = _nnssl_checkpoint(tmp_path / "mae", **plan)
    with pytest.raises(ModelError) as refused:
        load_model(path, {"class_names": CLASS_NAMES})
    assert str(refused.value) == (
        f"{path}: its nnssl adaptation plan's key_to_stem 'architecture.encoder.stem' and key_to_encoder "
        "'architecture.encoder.stages' name no tensor of its network_weights, which hold decoder.encoder (138), "
        "decoder.seg_layers (6), decoder.stages (24), decoder.transpconvs (6), encoder.stages (130), encoder.stem (8); "
        "the plan was written for other weights: give the checkpoint its own pre-training's plan"
    )


def test_an_nnssl_plan_lacking_architecture_arguments_is_refused_as_nnssls_plan_not_nnunets(tmp_path):
    arch_kwargs = {k: v for k, v in RESENC_ARCH.items() if k != "features_per_stage"}
    plans = {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch_kwargs}
    path, _ = _nnssl_checkpoint(tmp_path / "mae", architecture_plans=plans)
    with pytest.raises(ModelError) as refused:
        load_model(path, {"class_names": CLASS_NAMES})
    assert str(refused.value) == (
        f"{path}: this nnssl pre-training checkpoint cannot be built here: its network is ResidualEncoderUNet, but "
        "its adaptation plan's arch_kwargs lack 'features_per_stage'"
    )
    path, _ = _nnssl_checkpoint(tmp_path / "bare", architecture_plans={**plans, "arch_kwargs": None})
    with pytest.raises(ModelError) as refused:
        load_model(path, {"class_names": CLASS_NAMES})
    assert str(refused.value) == (
        f"{path}: its nnssl adaptation plan names ResidualEncoderUNet without arch_kwargs (its stages, features and "
        "kernels), which only nnssl's presets (ResEncL, NoSkipResEncL) go without"
    )


def test_an_nnssl_checkpoint_ranks_a_pool_with_a_card_of_the_target_classes(pool, tmp_path, capsys):
    path, _ = _nnssl_checkpoint(tmp_path / "mae")
    session = tmp_path / "session"
    args = ["rank", "--model", str(path), "--card", str(pool / "plain.json"), "--images", str(pool / "images")]
    assert main([*args, "--out", str(session), "--budget", "1"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "encoder-only checkpoint into 'encoder'; decoder and head newly initialised" in said
    assert "ignored outside the head: decoder.seg_layers.0.bias" in said and NEW_HEAD_NOTE in said
    ranking = json.loads((session / "ranking.json").read_text())
    assert ranking["model_load"]["encoder_only"] and len(ranking["selected"]) == 1
    recorded = json.loads((session / "session.json").read_text())["model"]
    assert recorded["network"]["name"] == "ResidualEncoderUNet"
    # the card's spacing and window; the checkpoint's intensity, which the card leaves out
    assert recorded["card"]["spacing"] == [4.0, 4.0, 4.0] and recorded["card"]["intensity"]["mode"] == "zscore"
    base = session_model(Session.open(session), adapted=False)  # rebuilt from the session alone: same digest
    groups = {g["name"]: g for g in param_groups(base.network, FinetuneConfig(lr=1e-3), base.load_report)}
    assert {id(p) for p in groups["pretrained"]["params"]} == {id(p) for p in base.network.encoder.parameters()}
    assert {id(p) for p in groups["full"]["params"]} == {id(p) for p in base.network.decoder.parameters()}


def test_an_nnssl_checkpoint_named_alone_for_its_session_loads_with_the_card_the_session_recorded(pool, tmp_path):
    """A moved model's new place is given as 'asfda rank --out S --model NEW_PATH', with no --card: an nnssl
    checkpoint, which names no classes, then loads with the session's card (its digest says it is the same file);
    not where the session trusts its model, as a file named alone is not trusted to run code."""
    path, _ = _nnssl_checkpoint(tmp_path / "mae")
    session = tmp_path / "session"
    args = ["rank", "--model", str(path), "--card", str(pool / "plain.json"), "--images", str(pool / "images")]
    assert main([*args, "--out", str(session), "--budget", "1"]) == 0
    moved = path.parent.rename(tmp_path / "moved") / path.name
    with pytest.raises(ModelError, match="needs --card with class_names"):  # on its own it names no classes
        load_model(moved)
    model, _, notes = ranking_model(Session.open(session), lambda: load_model(moved), moved)
    recorded = json.loads((session / "session.json").read_text())["model"]
    assert model.digest == recorded["digest"] and notes == []
    assert model.card.class_names == CLASS_NAMES and model.card.spacing == (4.0, 4.0, 4.0)
    trusted = Session.open(session)
    trusted.data["model"]["trust"] = True
    with pytest.raises(ModelError, match="needs --card with class_names"):
        ranking_model(trusted, lambda: load_model(moved), moved)


def test_an_nnssl_checkpoint_without_a_card_is_refused_naming_card_and_the_classes_it_must_give(pool, tmp_path, capsys):
    path, _ = _nnssl_checkpoint(tmp_path / "mae")
    args = ["rank", "--model", str(path), "--images", str(pool / "images"), "--out", str(tmp_path / "s")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(
        f"{path}: this nnssl pre-training checkpoint needs --card with class_names (the target task's classes, "
        "background first: the checkpoint has no segmentation head)"
    )
    assert not (tmp_path / "s").exists()


def test_what_an_nnssl_pretraining_plan_does_not_record_the_card_must_give(tmp_path):
    """nnssl's noresample plans keep no spacing; an intensity scheme with no card counterpart neither counts."""
    config = NNSSL_PLAN["pretrain_plan"]["configurations"]["onemmiso"]
    pretrain = {
        **NNSSL_PLAN["pretrain_plan"],
        "configurations": {
            "noresample": {
                **config,
                "spacing_style": "noresample",
                "spacing": None,
                "normalization_schemes": ["RGBTo01"],
            }
        },
    }
    path, _ = _nnssl_checkpoint(tmp_path / "noresample", pretrain_plan=pretrain)
    with pytest.raises(ModelError) as refused:
        load_model(path, {"class_names": CLASS_NAMES})
    assert str(refused.value) == (
        f"{path}: this nnssl pre-training checkpoint needs --card with spacing (the pre-training plan records none: "
        "nnssl's noresample), intensity (the pre-training normalisation RGBTo01 has no card counterpart)"
    )
    given = {"class_names": CLASS_NAMES, "spacing": [1, 1, 1], "intensity": {"mode": "none"}}
    assert load_model(path, given).card.describe_input() == "1 x 1 x 1 mm voxels, 64 x 48 x 32 windows, as stored"


@pytest.mark.parametrize(
    ("architecture", "kind", "way"),
    [
        ("PrimusM", " (a transformer)", "use the ResEnc-L checkpoint of the same pre-training"),
        (
            "PlainConvUNet",
            "",
            "fine-tune it with nnssl's segmentation adaptation (its nnU-Net fork) and load that network traced to "
            "TorchScript with --card and --trust",
        ),
    ],
)
def test_an_nnssl_checkpoint_of_a_network_asfda_does_not_build_is_refused_naming_the_way_round(
    tmp_path, architecture, kind, way
):
    plans = {"arch_class_name": architecture, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    path, _ = _nnssl_checkpoint(tmp_path / architecture, architecture_plans=plans)
    with pytest.raises(ModelError) as refused:
        load_model(path, {"class_names": CLASS_NAMES})
    said = str(refused.value)
    assert "\n" not in said and said.startswith(
        f"{path}: an nnssl pre-training checkpoint of {architecture}{kind}, which ASFDA does not build (it builds "
        f"nnssl's ResEnc-L, NoSkipResEncL and ResidualEncoderUNet encoders); {way}"
    )


@pytest.mark.parametrize("preset", ["ResEncL", "NoSkipResEncL"])
def test_nnssls_resenc_l_is_built_as_its_architecture_registry_builds_it(tmp_path, preset):
    """arch_class_name ResEncL carries no arch_kwargs: the network is nnssl's get_res_enc_l, checked here by its
    arguments (building its 100M parameters would take the test's time). NoSkipResEncL (PCLRv2's pretext network)
    has the same encoder, only its decoder, which is new here, lacks the skips."""
    from ASFDALib.models.nnssl import _architecture
    from ASFDALib.models.nnunet import resenc_spec

    name, arch = _architecture(tmp_path / "c.pth", {"architecture_plans": {"arch_class_name": preset}})
    args = resenc_spec(arch, [2, 1, 0], 4).args
    assert name == preset and args["features_per_stage"] == [32, 64, 128, 256, 320, 320]
    assert args["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6] and args["n_conv_per_stage_decoder"] == [1] * 5
    assert args["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and args["kernel_sizes"] == [[3, 3, 3]] * 6
    assert (args["conv_bias"], args["norm_eps"], args["norm_affine"], args["negative_slope"]) == (
        True,
        1e-5,
        True,
        0.01,
    )


def test_the_nnssl_forks_fine_tuning_plans_naming_resenc_l_describe_nnssls_resenc_l():
    """nnssl's nnU-Net fork (nnUNetv2_preprocess_like_nnssl) writes the pre-training's arch_class_name into the
    fine-tuning plans as network_class_name, arch_kwargs null for a preset: its fold_N/checkpoint_final.pth is
    nnU-Net's ResidualEncoderUNet of nnssl's ResEnc-L, and loads as one."""
    from ASFDALib.models.nnunet import plans_architecture

    fork = {"architecture": {"arch_kwargs": None, "_kw_requires_import": None, "network_class_name": "ResEncL"}}
    arch = plans_architecture(fork, Path("ptPlans__OpenMind-MAE__nnUNetResEncUNetLPlans.json"))
    assert (arch["class"], arch["features"], arch["encoder"]) == (
        "ResidualEncoderUNet",
        [32, 64, 128, 256, 320, 320],
        [1, 3, 4, 6, 6, 6],
    )
    assert arch["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and arch["kernels"] == [[3, 3, 3]] * 6
    assert (arch["bias"], arch["norm_args"], arch["slope"], arch["stem"]) == (
        True,
        {"eps": 1e-5, "affine": True},
        0.01,
        None,
    )


def test_a_class_map_for_an_nnssl_checkpoint_is_refused_as_it_has_no_head(tmp_path):
    path, _ = _nnssl_checkpoint(tmp_path / "mae")
    with pytest.raises(ModelError, match=r"has no segmentation head to pair classes with; leave --class-map out$"):
        load_model(path, {"class_names": CLASS_NAMES}, class_map="kidney=right kidney")


def test_a_card_naming_source_classes_for_an_nnssl_checkpoint_is_refused_naming_the_key_not_a_class_map(pool, tmp_path):
    """A card written for a model with a head (the pool's card.json lists its 14 source classes): no --class-map
    was given, so the line names the card's key."""
    path, _ = _nnssl_checkpoint(tmp_path / "mae")
    with pytest.raises(ModelError) as refused:
        load_model(path, pool / "card.json")
    assert str(refused.value) == (
        f"{pool / 'card.json'}: an nnssl pre-training checkpoint has no segmentation head whose classes "
        "source_classes could name; leave 'source_classes' out of the card"
    )


def test_a_trusted_bundle_builds_its_network_from_its_own_scripts(pool, tmp_path):
    """A bundle whose network_def is its own class in scripts/ (as model-zoo bundles ship custom networks):
    refused without trust, built with it as MONAI's runner builds it (the bundle root importable)."""
    name, args = NETWORKS["unet-instance"]
    bundle = tmp_path / "custom_bundle"
    for sub in ("configs", "models", "scripts"):
        (bundle / sub).mkdir(parents=True)
    (bundle / "scripts" / "__init__.py").write_text("")
    (bundle / "scripts" / "lab_net.py").write_text(
        "from monai.networks.nets import UNet\n\nclass LabUNet(UNet):\n    pass\n"
    )
    config = {"network_def": {"_target_": "scripts.lab_net.LabUNet", **{**args, "out_channels": 4}}}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    torch.manual_seed(2)
    net = build_network(NetworkSpec(name, {**args, "out_channels": 4}))
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    with pytest.raises(TrustRequiredError):
        load_model(bundle, pool / "plain.json")
    model = load_model(bundle, pool / "plain.json", trust=True)
    assert type(model.network).__name__ == "LabUNet" and str(bundle) not in __import__("sys").path
    assert all(torch.equal(model.network.state_dict()[k], v) for k, v in net.state_dict().items())
    config["network_def"]["_target_"] = "scripts.missing.Net"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"inference.json: cannot build network_def \("):
        load_model(bundle, pool / "plain.json", trust=True)


def test_two_trusted_bundles_with_scripts_of_the_same_name_each_build_their_own_network(pool, tmp_path):
    """The Slicer panel and a benchmark load bundle after bundle in one process: scripts.net of one is not the
    other's."""
    name, args = NETWORKS["unet-instance"]
    built = {}
    for lab in ("first", "second"):
        bundle = tmp_path / lab
        for sub in ("configs", "models", "scripts"):
            (bundle / sub).mkdir(parents=True)
        (bundle / "scripts" / "__init__.py").write_text("")
        code = f"from monai.networks.nets import UNet\n\nclass Net(UNet):\n    lab = {lab!r}\n"
        (bundle / "scripts" / "net.py").write_text(code)
        config = {"network_def": {"_target_": "scripts.net.Net", **{**args, "out_channels": 4}}}
        (bundle / "configs" / "inference.json").write_text(json.dumps(config))
        torch.save(
            build_network(NetworkSpec(name, {**args, "out_channels": 4})).state_dict(), bundle / "models" / "model.pt"
        )
        built[lab] = load_model(bundle, pool / "plain.json", trust=True).network
    assert (built["first"].lab, built["second"].lab) == ("first", "second")
    assert not any(m == "scripts" or m.startswith("scripts.") for m in sys.modules)


def test_a_card_given_in_python_as_a_dict_is_the_card(pool, tmp_path):
    path, _ = _publish("unet-instance", tmp_path)
    card = json.loads((pool / "plain.json").read_text())
    model = load_model(path, card, NetworkSpec(*NETWORKS["unet-instance"]))
    assert model.card.class_names == CLASS_NAMES and model.card.roi_size == (32, 32, 32)
