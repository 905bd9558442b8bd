"""Fine-tuning: the loss, the reliability gate, exact resume, cancel, and a real gain in target Dice."""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ASFDALib.adaptation.loss import IGNORE_INDEX, dice_ce_loss
from ASFDALib.adaptation.patches import Case
from ASFDALib.adaptation.pseudo import (
    agreed_label,
    class_agreement,
    keep_reliable,
    pseudo_label,
    reliability,
    selective_pseudo_labels,
)
from ASFDALib.adaptation.recipe import FinetuneConfig, lr_factor, ramp
from ASFDALib.adaptation.trainer import Trainer
from ASFDALib.bench.phantoms import domain_config, make_phantom
from ASFDALib.data.preprocess import preprocess
from ASFDALib.data.volumes import Volume
from ASFDALib.models.loading import load_model


def test_ignored_voxels_contribute_no_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, 6, requires_grad=True)
    target = torch.randint(0, 4, (2, 6, 6, 6))
    target[:, :3] = IGNORE_INDEX
    dice_ce_loss(logits, target).backward()
    assert torch.all(logits.grad[:, :, :3] == 0)
    assert torch.any(logits.grad[:, :, 3:] != 0)


def test_an_all_ignored_batch_has_zero_loss():
    logits = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    loss = dice_ce_loss(logits, torch.full((1, 4, 4, 4), IGNORE_INDEX))
    assert loss.item() == 0.0


def test_perfect_prediction_has_near_zero_loss():
    target = torch.randint(0, 3, (1, 8, 8, 8))
    logits = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float() * 50
    assert dice_ce_loss(logits, target).item() < 1e-3


def test_pseudo_weight_ramps_up_to_one():
    assert ramp(0, 100, 0.3) == pytest.approx(np.exp(-5))
    assert ramp(30, 100, 0.3) == 1.0 and ramp(90, 100, 0.3) == 1.0


def test_a_cosine_stage_2_starts_at_the_base_rate_halves_midway_and_ends_near_zero():
    assert lr_factor("cosine", 0, 100) == 1.0
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("cosine", 99, 100) == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.99)))
    assert lr_factor("constant", 99, 100) == 1.0
    with pytest.raises(ValueError, match="use one of constant, cosine"):
        lr_factor("step", 1, 100)


def test_low_confidence_voxels_become_ignore_not_background():
    probs = torch.tensor([[0.95, 0.5, 0.05], [0.05, 0.5, 0.95]])
    np.testing.assert_array_equal(pseudo_label(probs, 0.9), [0, IGNORE_INDEX, 1])


def test_reliability_keeps_a_clean_volume_and_rejects_a_corrupted_one(default_model):
    """Clean: a source-like volume; corrupted: the same anatomy with inverted contrast and heavy noise."""
    from ASFDALib.adaptation.pseudo import distance_to_labelled
    from ASFDALib.inference.sweep import sweep

    card = default_model.card

    def prepared(seed, corrupt=False):
        image, _, affine = make_phantom(seed)
        if corrupt:
            rng = np.random.default_rng(seed)
            image = -image + rng.normal(0, 400, image.shape).astype(np.float32)
        return preprocess(Volume(image, affine, Path("x")), card)

    labelled = [sweep(default_model.network, prepared(100), card).summary]
    results = [sweep(default_model.network, prepared(101, corrupt), card) for corrupt in (False, True)]
    scores = reliability(
        np.array([r.asd for r in results]), distance_to_labelled([r.summary for r in results], labelled)
    )
    assert scores[0] > scores[1]
    assert keep_reliable(scores, 0.5) == [0]


def test_class_agreement_is_the_mean_dice_over_the_foreground_classes_either_map_holds():
    first, second = np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2])
    assert class_agreement(first, second) == pytest.approx(2 / 3)  # class 1: 2*1/3, class 2: 2*1/3
    assert class_agreement(first, np.zeros(4, int)) == 0.0  # foreground one view misses entirely
    assert class_agreement(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no organ in either: no evidence


def test_agreed_label_ignores_the_voxels_where_any_view_disagrees():
    label, agreement = agreed_label([np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])])
    np.testing.assert_array_equal(label, [0, 1, IGNORE_INDEX, 2])
    assert agreement == pytest.approx(2 / 3)  # the least agreement of the first view with another


def _pool(card, count=2):
    volumes = [Volume(*make_phantom(200 + i)[::2], Path(f"p{i}")) for i in range(count)]
    return [(v.path.name, preprocess(v, card).numpy()) for v in volumes]


def test_a_reference_model_that_agrees_everywhere_keeps_the_top_fraction_labelled_in_full(default_model):
    network, card = default_model.network, default_model.card
    pool = _pool(card)
    made = selective_pseudo_labels(
        network, card, [], pool, keep_fraction=0.5, device="cpu", gate="rounds", reference=network
    )
    assert made.reliability == {"p0": 1.0, "p1": 1.0} and made.kept == ["p0"] and made.gate == "rounds"
    assert not np.any(made.labels["p0"] == IGNORE_INDEX) and made.labels["p0"].max() > 0


def _blind(network):
    import copy

    blind = copy.deepcopy(network)
    for parameter in blind.parameters():
        torch.nn.init.zeros_(parameter)  # every logit 0: argmax background everywhere
    return blind


def test_a_reference_model_that_finds_no_organ_keeps_no_volume(default_model):
    """The source model of a new modality: it agrees on no foreground, so the rounds gate keeps nothing."""
    network, card = default_model.network, default_model.card
    made = selective_pseudo_labels(
        network, card, [], _pool(card), 1.0, min_agreement=0.0, device="cpu", gate="rounds", reference=_blind(network)
    )
    assert made.kept == [] and made.labels == {} and set(made.reliability.values()) == {0.0}  # even with no floor


def test_where_the_reference_model_finds_no_organ_the_fallback_gate_judges_and_the_record_says_so(default_model):
    """A gate that keeps no volume hands over to its fallback and the record says so; each gate tells of every
    volume it judges, so that long scoring shows progress."""
    network, card = default_model.network, default_model.card
    pool, blind = _pool(card), _blind(network)
    heard = []
    made = selective_pseudo_labels(
        network, card, [], pool, 1.0, 0.9, "cpu", "rounds", 0.0, blind, "flips", lambda *told: heard.append(told)
    )
    n = len(pool)  # each gate that judged told of every volume, in turn
    assert heard == [("rounds", i, n) for i in range(1, n + 1)] + [("flips", i, n) for i in range(1, n + 1)]
    flips = selective_pseudo_labels(network, card, [], pool, 1.0, min_agreement=0.0, device="cpu", gate="flips")
    assert (made.gate, made.asked, made.asked_best) == ("flips", "rounds", 0.0)
    assert made.reliability == flips.reliability and made.kept == flips.kept and len(made.kept) == 2
    for name in made.kept:
        np.testing.assert_array_equal(made.labels[name], flips.labels[name])
    # a gate that keeps volumes is not second-guessed
    kept = selective_pseudo_labels(
        network, card, [], pool, 0.5, device="cpu", gate="rounds", reference=network, fallback="flips"
    )
    assert (kept.gate, kept.asked) == ("rounds", "")


def test_flipped_views_are_flipped_back_onto_the_volume(default_model):
    """A voxel-wise network commutes with flips: every view, flipped back, equals the plain prediction."""
    from ASFDALib.adaptation.pseudo import flipped_views

    card = default_model.card
    voxelwise = torch.nn.Conv3d(1, card.num_classes, 1)
    with torch.no_grad():
        voxelwise.weight.copy_(torch.arange(card.num_classes, dtype=torch.float32).view(-1, 1, 1, 1, 1))
        voxelwise.bias.copy_(-(torch.arange(card.num_classes, dtype=torch.float32) ** 2) / 2)
    image = np.random.default_rng(0).uniform(0, card.num_classes, (1, 40, 36, 32)).astype(np.float32)
    views = flipped_views(voxelwise, image, card, "cpu")
    assert len(views) == 4 and len(np.unique(views[0])) == card.num_classes  # an asymmetric label map
    for view in views[1:]:
        np.testing.assert_array_equal(view, views[0])


def test_flip_agreement_labels_only_where_the_flipped_predictions_agree(default_model):
    from ASFDALib.inference.predict import predict_label

    network, card = default_model.network, default_model.card
    pool = _pool(card, 1)
    made = selective_pseudo_labels(
        network, card, [], pool, keep_fraction=1.0, min_agreement=0.0, device="cpu", gate="flips"
    )
    assert made.kept == ["p0"] and 0.0 < made.reliability["p0"] <= 1.0
    plain, label = predict_label(network, pool[0][1], card, "cpu"), made.labels["p0"]
    agreed = label != IGNORE_INDEX
    np.testing.assert_array_equal(label[agreed], plain[agreed])
    assert agreed.mean() > 0.5


def _cases(card, count=2, seed=0):
    cases = []
    for i in range(count):
        image, label, affine = make_phantom(seed + i, domain_config("mri"))
        x = preprocess(Volume(image, affine, Path(f"c{i}")), card).numpy()
        cases.append(Case(f"c{i}", x, label))
    return cases


def _fresh(model_path):
    return load_model(model_path).network


# the fixed teacher, strong augmentation: a Trainer trains as its config says, and the defaults
# ("ema-if-fallback", "remap-if-fallback") wait for a gate's verdict (recipe.stage2_teacher, stage2_augment)
SMALL = FinetuneConfig(
    iterations=6, batch_size=1, checkpoint_every=2, seed=3, device="cpu", teacher="fixed", pseudo_augment="strong"
)


def test_a_killed_and_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card)
    straight = Trainer(_fresh(default_model.path), card, SMALL, tmp_path / "a")
    assert straight.run(cases, 6) == "done"

    cancel = threading.Event()
    first = Trainer(_fresh(default_model.path), card, SMALL, tmp_path / "b")
    assert first.run(cases, 6, cancel=cancel, progress=lambda p: p.iteration == 3 and cancel.set()) == "cancelled"
    resumed = Trainer(_fresh(default_model.path), card, SMALL, tmp_path / "b")  # a new process, in effect
    assert resumed.load() and resumed.iteration == 3
    assert resumed.run(cases, 6) == "done"
    for key, value in straight.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0)


def test_stage_2_decays_its_rate_stage_1_holds_it_and_a_resume_picks_up_the_decay(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card)
    config = replace(SMALL, stage2_lr="cosine")
    seen = []
    trainer = Trainer(_fresh(default_model.path), card, config, tmp_path / "a")
    base = trainer.base_lrs[0]
    trainer.run(cases, 2, progress=lambda p: seen.append(trainer.optimizer.param_groups[0]["lr"]))
    assert seen == [base, base]
    trainer.begin_stage("stage2")
    seen.clear()
    trainer.run(cases, 4, progress=lambda p: seen.append(trainer.optimizer.param_groups[0]["lr"]))
    assert seen == pytest.approx([base * lr_factor("cosine", i, 4) for i in range(4)])
    # a new process resumes stage 2 at the rate of the step it is on, not the base rate nor the last one saved
    resumed = Trainer(_fresh(default_model.path), card, config, tmp_path / "a")
    assert resumed.load() and (resumed.stage, resumed.iteration) == ("stage2", 4)
    seen.clear()
    resumed.run(cases, 6, progress=lambda p: seen.append(resumed.optimizer.param_groups[0]["lr"]))
    assert seen == pytest.approx([base * lr_factor("cosine", i, 6) for i in (4, 5)])


def test_the_progress_line_says_whether_stage_2_trains_on_pseudo_labels():
    from ASFDALib.adaptation.trainer import Progress

    assert Progress("stage1", 1, 4, 0.5, 1.0).label == "stage 1 (labels)"
    assert Progress("stage2", 1, 4, 0.5, 1.0, pseudo=True).label == "stage 2 (+ pseudo-labels)"
    assert Progress("stage2", 1, 4, 0.5, 1.0).label == "stage 2 (labels alone)"


def test_worker_processes_make_the_same_batches_as_the_main_process(tmp_path, default_model):
    """Batch i is seeded by (seed, rank, stage, i): two data-loader workers give the same training run."""
    card, cases = default_model.card, _cases(default_model.card)
    inline = Trainer(_fresh(default_model.path), card, replace(SMALL, workers=0), tmp_path / "a")
    assert inline.workers == 0 and inline.run(cases, 4) == "done"
    loaded = Trainer(_fresh(default_model.path), card, replace(SMALL, workers=2), tmp_path / "b")
    assert loaded.workers == 2 and loaded.run(cases, 4) == "done"
    for key, value in inline.network.state_dict().items():
        torch.testing.assert_close(loaded.network.state_dict()[key], value, rtol=0, atol=0)


def test_each_stage_and_rank_draws_its_own_batches(default_model):
    from ASFDALib.adaptation.patches import PatchStream

    cases = _cases(default_model.card, 1)
    one = PatchStream(cases, None, default_model.card.roi_size, SMALL, "stage1")
    again = PatchStream(cases, None, default_model.card.roi_size, SMALL, "stage1")
    other = PatchStream(cases, None, default_model.card.roi_size, SMALL, "stage2")
    torch.testing.assert_close(one[5][0], again[5][0], rtol=0, atol=0)
    assert not torch.equal(one[5][0], one[6][0]) and not torch.equal(one[5][0], other[5][0])


def test_strong_augmentation_changes_only_the_pseudo_labelled_patches_and_keeps_their_labels(default_model):
    from ASFDALib.adaptation.patches import PatchStream

    labelled, pseudo = _cases(default_model.card, 1), _cases(default_model.card, 1, seed=3)
    roi = default_model.card.roi_size
    weak = PatchStream(labelled, pseudo, roi, replace(SMALL, pseudo_augment="weak"), "stage2")[4]
    strong = PatchStream(labelled, pseudo, roi, replace(SMALL, pseudo_augment="strong"), "stage2")[4]
    for i in (0, 1, 3):  # the labelled batch and the pseudo-labels: the same draws (crops and flips)
        torch.testing.assert_close(weak[i], strong[i], rtol=0, atol=0)
    assert not torch.equal(weak[2], strong[2])  # the pseudo-labelled images: other intensities


def test_intensity_curves_come_on_top_of_the_strong_augmentation_and_keep_crops_and_labels(default_model):
    from ASFDALib.adaptation.patches import PatchStream

    labelled, pseudo = _cases(default_model.card, 1), _cases(default_model.card, 1, seed=3)
    roi, config = default_model.card.roi_size, replace(SMALL, batch_size=8)
    strong = PatchStream(labelled, pseudo, roi, replace(config, pseudo_augment="strong"), "stage2")[4]
    remap = PatchStream(labelled, pseudo, roi, replace(config, pseudo_augment="remap"), "stage2")[4]
    for i in (0, 1, 3):
        torch.testing.assert_close(strong[i], remap[i], rtol=0, atol=0)
    changed = [not torch.equal(a, b) for a, b in zip(strong[2], remap[2])]
    assert 0 < sum(changed) < len(changed)  # about half the patches go through a curve, the rest as they were


def test_copy_paste_swaps_a_cuboid_of_two_thirds_of_each_side_either_way_and_the_labels_follow_their_voxels():
    from ASFDALib.adaptation.patches import copy_paste

    gen = torch.Generator().manual_seed(0)
    shape = (16, 1, 9, 12, 6)  # a cuboid of 6 x 8 x 4 voxels
    labelled_images, images = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen) + 2.0
    labelled_labels = torch.randint(0, 3, shape[:1] + shape[2:], generator=gen)
    labels = torch.randint(3, 6, shape[:1] + shape[2:], generator=gen)
    before = labelled_images.clone(), labelled_labels.clone()
    mixed, mixed_labels = copy_paste(labelled_images, labelled_labels, images, labels, np.random.default_rng(7))
    torch.testing.assert_close((labelled_images, labelled_labels), before, rtol=0, atol=0)  # untouched
    directions = set()
    for k in range(shape[0]):
        from_labelled = mixed[k, 0] < 2.0  # each voxel is one patch's or the other's, never a blend
        torch.testing.assert_close(mixed[k, 0], torch.where(from_labelled, labelled_images[k, 0], images[k, 0]))
        torch.testing.assert_close(mixed_labels[k], torch.where(from_labelled, labelled_labels[k], labels[k]))
        # the pasted part is the cuboid: the labelled one in the pool's patch, or the pool's in the labelled
        pasted_labelled = int(from_labelled.sum()) == 6 * 8 * 4
        directions.add(pasted_labelled)
        cuboid = from_labelled if pasted_labelled else ~from_labelled
        corner = [int(i.min()) for i in torch.nonzero(cuboid, as_tuple=True)]
        box = tuple(slice(a, a + c) for a, c in zip(corner, (6, 8, 4)))
        assert int(cuboid.sum()) == 6 * 8 * 4 and bool(cuboid[box].all())
    assert directions == {True, False}
    again = copy_paste(labelled_images, labelled_labels, images, labels, np.random.default_rng(7))
    torch.testing.assert_close(again, (mixed, mixed_labels), rtol=0, atol=0)


def test_a_copy_paste_mix_replaces_the_pseudo_labelled_batch_and_keeps_every_other_draw(default_model):
    from ASFDALib.adaptation.patches import PatchStream, copy_paste

    labelled, pseudo = _cases(default_model.card, 1), _cases(default_model.card, 1, seed=3)
    roi, config = default_model.card.roi_size, replace(SMALL, batch_size=2)
    plain = PatchStream(labelled, pseudo, roi, replace(config, pseudo_mix="none"), "stage2")
    stream = PatchStream(labelled, pseudo, roi, replace(config, pseudo_mix="copy-paste"), "stage2")
    mixed = stream[4]
    torch.testing.assert_close(mixed[:2], plain[4][:2], rtol=0, atol=0)  # the labelled batch as it was
    # the mix of the very patches drawn without it, from batch 4's own generator: a resume draws it again
    expected = copy_paste(*plain[4], np.random.default_rng([*stream.key, 4, 3]))
    torch.testing.assert_close(mixed[2:], expected, rtol=0, atol=0)
    torch.testing.assert_close(stream[4], mixed, rtol=0, atol=0)
    assert not torch.equal(mixed[3], plain[4][3])


def test_a_patch_stream_under_the_ema_teacher_draws_its_pseudo_labelled_patches_unmixed(default_model):
    """The EMA teacher labels the weak patch online, so a mixed image would no longer match its label: the stream
    leaves the patches unmixed whatever mix its config names (the trainer resolves the mix too)."""
    from ASFDALib.adaptation.patches import PatchStream

    labelled, pseudo = _cases(default_model.card, 1), _cases(default_model.card, 1, seed=3)
    roi, config = default_model.card.roi_size, replace(SMALL, batch_size=2, teacher="ema")
    plain = PatchStream(labelled, pseudo, roi, replace(config, pseudo_mix="none"), "stage2")[4]
    asked = PatchStream(labelled, pseudo, roi, replace(config, pseudo_mix="copy-paste"), "stage2")[4]
    assert len(asked) == len(plain) == 5  # the labelled pair, the pseudo-labelled pair, the weak patch
    for a, b in zip(asked, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_resumed_stage_2_that_mixes_its_patches_ends_as_an_uninterrupted_one(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card)
    config = replace(SMALL, pseudo_mix="copy-paste")
    straight = Trainer(_fresh(default_model.path), card, config, tmp_path / "a")
    straight.begin_stage("stage2")
    assert straight.run(cases[:1], 3, cases[1:]) == "done"
    cancel = threading.Event()
    first = Trainer(_fresh(default_model.path), card, config, tmp_path / "b")
    first.begin_stage("stage2")
    first.run(cases[:1], 3, cases[1:], cancel, lambda p: p.iteration == 2 and cancel.set())
    resumed = Trainer(_fresh(default_model.path), card, config, tmp_path / "b")  # a new process, in effect
    assert resumed.load() and resumed.iteration == 2
    assert resumed.run(cases[:1], 3, cases[1:]) == "done"
    for key, value in straight.network.state_dict().items():
        torch.testing.assert_close(resumed.network.state_dict()[key], value, rtol=0, atol=0)


def test_an_intensity_curve_maps_each_level_through_random_levels_and_stays_in_the_patch_range():
    from ASFDALib.adaptation.patches import remap_intensity

    ramp = torch.linspace(10.0, 20.0, 5).reshape(1, 1, 5, 1, 1).repeat(16, 1, 1, 1, 1)
    out = remap_intensity(ramp, np.random.default_rng(0))
    assert float(out.min()) >= 10.0 and float(out.max()) <= 20.0
    # replaying the generator: a changed patch is blend * curve + (1 - blend) * patch, the curve through
    # its five levels at the five control points (the ramp's own values here)
    rng = np.random.default_rng(0)
    for k in range(16):
        if rng.random() < 0.5:
            torch.testing.assert_close(out[k], ramp[k])
            continue
        levels, blend = rng.uniform(0.0, 1.0, 5), rng.uniform(0.5, 1.0)
        expected = blend * (levels * 10.0 + 10.0) + (1.0 - blend) * np.linspace(10.0, 20.0, 5)
        np.testing.assert_allclose(out[k].flatten().numpy(), expected, rtol=1e-5)


def test_an_ema_teacher_starts_as_the_stage_1_model_and_follows_the_student_by_its_decay(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card)
    config = replace(SMALL, teacher="ema", ema_decay=0.9)
    trainer = Trainer(_fresh(default_model.path), card, config, tmp_path / "a")
    trainer.run(cases, 2)
    assert trainer.teacher is None  # stage 1 trains on labels: no teacher
    before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    trainer.begin_stage("stage2")
    trainer.run(cases[:1], 1, pseudo=cases[1:])
    after = trainer.network.state_dict()
    for key, value in trainer.teacher.named_parameters():
        torch.testing.assert_close(value, 0.9 * before[key] + 0.1 * after[key])


def test_the_ema_teacher_not_the_stored_pseudo_label_labels_the_patches(tmp_path, default_model):
    """With no voxel confident enough for the teacher, the pseudo-labelled patches teach nothing, whatever
    their stored labels say: stage 2 ends where it ends on the labels alone."""
    card, cases = default_model.card, _cases(default_model.card)
    config = replace(SMALL, teacher="ema", pseudo_mix="none")
    config.confidence = 1.01  # above every probability, so no voxel passes (a value the recipe refuses from users)
    ends = []
    for folder, pseudo in (("a", cases[1:]), ("b", None)):
        trainer = Trainer(_fresh(default_model.path), card, config, tmp_path / folder)
        trainer.begin_stage("stage2")
        trainer.run(cases[:1], 2, pseudo)
        ends.append(dict(trainer.network.named_parameters()))  # (BatchNorm's running statistics do see them)
    for key, value in ends[1].items():
        torch.testing.assert_close(ends[0][key], value, rtol=0, atol=0)


def test_the_ema_teachers_patches_weigh_ema_weight_and_the_fixed_labels_pseudo_weight(tmp_path, default_model):
    """One step's loss is the labelled patches' plus the pseudo-labelled ones' at their weight: the EMA
    teacher's at ``ema_weight`` (a consistency target that moves with the student), fixed labels at
    ``pseudo_weight``; with no ramp the weights are whole from the first step."""
    card, cases = default_model.card, _cases(default_model.card)
    losses = {}
    for name, config in {
        "ema 0.5": replace(SMALL, teacher="ema", ema_weight=0.5, ramp_fraction=0.0, confidence=0.0),
        "ema 0.0": replace(SMALL, teacher="ema", ema_weight=0.0, ramp_fraction=0.0, confidence=0.0),
        "ema 1.0, fixed 0.5": replace(
            SMALL, teacher="ema", ema_weight=1.0, pseudo_weight=0.5, ramp_fraction=0.0, confidence=0.0
        ),
        "fixed 0.0": replace(SMALL, pseudo_weight=0.0, ramp_fraction=0.0),
        "fixed 1.0": replace(SMALL, ramp_fraction=0.0),
    }.items():
        trainer = Trainer(_fresh(default_model.path), card, config, tmp_path / name)
        trainer.begin_stage("stage2")
        seen: list[float] = []
        trainer.run(cases[:1], 1, cases[1:], progress=lambda p, seen=seen: seen.append(p.loss))
        losses[name] = seen[0]
    # the same labelled batch and the same first teacher (the stage-1 model): the pseudo term scales
    pseudo_half = losses["ema 0.5"] - losses["ema 0.0"]
    assert pseudo_half > 0
    assert losses["ema 1.0, fixed 0.5"] == pytest.approx(losses["ema 0.0"] + 2 * pseudo_half, rel=1e-4)
    assert losses["fixed 1.0"] > losses["fixed 0.0"]


def test_a_run_that_goes_on_with_fixed_labels_drops_the_checkpoints_ema_teacher(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card)
    trainer = Trainer(_fresh(default_model.path), card, replace(SMALL, teacher="ema"), tmp_path)
    trainer.begin_stage("stage2")
    trainer.run(cases[:1], 2, cases[1:])
    assert trainer.teacher is not None
    fixed = Trainer(_fresh(default_model.path), card, SMALL, tmp_path)
    assert fixed.load() and fixed.teacher is not None  # the checkpoint holds it
    fixed.run(cases[:1], 4, cases[1:])
    assert fixed.teacher is None and "teacher" not in torch.load(fixed.last_path, weights_only=True)


def test_stage_2_refuses_a_teacher_the_gate_has_not_resolved(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card)
    trainer = Trainer(_fresh(default_model.path), card, replace(SMALL, teacher="ema-if-fallback"), tmp_path)
    trainer.begin_stage("stage2")
    with pytest.raises(ValueError, match="resolve it with recipe.stage2_teacher"):
        trainer.run(cases[:1], 1, cases[1:])
    assert trainer.iteration == 0


@pytest.mark.parametrize(
    "teacher, fallback_judged, trains",
    [
        ("ema-if-fallback", True, "ema"),
        ("ema-if-fallback", False, "fixed"),
        ("fixed", True, "fixed"),
        ("ema", False, "ema"),
    ],
)
def test_the_ema_teacher_labels_where_the_fallback_judged_and_the_fixed_one_where_the_gate_asked_did(
    teacher, fallback_judged, trains
):
    from ASFDALib.adaptation.recipe import stage2_teacher

    assert stage2_teacher(teacher, fallback_judged) == trains


def test_a_trainer_with_an_ema_teacher_mixes_no_patch_whatever_mix_is_asked(tmp_path, default_model):
    """The default mix (copy-paste) is the fixed teacher's: an EMA teacher labels each patch online as it is
    drawn, so its trainer draws the patches unmixed, and its checkpoint records the mix that ran."""
    card, cases = default_model.card, _cases(default_model.card)
    asked = replace(SMALL, teacher="ema")
    assert asked.pseudo_mix == "copy-paste"
    trainer = Trainer(_fresh(default_model.path), card, asked, tmp_path / "a")
    assert trainer.config.pseudo_mix == "none"
    plain = Trainer(_fresh(default_model.path), card, replace(asked, pseudo_mix="none"), tmp_path / "b")
    for t in (trainer, plain):
        t.begin_stage("stage2")
        assert t.run(cases[:1], 2, cases[1:]) == "done"
    for key, value in plain.network.state_dict().items():
        torch.testing.assert_close(trainer.network.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "mix, teacher, ran",
    [("copy-paste", "fixed", "copy-paste"), ("copy-paste", "ema", "none"), ("none", "fixed", "none")],
)
def test_the_pseudo_labelled_patches_are_mixed_only_where_the_fixed_teacher_labels_them(mix, teacher, ran):
    from ASFDALib.adaptation.recipe import stage2_mix

    assert stage2_mix(mix, teacher) == ran


def test_a_mix_waits_for_the_teacher_to_be_resolved():
    from ASFDALib.adaptation.recipe import stage2_mix

    with pytest.raises(ValueError, match="resolve it with stage2_teacher first"):
        stage2_mix("copy-paste", "ema-if-fallback")


def test_a_misspelt_mix_is_refused_when_the_recipe_is_made():
    with pytest.raises(ValueError, match="FinetuneConfig.pseudo_mix 'cutmix': use one of none, copy-paste"):
        FinetuneConfig(pseudo_mix="cutmix")


def test_a_resumed_stage_2_with_an_ema_teacher_ends_as_an_uninterrupted_one(tmp_path, default_model):
    card, cases = default_model.card, _cases(default_model.card, 3)
    config = replace(SMALL, teacher="ema", pseudo_augment="strong", confidence=0.5)
    runs = []
    for folder, stop in (("a", None), ("b", 2)):
        trainer = Trainer(_fresh(default_model.path), card, config, tmp_path / folder)
        trainer.begin_stage("stage2")
        cancel = threading.Event()
        trainer.run(
            cases[:1], 4, cases[1:], cancel, lambda p, stop=stop, cancel=cancel: p.iteration == stop and cancel.set()
        )
        if stop:
            trainer = Trainer(_fresh(default_model.path), card, config, tmp_path / folder)  # a new process
            assert trainer.load() and trainer.iteration == stop and trainer.teacher is not None
            assert trainer.run(cases[:1], 4, cases[1:]) == "done"
        runs.append(trainer)
    for model in ("network", "teacher"):
        resumed = getattr(runs[1], model).state_dict()
        for key, value in getattr(runs[0], model).state_dict().items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_cancel_stops_within_one_iteration_and_leaves_a_usable_checkpoint(tmp_path, default_model):
    card = default_model.card
    cancel = threading.Event()
    seen = []

    def progress(p):
        seen.append(p.iteration)
        if p.iteration == 2:
            cancel.set()

    trainer = Trainer(_fresh(default_model.path), card, replace(SMALL, checkpoint_every=100), tmp_path)
    assert trainer.run(_cases(card, 1), 50, cancel=cancel, progress=progress) == "cancelled"
    assert seen == [1, 2] and trainer.iteration == 2
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["iteration"] == 2
    trainer.network.load_state_dict(state["network"])


def test_progress_reports_loss_eta_and_validation_dice(tmp_path, default_model):
    card = default_model.card
    reports = []
    trainer = Trainer(_fresh(default_model.path), card, SMALL, tmp_path)
    trainer.run(_cases(card, 1), 2, progress=reports.append, validation=_cases(card, 1, seed=50))
    assert [r.iteration for r in reports] == [1, 2]
    assert all(np.isfinite(r.loss) and r.eta_s >= 0 for r in reports)
    assert reports[-1].val_dice is not None and 0 <= reports[-1].val_dice <= 1


def test_with_the_encoder_rule_the_encoder_learns_more_slowly_than_the_decoder(default_model):
    from ASFDALib.adaptation.trainer import param_groups

    config = FinetuneConfig(lr=1e-3, encoder_lr_scale=0.1, lower_rate_for="encoder")
    groups = param_groups(_fresh(default_model.path), config)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    assert all(len(g["params"]) for g in groups)


def test_by_default_every_pre_trained_parameter_learns_at_the_lower_rate(default_model):
    from ASFDALib.adaptation.trainer import param_groups

    network = _fresh(default_model.path)
    groups = param_groups(network, FinetuneConfig(lr=1e-3, encoder_lr_scale=0.1))
    assert [g["lr"] for g in groups] == [1e-4]
    assert len(groups[0]["params"]) == len(list(network.parameters()))


def test_lower_rate_for_loaded_puts_every_checkpoint_tensor_at_the_lower_rate_and_a_new_head_at_the_full_rate():
    from monai.networks.nets import UNet

    from ASFDALib.adaptation.trainer import param_groups
    from ASFDALib.checkpoints import load_pretrained

    def unet(classes: int) -> torch.nn.Module:
        return UNet(3, 1, classes, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch")

    source, target = unet(6), unet(4)  # another class set: the head is re-initialised
    report = load_pretrained(target, source.state_dict(), num_classes=4)
    config = FinetuneConfig(lr=1e-3, encoder_lr_scale=0.1, lower_rate_for="loaded")
    groups = {g["name"]: g for g in param_groups(target, config, report)}
    slow = {n for n, p in target.named_parameters() if any(p is q for q in groups["pretrained"]["params"])}
    fast = {n for n, p in target.named_parameters() if any(p is q for q in groups["full"]["params"])}
    assert slow == {n for n, _ in target.named_parameters() if n in report.loaded}
    assert fast == {n for n, _ in target.named_parameters() if n in report.head} != set()
    assert groups["pretrained"]["lr"] == pytest.approx(1e-4) and groups["full"]["lr"] == 1e-3
    # The encoder rule lets a loaded decoder adapt at the full rate: fewer tensors take the lower rate.
    encoder = {g["name"]: g for g in param_groups(target, FinetuneConfig(lr=1e-3, lower_rate_for="encoder"), report)}
    assert 0 < len(encoder["pretrained"]["params"]) < len(groups["pretrained"]["params"])


# --- the handover's blend with the start (adaptation/blend.py) --------------------------------------------------


def test_a_blend_mixes_the_starts_share_into_every_floating_tensor():
    from ASFDALib.adaptation.blend import blend_state

    tuned = {"w": torch.tensor([1.0, 2.0]), "half": torch.tensor([4.0], dtype=torch.float16)}
    start = {"w": torch.tensor([3.0, -2.0]), "half": torch.tensor([0.0], dtype=torch.float16)}
    blended = blend_state(tuned, start, 0.25)
    assert blended["w"].tolist() == [1.5, 1.0]  # 0.75 x tuned + 0.25 x start
    assert blended["half"].dtype == torch.float16 and blended["half"].tolist() == [3.0]


def test_a_blend_leaves_fresh_tensors_and_counters_as_tuned():
    from ASFDALib.adaptation.blend import blend_state

    tuned = {"head": torch.tensor([1.0]), "bn.num_batches_tracked": torch.tensor(7), "w": torch.tensor([2.0])}
    start = {"head": torch.tensor([-9.0]), "bn.num_batches_tracked": torch.tensor(0), "w": torch.tensor([0.0])}
    blended = blend_state(tuned, start, 0.5, fresh=["head"])
    assert (blended["head"].item(), blended["bn.num_batches_tracked"].item(), blended["w"].item()) == (1.0, 7, 1.0)
    assert blend_state(tuned, start, 0.0) == tuned


def test_a_blend_refuses_a_share_outside_zero_to_one_and_unlike_states():
    from ASFDALib.adaptation.blend import blend_state

    with pytest.raises(ValueError, match="share of the blend must lie in"):
        blend_state({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, 1.5)
    with pytest.raises(ValueError, match="different tensors"):
        blend_state({"w": torch.zeros(1)}, {"v": torch.zeros(1)}, 0.2)


@pytest.mark.parametrize(
    "gate, kept, share", [("rounds", 3, 0.2), ("rounds", 0, 0.0), ("flips", 3, 0.0), ("confidence", 3, 0.0)]
)
def test_only_a_start_that_vouched_for_kept_volumes_gets_a_share_of_the_handover(gate, kept, share):
    from ASFDALib.adaptation.recipe import handover_share

    assert handover_share(0.2, gate, kept) == share


def test_a_blend_share_of_one_or_more_is_refused_by_the_recipe():
    from ASFDALib.adaptation.recipe import FinetuneConfig

    with pytest.raises(ValueError, match=r"blend_start 1.0: use a share in \[0, 1\)"):
        FinetuneConfig(blend_start=1.0)


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("iterations", -1, "0 or more"),
        ("batch_size", 0, "1 or more"),
        ("lr", -1.0, "above 0"),
        ("keep_fraction", 2.0, r"in \(0, 1\]"),
        ("checkpoint_every", 0, "1 or more"),
        ("confidence", 1.0, r"in \[0, 1\)"),
    ],
)
def test_a_scripts_value_out_of_range_is_refused_when_the_recipe_is_made(field, value, allowed):
    """As the command line's checks do: not a run that trains at a negative rate, or fails late and is recorded."""
    from ASFDALib.adaptation.recipe import FinetuneConfig

    with pytest.raises(ValueError, match=f"FinetuneConfig.{field} {value!r}: use a value {allowed}"):
        FinetuneConfig(**{field: value})


def test_a_torchscript_network_trains_stage_2_with_an_ema_teacher(tmp_path, default_model):
    """The teacher is a copy whose parameters are frozen one by one (a ScriptModule has no requires_grad_)."""
    import torch

    card, cases = default_model.card, _cases(default_model.card)
    scripted = torch.jit.script(_fresh(default_model.path))
    trainer = Trainer(scripted, card, replace(SMALL, teacher="ema"), tmp_path / "ts")
    trainer.begin_stage("stage2")
    assert trainer.run(cases[:1], 2, pseudo=cases[1:]) == "done"
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_a_scripts_fractional_count_is_refused_when_the_recipe_is_made():
    from ASFDALib.adaptation.recipe import FinetuneConfig

    with pytest.raises(ValueError, match="FinetuneConfig.iterations 2.5: use a whole number"):
        FinetuneConfig(iterations=2.5)
