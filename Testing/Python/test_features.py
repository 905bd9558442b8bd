"""Feature taps: streaming moments, encoder stages of real MONAI networks, BatchNorm knowledge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ASFDALib.models.card import NetworkSpec
from ASFDALib.models.loading import build_network
from ASFDALib.query.features import (
    BN_PREFIX,
    STAGE_PREFIX,
    FeatureSummary,
    FeatureTaps,
    RunningMoments,
    batchnorm_knowledge,
    encoder_stages,
    mean_summaries,
)


def test_running_moments_equal_numpy_over_batches():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(2.0, 3.0, (2, 3, 4, 5, 6)).astype(np.float32) for _ in range(4)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(torch.from_numpy(chunk))
    every = np.concatenate([c.transpose(1, 0, 2, 3, 4).reshape(3, -1) for c in chunks], axis=1)
    mean, var = moments.result()
    np.testing.assert_allclose(mean, every.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(var, every.var(axis=1), rtol=1e-4)


def test_large_maps_are_summarised_on_a_subsample_that_matches_the_exact_moments():
    rng = np.random.default_rng(1)
    checker = (np.indices((48, 48, 48)).sum(axis=0) % 2).astype(np.float32)  # a period-2 pattern
    x = rng.normal(0.0, 1.0, (2, 3, 48, 48, 48)).astype(np.float32) + 4 * checker
    moments = RunningMoments()
    moments.update(torch.from_numpy(x))
    mean, var = moments.result()
    exact = x.transpose(1, 0, 2, 3, 4).reshape(3, -1)
    np.testing.assert_allclose(mean, exact.mean(axis=1), rtol=0.02)
    np.testing.assert_allclose(var, exact.var(axis=1), rtol=0.03)


def test_mean_summaries_are_mixture_moments():
    a = FeatureSummary({"l": (np.array([0.0]), np.array([1.0]))})
    b = FeatureSummary({"l": (np.array([2.0]), np.array([1.0]))})
    mean, var = mean_summaries([a, b]).layers["l"]
    assert mean[0] == pytest.approx(1.0)
    assert var[0] == pytest.approx(2.0)


def test_summary_round_trips_through_npz(tmp_path):
    summary = FeatureSummary({"bn:a": (np.arange(3.0), np.ones(3)), "stage:b": (np.zeros(2), np.full(2, 4.0))})
    loaded = FeatureSummary.load(summary.save(tmp_path / "s.npz"))
    assert set(loaded.layers) == set(summary.layers)
    np.testing.assert_array_equal(loaded.layers["stage:b"][1], [4.0, 4.0])


NETWORKS = {
    "UNet": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "channels": [4, 8, 16],
        "strides": [2, 2],
        "norm": "batch",
    },
    "SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 8},
    "SwinUNETR": {"in_channels": 1, "out_channels": 3, "feature_size": 12, "spatial_dims": 3},
    "DynUNet": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "kernel_size": [3, 3, 3],
        "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2],
        "norm_name": "batch",
    },
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_encoder_stages_of_monai_networks_are_tapped(name):
    network = build_network(NetworkSpec(name, NETWORKS[name])).eval()
    stages = encoder_stages(network)
    assert len(stages) >= 2
    with FeatureTaps(network) as taps, torch.no_grad():
        network(torch.randn(1, 1, 64, 64, 64))
        summary = taps.summary()
    stage_layers = [k for k in summary.layers if k.startswith(STAGE_PREFIX)]
    assert len(stage_layers) == len(stages)
    assert summary.embedding().ndim == 1
    assert np.linalg.norm(summary.embedding()) == pytest.approx(1.0)
    # hooks are removed afterwards
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in network.modules())


def test_batchnorm_knowledge_ranks_an_intensity_shifted_copy_above_the_original(default_model):
    """K_s from BatchNorm statistics: a shifted copy of a source volume is farther from the source."""
    from ASFDALib.bench.phantoms import make_phantom
    from ASFDALib.data.preprocess import preprocess
    from ASFDALib.data.volumes import Volume
    from ASFDALib.inference.sweep import sweep
    from ASFDALib.query import scoring

    image, _, affine = make_phantom(12345)
    original = preprocess(Volume(image, affine, "ct"), default_model.card)
    shifted = original * 0.6 + 0.35
    knowledge = batchnorm_knowledge(default_model.network)
    layers = sorted(knowledge.layers)
    assert layers and all(k.startswith(BN_PREFIX) for k in layers)
    summaries = [sweep(default_model.network, x, default_model.card).summary for x in (original, shifted)]
    d_src = scoring.skl_to_reference(summaries, knowledge, layers)
    assert d_src[1] > 2 * d_src[0]


def _loaded(network):
    from pathlib import Path

    from ASFDALib.models.card import ModelCard
    from ASFDALib.models.loading import LoadedModel

    card = ModelCard(class_names=["background", "a", "b", "c"], roi_size=(32, 32, 32))
    return LoadedModel(network, card, "state_dict", Path("net.pt"), "digest")


@pytest.mark.parametrize(
    "norm,expected,note",
    [
        ("batch", "bn", ""),
        ("instance", "energy", "the network normalises with InstanceNorm: no BatchNorm statistics to compare with"),
        (("group", {"num_groups": 2}), "energy", "the network normalises with GroupNorm"),
    ],
)
def test_source_knowledge_comes_from_batchnorm_only_when_the_network_uses_its_statistics(norm, expected, note):
    from ASFDALib.query.ranking import choose_knowledge

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "channels": [4, 8], "strides": [2], "norm": norm}
    knowledge = choose_knowledge(_loaded(build_network(NetworkSpec("UNet", args))))
    assert knowledge.kind == expected
    assert note in knowledge.describe()


def test_batchnorm_that_normalises_with_batch_statistics_in_eval_is_not_source_knowledge():
    """SuPreM's UNet uses a BatchNorm subclass that always normalises with the batch's own statistics:
    its running buffers are not what the network uses, so they are not K_s."""
    from ASFDALib.errors import ModelError
    from ASFDALib.query.ranking import choose_knowledge

    class AlwaysBatchStats(torch.nn.BatchNorm3d):
        def forward(self, x):
            return torch.nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum, self.eps
            )

    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), AlwaysBatchStats(4), torch.nn.Conv3d(4, 4, 1))
    knowledge = choose_knowledge(_loaded(network))
    assert knowledge.kind == "energy"
    with pytest.raises(ModelError, match="no BatchNorm in the network normalises with running statistics"):
        choose_knowledge(_loaded(network), "bn")


def test_prototype_gap_is_one_minus_the_cosine_to_the_predicted_classs_weight_row():
    """Known answer: head rows e0, e1, e2 (background, a, b). A voxel with features (0, 3, 4) predicts b
    (logit 4) at cosine 4/5; one with (0, 2, 0) predicts a at cosine 1; one with (1, 0, 0) is background.
    Foreground mean cosine (0.8 + 1) / 2 = 0.9: gap 0.1. With no foreground voxel every voxel counts."""
    from ASFDALib.query.features import PrototypeAlignment

    head = torch.nn.Conv3d(3, 3, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1, 1))
    alignment = PrototypeAlignment(head, stride=1)
    features = torch.tensor([[0.0, 3.0, 4.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 3, 1, 1)
    alignment.update(features)
    assert alignment.gap() == pytest.approx(0.1)
    background_only = PrototypeAlignment(head, stride=1)
    background_only.update(
        torch.tensor([1.0, 1.0, 0.0]).reshape(1, 3, 1, 1, 1) * torch.tensor([1.0, 0.5, 0.0]).reshape(1, 3, 1, 1, 1)
    )
    assert background_only.gap() == pytest.approx(1 - 1 / 1.25**0.5)


def test_prototype_gap_grows_as_features_turn_away_from_the_head():
    from ASFDALib.query.features import PrototypeAlignment

    head = torch.nn.Conv3d(2, 2, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1, 1))
    gaps = []
    for angle in (0.0, 0.3, 0.6):  # radians away from class 1's row, still predicted class 1
        alignment = PrototypeAlignment(head, stride=1)
        alignment.update(torch.tensor([np.sin(angle), np.cos(angle)], dtype=torch.float32).reshape(1, 2, 1, 1, 1))
        gaps.append(alignment.gap())
    assert gaps == pytest.approx([1 - np.cos(a) for a in (0.0, 0.3, 0.6)], abs=1e-6)


@pytest.mark.parametrize(
    "name,args,head",
    [
        (
            "DynUNet",
            {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "norm_name": "instance"},
            "output_block.conv.conv",
        ),
        ("SegResNet", {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}, "conv_final.2.conv"),
        ("UNet", {"channels": [4, 8], "strides": [2], "norm": "instance"}, ""),
    ],
)
def test_prototypes_are_read_only_from_a_pointwise_output_head(name, args, head):
    from ASFDALib.query.features import pointwise_head

    network = build_network(NetworkSpec(name, {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, **args}))
    found, why = pointwise_head(network, 4)
    assert found == head
    assert (why == "") == bool(head)
    if not head:
        assert "not a pointwise head" in why


def test_prototypes_are_the_knowledge_only_when_asked_for_and_only_from_a_pointwise_head():
    """Measured on the CT benchmark's validation split, the prototypes track the source model's error less
    than the energy does (docs/method.md), so ``auto`` keeps the energy; ``prototype`` asks for them."""
    from ASFDALib.errors import ModelError
    from ASFDALib.query.ranking import choose_knowledge

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4}
    dynunet = {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "norm_name": "instance"}
    network = build_network(NetworkSpec("DynUNet", {**args, **dynunet}))
    assert choose_knowledge(_loaded(network)).kind == "energy"
    knowledge = choose_knowledge(_loaded(network), "prototype")
    assert (knowledge.kind, knowledge.head) == ("prototype", "output_block.conv.conv")
    assert "InstanceNorm" in knowledge.describe() and "class prototypes" in knowledge.describe()
    unet = build_network(NetworkSpec("UNet", {**args, "channels": [4, 8], "strides": [2], "norm": "instance"}))
    with pytest.raises(ModelError, match="no prototypes to compare with: the output layer .* not a pointwise head"):
        choose_knowledge(_loaded(unet), "prototype")
