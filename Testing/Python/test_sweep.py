"""The one-pass sweep: window tiling, and agreement with a plain MONAI sliding-window inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ASFDALib.inference.sweep import SweepConfig, sweep
from ASFDALib.inference.windows import core_bounds, iter_windows, window_starts
from ASFDALib.query import scoring


@pytest.mark.parametrize("size,roi,overlap", [(100, 48, 0.25), (48, 48, 0.5), (30, 48, 0.25), (97, 32, 0.0)])
def test_window_cores_cover_every_voxel_exactly_once(size, roi, overlap):
    starts = window_starts(max(size, roi), roi, overlap)
    covered = np.zeros(max(size, roi), int)
    for start, (lo, hi) in zip(starts, core_bounds(starts, roi, max(size, roi))):
        assert start <= lo < hi <= start + roi
        covered[lo:hi] += 1
    assert np.all(covered == 1)


def test_windows_in_3d_tile_the_volume():
    covered = np.zeros((60, 50, 48), int)
    for window, core in iter_windows((60, 50, 48), (32, 32, 32), 0.25):
        assert all(w.stop - w.start == 32 for w in window)
        covered[core] += 1
    assert np.all(covered == 1)


def test_sweep_matches_full_inference_when_windows_do_not_overlap(default_model):
    """With overlap 0, ASD, entropy and the label map equal those computed from MONAI's stitched logits."""
    from monai.inferers import sliding_window_inference

    from ASFDALib.bench.phantoms import domain_config, make_phantom
    from ASFDALib.data.preprocess import preprocess
    from ASFDALib.data.volumes import Volume

    card = default_model.card
    image, _, affine = make_phantom(5, domain_config("mri"))
    x = preprocess(Volume(image, affine, "mri"), card)[:, :48, :48, :48]
    result = sweep(default_model.network, x, card, SweepConfig(overlap=0.0, keep_label=True, keep_energy=True))
    with torch.no_grad():
        logits = sliding_window_inference(
            x[None].as_subclass(torch.Tensor), card.roi_size, 1, default_model.network, overlap=0.0
        )[0].numpy()
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    entropy = scoring.normalized_entropy(probs)
    fg = 1 - probs[0]
    fg_class = probs[1:].argmax(0).astype(np.uint8) + 1
    region, _ = scoring.adaptive_foreground(fg)
    expected_asd = scoring.class_balanced_entropy(entropy, region, fg_class)
    assert result.asd == pytest.approx(expected_asd, abs=0.01)
    assert result.entropy == pytest.approx(entropy.mean(), abs=0.003)
    np.testing.assert_array_equal(result.label, probs.argmax(0))
    energy = scoring.free_energy(logits)[region].mean()
    assert result.energy == pytest.approx(energy, rel=0.01)
    assert result.fg_ml == pytest.approx((probs.argmax(0) > 0).sum() * 8 / 1000)


def test_sweep_pads_volumes_smaller_than_the_roi(default_model):
    x = torch.rand(1, 20, 30, 40)
    result = sweep(default_model.network, x, default_model.card, SweepConfig(keep_label=True))
    assert result.label.shape == (20, 30, 40)
    assert result.windows == 1
    assert np.isfinite(result.asd)
    assert result.class_fractions.sum() == pytest.approx(1.0)


def test_sweep_refuses_a_card_with_the_wrong_class_count(default_model):
    from dataclasses import replace

    from ASFDALib.errors import ModelError

    card = replace(default_model.card, class_names=["background", "organ"])
    with pytest.raises(ModelError, match="4 channels but its card lists 2"):
        sweep(default_model.network, torch.rand(1, 48, 48, 48), card)


def test_window_batch_follows_free_gpu_memory():
    from ASFDALib.inference.windows import batch_for_memory

    roi = (96, 96, 96)  # 0.88 M voxels: about 226 MB a window at 256 B/voxel
    assert batch_for_memory(1 * 2**30, roi) == 2
    assert batch_for_memory(80 * 2**30, roi) == 16  # capped
    assert batch_for_memory(10 * 2**20, roi) == 1  # never zero


def test_a_float16_volume_scores_as_its_float32_original(default_model):
    """``asfda rank`` holds the resampled volume as float16 (half the memory); the scores barely move."""
    from ASFDALib.bench.phantoms import domain_config, make_phantom
    from ASFDALib.data.preprocess import compact, preprocess
    from ASFDALib.data.volumes import Volume

    image, _, affine = make_phantom(2, domain_config("mri"))
    full = preprocess(Volume(image, affine, None), default_model.card)
    half = compact(full)
    assert half.dtype == torch.float16 and half.shape == full.shape
    a = sweep(default_model.network, full, default_model.card, SweepConfig(device="cpu"))
    b = sweep(default_model.network, half, default_model.card, SweepConfig(device="cpu"))
    assert b.asd == pytest.approx(a.asd, rel=2e-3)
    assert b.entropy == pytest.approx(a.entropy, rel=2e-3)
    assert b.fg_ml == pytest.approx(a.fg_ml, rel=2e-3)


def test_compact_keeps_float32_where_float16_would_overflow():
    from ASFDALib.data.preprocess import compact

    assert compact(torch.tensor([[0.0, 1.0]])).dtype == torch.float16
    assert compact(torch.tensor([[0.0, 70000.0]])).dtype == torch.float32


def test_the_label_map_asfda_predict_writes_equals_the_sweeps_argmax(default_model, tmp_path):
    """Scoring and prediction share one window engine: the segmentation a clinician is shown for a case is
    the sweep's own argmax, voxel for voxel, on the volume's own grid (overlapping windows included)."""
    from ASFDALib.adaptation.session import Session
    from ASFDALib.app.cli import main
    from ASFDALib.bench.phantoms import write_phantoms
    from ASFDALib.data.preprocess import labels_to_native, preprocess
    from ASFDALib.data.volumes import read_volume

    write_phantoms(tmp_path / "pool", 2, "mri", seed=11, labels=False)
    images = tmp_path / "pool" / "images"
    session = tmp_path / "session"
    assert main(["rank", "--images", str(images), "--out", str(session), "--budget", "1", "--device", "cpu"]) == 0
    assert main(["predict", str(session), "--images", str(images), "--out", str(tmp_path / "pred")]) == 0
    model = default_model
    for path in sorted(images.iterdir()):
        volume = read_volume(path)
        x = preprocess(volume, model.card)
        label = sweep(model.network, x, model.card, SweepConfig(device="cpu", keep_label=True)).label
        expected = labels_to_native(label, x.affine.numpy(), volume.array.shape, volume.affine)
        written = read_volume(tmp_path / "pred" / path.name, allow_constant=True).array
        np.testing.assert_array_equal(written, expected)
    assert Session.open(session).adapted_checkpoint() is None


def test_class_maps_widen_beyond_127_foreground_classes():
    from ASFDALib.errors import ModelError
    from ASFDALib.inference.sweep import class_map_layout

    assert class_map_layout(128) == (np.uint8, 128)
    assert class_map_layout(129) == (np.uint16, 1 << 15)
    with pytest.raises(ModelError, match="at most 256"):
        class_map_layout(300)


def test_a_card_with_more_classes_than_an_8_bit_label_map_holds_is_refused_in_one_line():
    from ASFDALib.errors import ModelError
    from ASFDALib.models.card import ModelCard

    names = ["background", *[f"c{i}" for i in range(1, 300)]]
    with pytest.raises(ModelError, match="300 classes; ASFDA supports up to 255 foreground classes plus background"):
        ModelCard(name="too-wide", class_names=names)
    assert ModelCard(name="widest", class_names=names[:256]).num_classes == 256


def test_a_model_with_200_classes_keeps_every_class_in_the_sweep():
    """A TotalSegmentator-sized head: classes above 127 are counted and labelled, not folded onto others."""
    from ASFDALib.models.card import ModelCard

    card = ModelCard(name="wide", class_names=["background", *[f"c{i}" for i in range(1, 200)]], roi_size=[16, 16, 16])

    class Fixed(torch.nn.Module):
        """Logits that make class 150 win in the left half and class 3 in the right half."""

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 200, *x.shape[2:])
            logits[:, 150, :8] = 5.0
            logits[:, 3, 8:] = 5.0
            return logits

    result = sweep(Fixed(), torch.rand(1, 16, 16, 16), card, SweepConfig(device="cpu", keep_label=True))
    assert set(np.unique(result.label)) == {3, 150}
    assert result.class_fractions[150] == pytest.approx(0.5)
    assert result.class_fractions[3] == pytest.approx(0.5)
