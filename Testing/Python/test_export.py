"""What `asfda export` writes, used the way its users use it: the bundle run by MONAI's own bundle runner on
real NIfTI volumes and compared with `asfda predict`, its metadata, a trusted bundle re-exported as a
bundle, and torch.export programs (.pt2) loaded back under the trust rule torch's loader calls for."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ASFDALib.app.cli import main
from ASFDALib.models.loading import load_model

REPO = Path(__file__).resolve().parents[2]
REAL_MRI = REPO / "Testing" / "Data" / "tptbox" / "sub-mri_label-6_T2w.nii.gz"  # stored P-I-R, 1.5 mm


def _adapt(root: Path, images: Path, labels: Path, model: list[str]) -> Path:
    """rank (budget 1) -> import the query's ground truth -> fine-tune a few iterations; the session folder."""
    session = root / "session"
    assert main(["rank", *model, "--images", str(images), "--out", str(session), "--budget", "1"]) == 0
    query = json.loads((session / "ranking.json").read_text())["selected"]
    (root / "gt").mkdir()
    shutil.copy(labels / query[0], root / "gt" / query[0])
    assert main(["labels", "import", str(session), "--from", str(root / "gt")]) == 0
    finetune = ["finetune", str(session), "--iterations", "4", "--no-pseudo", "--batch-size", "1"]
    assert main([*finetune, "--checkpoint-every", "2"]) == 0
    return session


@pytest.fixture(scope="module")
def adapted(tmp_path_factory, small_pool):
    """A session on the built-in model, fine-tuned for 4 iterations on one labelled volume, and an input
    folder holding a real MRI volume and a phantom from the pool."""
    root = tmp_path_factory.mktemp("export")
    session = _adapt(root, small_pool / "images", small_pool / "labels", [])
    inputs = root / "inputs"
    inputs.mkdir()
    shutil.copy(REAL_MRI, inputs / REAL_MRI.name)
    phantom = sorted((small_pool / "images").iterdir())[-1]
    shutil.copy(phantom, inputs / phantom.name)
    _reoriented(phantom, inputs / "phantom_pir.nii.gz")
    return root, session, inputs


def _reoriented(source: Path, target: Path) -> Path:
    """The volume stored in P-I-R axis order on an anisotropic grid with an offset origin (as the real MRI is)."""
    import nibabel as nib
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    image = nib.load(str(source))
    data = np.asarray(image.dataobj)
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(("P", "I", "R")))
    affine = image.affine @ inv_ornt_aff(transform, data.shape)
    affine = affine @ np.diag([0.8, 1.2, 0.9, 1.0])  # voxel sizes 1.6 / 2.4 / 1.8 mm
    affine[:3, 3] += (12.5, -7.0, 30.0)
    nib.save(nib.Nifti1Image(apply_orientation(data, transform), affine), str(target))
    return target


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Path:
    """Two MRI-like phantoms with labels, for sessions whose ranking is not what a test is about."""
    from ASFDALib.bench.phantoms import write_phantoms

    folder = tmp_path_factory.mktemp("small_pool")
    write_phantoms(folder, 2, "mri", seed=5)
    return folder


def _needs_ignite() -> None:
    if importlib.util.find_spec("ignite") is None:
        pytest.fail("pytorch-ignite is not installed: MONAI's SupervisedEvaluator needs it (add it to the test extras)")


def _monai_bundle_run(bundle: Path, inputs: Path, out: Path) -> subprocess.CompletedProcess:
    """MONAI's own entry point, ``monai.bundle.run`` (what ``python -m monai.bundle run`` calls once ``fire``
    has parsed the command line), with the overrides a user gives, in a fresh interpreter."""
    kwargs = {
        "config_file": str(bundle / "configs" / "inference.json"),
        "meta_file": str(bundle / "configs" / "metadata.json"),
        "bundle_root": str(bundle),
        "dataset_dir": str(inputs),
        "output_dir": str(out),
    }
    code = "import json, sys; from monai.bundle import run; run(**json.loads(sys.argv[1]))"
    command = [sys.executable, "-c", code, json.dumps(kwargs)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ.copy())


def _label_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_the_bundle_runs_with_monais_runner_and_matches_asfda_predict_on_each_inputs_grid(adapted):
    from monai.bundle import ConfigParser

    from ASFDALib.data.preprocess import labels_to_native

    _needs_ignite()
    root, session, inputs = adapted
    bundle = root / "bundle"
    assert main(["export", str(session), "--format", "bundle", "--out", str(bundle)]) == 0
    run = _monai_bundle_run(bundle, inputs, root / "monai_pred")
    assert run.returncode == 0, run.stderr[-3000:]
    assert main(["predict", str(session), "--images", str(inputs), "--out", str(root / "asfda_pred")]) == 0
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    for image in sorted(inputs.iterdir()):
        source, source_affine = _label_map(image)
        ours, our_affine = _label_map(root / "asfda_pred" / image.name)
        theirs, their_affine = _label_map(root / "monai_pred" / image.name.replace(".nii.gz", "_seg.nii.gz"))
        assert theirs.shape == source.shape == ours.shape
        np.testing.assert_allclose(their_affine, source_affine, atol=1e-4)  # back on the input's own grid
        np.testing.assert_allclose(our_affine, source_affine, atol=1e-4)
        # MONAI blends overlapping windows (centre-weighted); ASFDA takes each voxel from its most central
        # window. They differ only near window borders.
        agreement = float((theirs == ours).mean())
        assert agreement > 0.97, (image.name, agreement)
        assert set(np.unique(theirs)) <= {0, 1, 2, 3}
        # Invertd put each voxel where ASFDA's own resampling puts the bundle's model-space labels.
        data = parser.get_parsed_content("preprocessing")({"image": str(image)})
        with torch.no_grad():
            logits = parser.get_parsed_content("inferer")(data["image"][None].as_tensor(), network.eval())
        model_space = logits.argmax(1)[0].numpy().astype(np.uint8)
        expected = labels_to_native(model_space, data["image"].affine.numpy(), source.shape, source_affine)
        foreground = (expected > 0) | (theirs > 0)
        assert (expected == theirs).mean() > 0.999, image.name
        if image.name != REAL_MRI.name:  # the phantoms hold the organs the model was adapted to
            assert foreground.sum() > 500, (image.name, foreground.sum())
            assert (expected == theirs)[foreground].mean() > 0.99, image.name


def test_the_bundle_has_monais_inference_properties_and_asfda_reads_it_back_without_trust(adapted, tmp_path):
    from monai.bundle import ConfigWorkflow

    from ASFDALib.adaptation.pipeline import session_model
    from ASFDALib.adaptation.session import Session

    _, session, _ = adapted
    bundle = tmp_path / "bundle"
    assert main(["export", str(session), "--out", str(bundle)]) == 0  # no --format: a MONAI network's is a bundle
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        workflow_type="infer",
    )
    workflow.initialize()  # parses the config and runs its 'initialize' section
    assert workflow.check_properties() in (None, [])  # every required inference and metadata property is there
    workflow.finalize()
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    assert config["run"] == ["$@evaluator.run()"] and "initialize" in config and "finalize" in config
    assert config["evaluator"]["_target_"] == "SupervisedEvaluator"
    post = [t["_target_"] for t in config["postprocessing"]["transforms"]]
    assert post == ["Activationsd", "AsDiscreted", "Invertd", "SaveImaged"]
    back = load_model(bundle)  # no trust: network_def, preprocessing and inferer are literal MONAI components
    adapted_model = session_model(Session.open(session))
    # the same card, but for its description, which says what the session did to the base model
    assert back.kind == "bundle" and back.spec is not None and "adapted with ASFDA" in back.card.description
    assert dataclasses.replace(back.card, description=adapted_model.card.description) == adapted_model.card
    for key, value in adapted_model.network.state_dict().items():
        assert torch.equal(back.network.state_dict()[key], value), key


def test_a_bundle_export_stopped_part_way_leaves_no_half_bundle_and_the_same_command_then_writes_it(
    adapted, tmp_path, monkeypatch, capsys
):
    """Stopped after its configs and before its weights (Ctrl-C, a kill), an export leaves no folder MONAI would
    load as the model, nor one its rerun refuses as existing: the rerun writes the whole bundle."""
    from ASFDALib.models import export

    _, session, _ = adapted
    bundle = tmp_path / "bundle"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_write_weights", stopped)
    assert main(["export", str(session), "--out", str(bundle)]) == 130
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its scratch folder
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["export", str(session), "--out", str(bundle)]) == 0
    assert f"Exported bundle to {bundle}" in capsys.readouterr().out
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert files[:4] == [
        "asfda_card.json",
        "asfda_default_source_stats.npz",
        "configs/inference.json",
        "configs/metadata.json",
    ]
    assert "models/model.pt" in files and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# The fields MONAI's metadata schema (meta_schema_20220324, as MONAI's tests/testing_data/schema.json) requires
MONAI_REQUIRED_IO = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")


def test_bundle_metadata_keeps_monais_schema_and_says_the_outputs_are_logits(adapted, tmp_path):
    _, session, _ = adapted
    assert main(["export", str(session), "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    for field in MONAI_REQUIRED_IO:
        assert field in image and field in pred, field
    assert all(isinstance(v, (int, float)) for v in image["value_range"] + pred["value_range"])
    assert image["format"] == "magnitude" and image["value_range"] == [0.0, 1.0]  # MRI percentiles scaled to 0..1
    assert pred["value_range"] == [] and "logits" in meta["pred_classes"]  # the network ends before softmax
    model = load_model(tmp_path / "bundle")
    with torch.no_grad():
        out = model.network(torch.rand(1, 1, *pred["spatial_shape"]))
    assert out.shape[1] == pred["num_channels"] and (out.min() < 0 or out.max() > 1)
    assert "nearest" in meta["sliding_window"] and "gaussian" in meta["sliding_window"]


def test_bundle_metadata_describes_the_adapted_model(adapted, tmp_path, small_pool):
    from ASFDALib.models.export import BUILTIN_LICENCE

    _, session, _ = adapted
    assert main(["export", str(session), "--out", str(tmp_path / "bundle")]) == 0
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "liver", "2": "kidney", "3": "gallbladder"}
    assert pred["num_channels"] == 4
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [48, 48, 48]
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version"):
        assert meta[key], key
    assert "pytorch-ignite" in meta["required_packages_version"]
    assert meta["asfda"]["adapted"] is True and meta["asfda"]["rounds"] == 1 and meta["asfda"]["labelled_count"] == 1
    assert meta["asfda"]["version"] == __import__("ASFDALib").__version__
    assert "DKD" in meta["asfda"]["method"] and "(no pseudo-label stage)" in meta["asfda"]["method"]  # --no-pseudo
    assert meta["asfda"]["per_round"][0]["iterations"] == {"stage1": 4, "stage2": 0}
    assert meta["session"]["path"] == str(session.resolve())
    assert meta["target_domain"]["images"] == str((small_pool / "images").resolve())
    assert meta["target_domain"]["volumes"] == 2
    assert meta["base_model"]["name"] == "asfda-default-unet" and meta["base_model"]["form"] == "state_dict"
    assert meta["base_model"]["license"] == meta["license"] == BUILTIN_LICENCE
    assert "adapted with ASFDA" in meta["description"] and "1 labelled volume" in meta["changelog"]["0.1.0"]


def test_every_exported_card_says_what_the_session_did_to_the_base_model(adapted, tmp_path):
    """A card that kept the base model's description alone would present the adapted weights as the base's."""
    from ASFDALib.models.defaults import default_model_path

    _, session, _ = adapted
    base = load_model(default_model_path()).card.description
    cards = {}
    for fmt, out, card in (
        ("bundle", "bundle", "bundle/asfda_card.json"),
        ("torchscript", "adapted.ts", "adapted.card.json"),
        ("pt2", "adapted.pt2", "adapted.card.json"),
    ):
        if fmt == "pt2":
            (tmp_path / "adapted.card.json").unlink()  # the TorchScript export's card
        assert main(["export", str(session), "--format", fmt, "--out", str(tmp_path / out)]) == 0
        cards[fmt] = json.loads((tmp_path / card).read_text())["description"]
    for fmt, description in cards.items():
        assert description.startswith("asfda-default-unet, adapted with ASFDA "), fmt
        assert "1 round(s), 1 labelled volume(s)" in description and description.endswith(base), fmt
    # the TorchScript file carries the metadata inside it, as the pt2 program does: logits, how windows stitch
    extra = {"metadata.json": ""}
    torch.jit.load(str(tmp_path / "adapted.ts"), _extra_files=extra)
    meta = json.loads(extra["metadata.json"])
    assert "logits" in meta["pred_classes"] and "nearest" in meta["sliding_window"] and meta["asfda"]["adapted"]


def _trusted_bundle(folder: Path) -> Path:
    """A bundle whose network_def holds an expression (so it needs --trust), with its own licence,
    metadata and a docs folder, built from the built-in model's weights."""
    from ASFDALib.models.defaults import default_model_path
    from ASFDALib.models.export import inference_config

    base = load_model(default_model_path())
    network_def = {"_target_": "UNet", **base.spec.args, "channels": "$[8, 16, 32, 64]"}
    config = inference_config(base.card, network_def)
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "docs").mkdir()
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    meta = {
        "version": "1.2.0",
        "name": "lab-abdomen",
        "authors": "Example Lab",
        "license": "CC-BY-4.0",
        "changelog": {"1.2.0": "first release"},
        "required_packages_version": {"einops": "0.7"},
        "network_data_format": {"outputs": {"pred": {"channel_def": dict(enumerate(base.card.class_names))}}},
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    (folder / "docs" / "README.md").write_text("how to use it\n")
    (folder / "LICENSE").write_text("Creative Commons Attribution 4.0\n")
    card = {k: v for k, v in base.card.to_dict().items() if k not in ("network", "source_stats")}
    (folder / "asfda_card.json").write_text(json.dumps(card))
    torch.save(base.network.state_dict(), folder / "models" / "model.pt")
    return folder


def test_a_trusted_bundle_is_re_exported_as_the_same_bundle_with_the_adapted_weights(tmp_path, small_pool):
    from ASFDALib.adaptation.pipeline import session_model
    from ASFDALib.adaptation.session import Session
    from ASFDALib.errors import TrustRequiredError

    _needs_ignite()
    base = _trusted_bundle(tmp_path / "base_bundle")
    session = _adapt(tmp_path, small_pool / "images", small_pool / "labels", ["--model", str(base), "--trust"])
    out = tmp_path / "adapted_bundle"
    assert main(["export", str(session), "--out", str(out)]) == 0
    assert (out / "configs" / "inference.json").read_text() == (base / "configs" / "inference.json").read_text()
    assert (out / "docs" / "README.md").is_file() and (out / "LICENSE").is_file()
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["version"] == "1.2.0+asfda" and meta["changelog"]["1.2.0"] == "first release"
    assert meta["authors"] == "Example Lab" and meta["name"] == "lab-abdomen" and meta["license"] == "CC-BY-4.0"
    packages = meta["required_packages_version"]
    assert packages["einops"] == "0.7" and "pytorch-ignite" in packages  # the base's needs, and MONAI's runner's
    assert meta["asfda"]["rounds"] == 1 and meta["target_domain"]["volumes"] == 2
    assert meta["base_model"] == {**meta["base_model"], "name": "lab-abdomen", "license": "CC-BY-4.0", "form": "bundle"}
    with pytest.raises(TrustRequiredError):
        load_model(out)  # still the base bundle's code: the same trust as the base
    adapted_model = session_model(Session.open(session))
    back = load_model(out, trust=True)
    for key, value in adapted_model.network.state_dict().items():
        assert torch.equal(back.network.state_dict()[key], value), key
    assert not torch.equal(
        adapted_model.network.state_dict()["model.0.conv.unit0.conv.weight"],
        load_model(base, trust=True).network.state_dict()["model.0.conv.unit0.conv.weight"],
    )
    (tmp_path / "one").mkdir()
    shutil.copy(REAL_MRI, tmp_path / "one" / REAL_MRI.name)
    run = _monai_bundle_run(out, tmp_path / "one", tmp_path / "pred")  # and it still runs as a bundle
    assert run.returncode == 0, run.stderr[-3000:]
    assert [p.name for p in (tmp_path / "pred").iterdir()] == ["sub-mri_label-6_T2w_seg.nii.gz"]


def test_export_never_writes_into_the_base_model(tmp_path, small_pool, capsys):
    base = _trusted_bundle(tmp_path / "base_bundle")
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    rank = ["rank", "--model", str(base), "--trust", "--images", str(small_pool / "images")]
    assert main([*rank, "--out", str(tmp_path / "s")]) == 0
    assert main(["export", str(tmp_path / "s"), "--out", str(base / "adapted"), "--source-model"]) == 1
    assert "would overwrite the base model" in capsys.readouterr().err
    for fmt in ("torchscript", "pt2"):  # nor a program and its card into the bundle's models/
        export = ["export", str(tmp_path / "s"), "--format", fmt, "--out", str(base / "models"), "--source-model"]
        assert main(export) == 1
        assert "would overwrite the base model" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file()} == before


def test_a_pt2_program_round_trips_and_predicts_the_session_models_labels(adapted, tmp_path):
    from ASFDALib.adaptation.pipeline import session_model
    from ASFDALib.adaptation.session import Session
    from ASFDALib.data.preprocess import preprocess
    from ASFDALib.data.volumes import read_volume
    from ASFDALib.errors import TrustRequiredError
    from ASFDALib.inference.predict import predict_label
    from ASFDALib.models.program import METADATA_ENTRY

    _, session, inputs = adapted
    assert main(["export", str(session), "--format", "pt2", "--out", str(tmp_path)]) == 0
    path = tmp_path / "model.pt2"
    assert (tmp_path / "model.card.json").is_file()
    with pytest.raises(TrustRequiredError, match="unpickles"):
        load_model(path)
    program = load_model(path, trust=True)
    model = session_model(Session.open(session))
    assert program.kind == "pt2" and program.scripted and program.card.class_names == model.card.class_names
    for image in sorted(inputs.iterdir()):
        volume = preprocess(read_volume(image), model.card)
        np.testing.assert_array_equal(
            predict_label(program.network, volume, program.card, "cpu"),
            predict_label(model.network, volume, model.card, "cpu"),
        )
    extra = {METADATA_ENTRY: ""}
    torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra[METADATA_ENTRY])["asfda"]["rounds"] == 1  # the provenance travels inside the program


def test_a_pt2_program_is_a_model_form_asfda_ranks_with(adapted, tmp_path, capsys):
    _, session, inputs = adapted
    assert main(["export", str(session), "--format", "pt2", "--out", str(tmp_path / "net.pt2")]) == 0
    said = " ".join(capsys.readouterr().out.split())  # both files written are named
    assert f"Exported pt2 to {tmp_path / 'net.pt2'}, its card to {tmp_path / 'net.card.json'}" in said
    # no source statistics named: a program's layers cannot be tapped, so none could serve it; the export says so
    assert "source_stats" not in json.loads((tmp_path / "net.card.json").read_text())
    assert "Its source statistics stay behind (a program has no layer to tap)" in said
    assert "by the head's free energy; a bundle keeps them" in said  # the built-in model exports as a bundle too
    command = ["rank", "--model", str(tmp_path / "net.pt2"), "--trust", "--images", str(inputs)]
    assert main([*command, "--out", str(tmp_path / "s"), "--budget", "1"]) == 0
    report = json.loads((tmp_path / "s" / "ranking.json").read_text())
    assert report["knowledge"] == "energy"  # a program's layers cannot be tapped, like TorchScript's
    assert len(report["selected"]) == 1


def test_an_export_named_m_pt2_or_m_ts_without_format_is_written_in_the_format_its_name_says(adapted, tmp_path):
    """Without --format a name's suffix chooses the program (a bundle folder named m.pt2 would not load as one)."""
    _, session, _ = adapted
    for name, kind in (("m.pt2", "pt2"), ("m.ts", "torchscript")):
        assert main(["export", str(session), "--out", str(tmp_path / name)]) == 0
        assert (tmp_path / name).is_file() and load_model(tmp_path / name, trust=True).kind == kind
        assert (tmp_path / "m.card.json").is_file()
        (tmp_path / "m.card.json").unlink()  # the two programs would share it


def test_a_scripted_model_asked_for_as_a_bundle_is_pointed_to_its_own_format(adapted, tmp_path, capsys):
    """A TorchScript model is not a MONAI network by name: the refusal names the format that takes it."""
    from ASFDALib.errors import ModelError
    from ASFDALib.models.export import export_bundle

    _, session, _ = adapted
    assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    with pytest.raises(ModelError) as refused:
        export_bundle(load_model(tmp_path / "m.ts", trust=True), tmp_path / "bundle")
    assert str(refused.value) == (
        f"{tmp_path / 'm.ts'}: this model is a TorchScript model, with no MONAI network by name, so it cannot be a "
        "MONAI bundle; export it with --format torchscript"
    )


@pytest.mark.parametrize(
    ("fmt", "chosen", "written", "load_back"),
    [
        ("bundle", "bundle", "bundle", "Load it back as the Setup's model; MONAI Label and MONAI's bundle runner"),
        ("pt2", "net", "net.pt2", "Load it back as the Setup's model with Trust this file ticked"),
        ("torchscript", "net.ts", "net.ts", "Load it back as the Setup's model with Trust this file ticked"),
    ],
)
def test_the_panel_exports_the_sessions_model_in_each_format_and_says_how_to_load_it_back(
    adapted, tmp_path, fmt, chosen, written, load_back
):
    """Export in the panel writes what asfda export writes, to the name chosen in its dialog (a file named without
    a suffix gets the format's), and the message names the files, the model and how it loads back."""
    from ASFDALib.adaptation.pipeline import session_model
    from ASFDALib.adaptation.session import Session
    from ASFDALib.app.workflow import PanelSettings, Workflow
    from ASFDALib.errors import TrustRequiredError

    _, session, _ = adapted
    flow = Workflow(PanelSettings(session=str(session)))
    assert flow.export_format() == "bundle"  # a MONAI network: a bundle carries it
    exported = flow.export(tmp_path / chosen, fmt)
    path = tmp_path / written
    card = "" if fmt == "bundle" else f", its card to {path.with_suffix('.card.json')}"
    assert exported.path == path and exported.message.startswith(
        f"Exported {fmt} to {path}{card}: round 1's fine-tuned model (checkpoints/round1/final.pt). {load_back}"
    )
    assert "--" not in exported.message  # the panel has no options to name
    if fmt != "bundle":
        with pytest.raises(TrustRequiredError):
            load_model(path)
    loaded, model = load_model(path, trust=fmt != "bundle"), session_model(Session.open(session))
    assert loaded.card.class_names == model.card.class_names
    window = torch.randn(1, 1, *model.card.roi_size)
    with torch.no_grad():
        assert torch.allclose(loaded.network(window), model.network(window), atol=1e-5)


def test_the_panel_export_refuses_what_asfda_export_refuses_and_names_a_file_it_takes(adapted, tmp_path):
    """One set of checks for the command and the panel: an existing export, a card another export wrote (m.pt2 and
    m.ts share m.card.json), a folder with files, the session folder; nothing is written over."""
    from ASFDALib.app.workflow import PanelSettings, Workflow
    from ASFDALib.errors import ASFDAError

    _, session, _ = adapted
    flow = Workflow(PanelSettings(session=str(session)))
    flow.export(tmp_path / "m.pt2", "pt2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    refusals = [
        ("m.pt2", "pt2", f"{tmp_path / 'm.pt2'}: the file already exists; choose a new file name"),
        (
            "m",
            "torchscript",
            f"{tmp_path / 'm.card.json'}: the card written beside the export (it is m.pt2's: a card is named by the "
            f"file's stem) already exists; choose a new file name, e.g. {tmp_path / 'm_ts.ts'}",
        ),
        (".", "bundle", f"{tmp_path}: a folder with files in it already exists; choose a new folder for the export"),
    ]
    for chosen, fmt, said in refusals:
        with pytest.raises(ASFDAError) as refused:
            flow.export(tmp_path / chosen, fmt)
        assert str(refused.value) == said
    with pytest.raises(ASFDAError, match="is inside the session folder"):
        flow.export(session / "m.pt2", "pt2")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and not (session / "m.pt2").exists()


def test_the_panels_export_completes_a_program_whose_export_stopped_after_its_card(adapted, tmp_path, monkeypatch):
    """Slicer closed after the card was written: the same Export again finishes the program, as the command does."""
    from ASFDALib.app.workflow import PanelSettings, Workflow
    from ASFDALib.models import export

    _, session, _ = adapted
    flow = Workflow(PanelSettings(session=str(session)))
    written = export.atomic_write_json

    def stopped(path, obj):
        written(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "atomic_write_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        flow.export(tmp_path / "k.ts", "torchscript")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".k.ts.partial", "k.card.json"]
    assert flow.export(tmp_path / "k.ts", "torchscript").path == tmp_path / "k.ts"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.card.json", "k.ts"]


def test_the_panels_export_runs_in_the_worker_and_gives_what_it_wrote_when_it_ends(adapted, tmp_path):
    """A program's trace takes minutes for a large network: in the worker, Slicer stays responsive. Nothing else
    starts meanwhile, and it has no Cancel (the trace has no point to stop at); what it wrote is given once."""
    from ASFDALib.app.workflow import PanelSettings, Workflow
    from ASFDALib.errors import ASFDAError

    _, session, _ = adapted
    flow = Workflow(PanelSettings(session=str(session)))
    flow.start_export(tmp_path / "net", "pt2")
    assert flow.busy and flow.progress_text == "Exporting pt2 to net.pt2…"
    assert flow.check("next_round") == (False, "wait for exporting to finish")
    assert flow.check("cancel") == (False, "exporting cannot be stopped part-way")
    with pytest.raises(ASFDAError, match="^wait for exporting to finish$"):
        flow.export(tmp_path / "other.pt2", "pt2")
    flow.cancel()  # Slicer closing the panel cancels its job: an export goes on to its end
    flow.wait()
    exported, error = flow.take_export()
    assert error == "" and exported.path == tmp_path / "net.pt2" and (tmp_path / "net.card.json").is_file()
    assert flow.log[-1] == exported.message and flow.progress_text == "Exported pt2 to net.pt2"
    assert flow.take_export() is None and not flow.busy and flow.check("export")[0]
    assert load_model(exported.path, trust=True).kind == "pt2"


def test_an_export_the_worker_refuses_gives_why_when_it_ends(adapted, tmp_path):
    """asfda export's refusals come before the model loads, in the worker too, and reach the panel's message box."""
    from ASFDALib.app.workflow import PanelSettings, Workflow

    _, session, _ = adapted
    (tmp_path / "taken.ts").write_bytes(b"the user's file")
    flow = Workflow(PanelSettings(session=str(session)))
    flow.start_export(tmp_path / "taken.ts", "torchscript")
    flow.wait()
    refusal = f"{tmp_path / 'taken.ts'}: the file already exists; choose a new file name"
    assert flow.take_export() == (None, refusal)
    assert flow.log[-1] == f"exporting failed: {refusal}" and flow.progress_text == "Export failed: see the message"
    assert (tmp_path / "taken.ts").read_bytes() == b"the user's file" and not flow.busy


def test_the_panel_says_which_button_records_a_finished_run_session_json_missed(adapted, tmp_path):
    """Slicer killed between run.json and session.json of an extension: the panel's Export says what to press
    (not an asfda command), Rank and Next round are disabled saying so, and that button (Continue the last run)
    records the run, training nothing."""
    from ASFDALib.app.workflow import PanelSettings, Workflow
    from ASFDALib.errors import ASFDAError

    session = shutil.copytree(adapted[1], tmp_path / "session")
    before = (session / "session.json").read_bytes()
    extend = ["finetune", str(session), "--extend", "--iterations", "6", "--no-pseudo", "--batch-size", "1"]
    assert main(extend) == 0
    final = (session / "checkpoints" / "round1" / "final.pt").read_bytes()
    (session / "session.json").write_bytes(before)  # what the kill leaves: session.json as the extension began
    flow = Workflow(PanelSettings(session=str(session)))
    pending = (
        f"{session}: round 1's fine-tune finished, but session.json does not record its model yet (stage 1: 6 "
        "iterations, stage 2: 0); press Continue the last run to record it"
    )
    with pytest.raises(ASFDAError) as refused:
        flow.export(tmp_path / "m.pt2", "pt2")
    assert str(refused.value) == f"{pending}, then export"
    disabled = (  # the engine refuses that rank too: the buttons say why and what to press
        "this round's fine-tune finished but session.json does not record its model yet: Continue the last run "
        "first (or Train again from the round's start)"
    )
    assert flow.check("rank") == flow.check("next_round") == (False, disabled)
    assert flow.finetune_mode() == "resume" and flow.check("finetune") == (
        True,
        "record the finished run's model, which session.json does not yet (its process was stopped)",
    )
    flow.start_finetune(flow.finetune_mode())
    flow.wait()
    assert flow.last_run == "round 1's run had finished: nothing left to run"
    assert (session / "checkpoints" / "round1" / "final.pt").read_bytes() == final  # nothing trained again
    assert flow.export(tmp_path / "m.pt2", "pt2").message.startswith(f"Exported pt2 to {tmp_path / 'm.pt2'}")


def test_the_networks_the_panel_knows_no_bundle_carries_are_those_asfda_builds_itself():
    """The panel offers a format from session.json without importing torch: its list is the loader's."""
    from ASFDALib.models.formats import OWN_NETWORKS, default_format
    from ASFDALib.models.loading import ASFDA_NETWORKS

    assert set(OWN_NETWORKS) == set(ASFDA_NETWORKS)
    assert [default_format(kind, None) for kind in ("bundle", "torchscript", "pt2")] == ["bundle", "torchscript", "pt2"]
    assert default_format("state_dict", "UNet") == "bundle"


def test_a_session_on_a_torchscript_model_fine_tunes_with_its_pseudo_labels(adapted, small_pool, tmp_path):
    """A TorchScript model takes no forward hooks: the memory check measures what autograd saves instead, and
    the two stages train its parameters as any network's."""
    _, session, _ = adapted
    assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    root = tmp_path / "ts"
    root.mkdir()
    new = _adapt(root, small_pool / "images", small_pool / "labels", ["--model", str(tmp_path / "m.ts"), "--trust"])
    finetune = ["finetune", str(new), "--restart", "--iterations", "2", "--pseudo-iterations", "1", "--batch-size", "1"]
    assert main([*finetune, "--min-agreement", "0"]) == 0
    run = json.loads((new / "checkpoints" / "round1" / "run.json").read_text())
    assert run["done"] == {"stage1": 2, "stage2": 1} and run["finished"]


def test_a_single_file_export_never_writes_over_a_card_where_its_own_would_go(adapted, tmp_path, capsys):
    """model.ts comes with model.card.json beside it: an existing one (another model's) is refused first."""
    _, session, _ = adapted
    (tmp_path / "k.card.json").write_text("{}")
    assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / "k.ts")]) == 1
    assert "k.card.json: the card written beside the export already exists" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "k.card.json").read_text() == "{}" and not (tmp_path / "k.ts").exists()


def test_a_second_format_exported_under_the_first_ones_name_is_told_the_card_is_the_others_and_a_name(
    adapted, tmp_path, capsys
):
    """m.pt2 and m.ts would share m.card.json: the refusal says whose card it is and names a file that works."""
    _, session, _ = adapted
    assert main(["export", str(session), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    capsys.readouterr()
    assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 1
    said = " ".join(capsys.readouterr().err.split())
    assert "m.card.json: the card written beside the export (it is m.pt2's: a card is named by the file's stem)" in said
    assert said.endswith(f"choose a new file name, e.g. --out {tmp_path / 'm_ts.ts'}")
    assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / "m_ts.ts")]) == 0


@pytest.mark.parametrize("fmt, name", [("torchscript", "k.ts"), ("pt2", "k.pt2")])
def test_a_single_file_export_stopped_after_its_card_is_completed_by_the_same_command(
    adapted, tmp_path, monkeypatch, capsys, fmt, name
):
    """Ctrl-C (or a kill) after the card is written and before the model file: no model file that loads without
    its card, and the rerun knows the card as its own export's (its model beside it, hidden), not a user's file."""
    from ASFDALib.models import export

    _, session, _ = adapted
    argv = ["export", str(session), "--format", fmt, "--out", str(tmp_path / name)]
    written = export.atomic_write_json

    def stopped(path, obj):
        written(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "atomic_write_json", stopped)
    assert main(argv) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.partial", "k.card.json"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0
    assert f"its card to {tmp_path / 'k.card.json'}" in " ".join(capsys.readouterr().out.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.card.json", name]  # the hidden model moved in
    clean = tmp_path / "clean"
    assert main(["export", str(session), "--format", fmt, "--out", str(clean / name)]) == 0
    card = json.loads((tmp_path / "k.card.json").read_text())
    assert card == json.loads((clean / "k.card.json").read_text()) and "adapted with ASFDA" in card["description"]
    assert load_model(tmp_path / name, trust=True).card.class_names == card["class_names"]  # loads with its card
    assert main(argv) == 1  # finished: the same command now refuses to write over it
    assert f"{tmp_path / name}: the file already exists" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("fmt, name", [("torchscript", "k.ts"), ("pt2", "k.pt2"), ("bundle", "kb")])
def test_an_export_run_again_removes_the_scratch_a_killed_export_left(adapted, tmp_path, fmt, name):
    """SIGKILL mid-write leaves hidden scratch (the staged program's, the card's, a bundle's scratch folder): the
    rerun, whose outputs they were, removes them; another program's hidden file beside them stays."""
    _, session, _ = adapted
    left = [tmp_path / f"..{name}.partial.k2j4x.tmp", tmp_path / ".k.card.json.q8w1z.tmp"]
    for path in (*left, tmp_path / ".notes.tmp"):
        path.write_bytes(b"half written")
    (tmp_path / f".{name}.z7y6x.tmp" / "configs").mkdir(parents=True)
    left.append(tmp_path / f".{name}.z7y6x.tmp")
    assert main(["export", str(session), "--format", fmt, "--out", str(tmp_path / name)]) == 0
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    expected = [".notes.tmp"] if fmt == "bundle" else [".notes.tmp", f".{name}.z7y6x.tmp"]
    expected += [p.name for p in left[:2]] if fmt == "bundle" else []
    assert hidden == sorted(expected)


@pytest.mark.parametrize(
    "fmt, name, said",
    [
        ("torchscript", "m.pt2", "a .pt2 file is loaded as a torch.export program, so TorchScript named so would not"),
        ("pt2", "m.ts", "a torch.export program is loaded by its .pt2 suffix; name the file *.pt2"),
    ],
)
def test_a_program_named_with_the_other_formats_suffix_is_refused_before_the_model_loads(
    adapted, tmp_path, monkeypatch, capsys, fmt, name, said
):
    """ASFDA reads a .pt2 file as a torch.export program: TorchScript written as m.pt2 would not load back (the
    line would still say to load it so), and a program named m.ts would not either; refused before any work."""
    from ASFDALib.adaptation import pipeline

    _, session, _ = adapted

    def loaded(*_args, **_kwargs):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(pipeline, "session_model", loaded)
    assert main(["export", str(session), "--format", fmt, "--out", str(tmp_path / name)]) == 1
    assert f"{tmp_path / name}: {said}" in " ".join(capsys.readouterr().err.split())
    assert list(tmp_path.iterdir()) == []


def test_two_exports_whose_names_differ_after_the_first_dot_keep_a_card_each(adapted, tmp_path):
    """adapted.r1.ts and adapted.r2.ts side by side: adapted.r1.card.json and adapted.r2.card.json."""
    _, session, _ = adapted
    for name in ("adapted.r1.ts", "adapted.r2.ts"):
        assert main(["export", str(session), "--format", "torchscript", "--out", str(tmp_path / name)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.card.json")) == ["adapted.r1.card.json", "adapted.r2.card.json"]


def test_a_card_an_earlier_export_named_before_the_first_dot_is_still_found(tmp_path):
    """Exports before 2026-12-06 wrote adapted.card.json beside adapted.r1.ts: it is read after adapted.r1.card.json."""
    from ASFDALib.models.loading import card_candidates

    weights = tmp_path / "adapted.r1.ts"
    assert card_candidates(weights)[:2] == [tmp_path / "adapted.r1.card.json", tmp_path / "adapted.card.json"]
    assert card_candidates(tmp_path / "model.ts")[0] == tmp_path / "model.card.json"


def test_pt2_needs_trust_because_torch_export_load_runs_pickled_code(tmp_path):
    """A crafted archive: torch.export.load runs its payload; ASFDA refuses it before reading a byte."""
    from ASFDALib.errors import TrustRequiredError

    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    program = torch.export.export(torch.nn.Conv3d(1, 4, 3, padding=1), (torch.zeros(1, 1, 8, 8, 8),))
    good = io.BytesIO()
    torch.export.save(program, good)
    payload = io.BytesIO()
    torch.save(Payload(), payload)
    crafted = tmp_path / "crafted.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crafted, "w") as dst:
        for item in src.infolist():
            is_sample = item.filename.endswith("sample_inputs/model.pt")
            dst.writestr(item, payload.getvalue() if is_sample else src.read(item.filename))
    card = tmp_path / "crafted.card.json"
    card.write_text(json.dumps({"class_names": ["background", "a", "b", "c"], "roi_size": [8, 8, 8]}))
    with pytest.raises(TrustRequiredError):
        load_model(crafted)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - whatever it fails with, the payload has already run
        torch.export.load(str(crafted))
    assert marker.exists()


def test_a_pt2_program_with_device_literals_moves_to_another_device(tmp_path):
    """SwinUNETR's exported graph creates its attention masks on the export device; the loaded program
    still runs after a move (on the meta device here: it checks devices as CUDA would, without a GPU)."""
    from monai.networks.nets import SwinUNETR

    from ASFDALib.models.card import ModelCard
    from ASFDALib.models.program import export_program

    network = SwinUNETR(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), spatial_dims=3)
    export_program(network, (64, 64, 64), tmp_path / "swin.pt2")
    card = ModelCard(["background", "a", "b"], roi_size=(64, 64, 64))
    model = load_model(tmp_path / "swin.pt2", card, trust=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "copying into a meta parameter is a no-op": meta only
        moved = model.network.to("meta")
    with torch.no_grad():
        assert moved(torch.zeros(2, 1, 64, 64, 64, device="meta")).shape == (2, 3, 64, 64, 64)


def test_the_export_record_says_pseudo_labels_only_when_a_volume_was_pseudo_labelled():
    from ASFDALib.models.export import _method

    ran = {"strategy": {"name": "asfda"}, "iterations": {"stage1": 4, "stage2": 2}}
    assert "with selective pseudo-labels" in _method([{**ran, "pseudo_labelled": ["p0.nii.gz"]}])
    assert "longer on the labels alone (no unlabelled volume passed" in _method([{**ran, "pseudo_labelled": []}])
    assert "(no pseudo-label stage)" in _method([{**ran, "iterations": {"stage1": 4}, "pseudo_labelled": []}])
