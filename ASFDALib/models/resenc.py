"""nnU-Net's residual-encoder U-Net (``ResidualEncoderUNet``: the ResEnc M/L/XL presets, and models nnU-Net
fine-tuned from self-supervised encoders pre-trained for them) built from torch layers, so that such a checkpoint
loads, ranks, fine-tunes and predicts without nnU-Net's ``dynamic_network_architectures`` installed.

It computes nnU-Net's function for 3D inputs at inference (deep supervision off):

- a stem: one convolution (kernel of stage 0, stride 1) to ``stem_channels``, norm, leaky ReLU;
- per stage, residual blocks (ResNet-D's basic block): convolution (the stage's stride on the first block) -
  norm - leaky ReLU - convolution - norm, plus a skip path (average pooling by the stride where the block
  strides, then a bias-free 1x1x1 convolution and norm where the channel count changes), then leaky ReLU;
- a plain decoder: per resolution from the lowest, a transposed convolution (kernel and stride: the stride of
  the stage below), concatenation with the encoder stage's output, then convolution - norm - leaky ReLU blocks
  with that stage's kernel; a 1x1x1 convolution to the classes at full resolution.

Modules carry nnU-Net's names (``encoder.stem.convs.0.conv``, ``encoder.stages.2.blocks.1.conv1.norm``,
``decoder.transpconvs.0``, ``decoder.stages.0.convs.0.conv``), so its weights load as they are named; the one
output head is ``decoder.head`` (nnU-Net's last ``seg_layers`` entry, the others serve deep supervision only).
The arguments are plain lists and numbers, as a card or a session stores them.
"""

from __future__ import annotations

import torch
from torch import nn

from ASFDALib.errors import ModelError


def _norm(channels: int, eps: float, affine: bool) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, eps=eps, affine=affine)


class ConvNorm(nn.Module):
    """Convolution, instance norm and, where ``slope`` is given, a leaky ReLU (nnU-Net's conv-norm-nonlin)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: list[int],
        stride: list[int] | int,
        bias: bool,
        eps: float,
        affine: bool,
        slope: float | None,
    ) -> None:
        super().__init__()
        padding = [(k - 1) // 2 for k in kernel]
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding, bias=bias)
        self.norm = _norm(out_channels, eps, affine)
        # in place: the norm's output is used nowhere else, and 3D maps are large
        self.nonlin = nn.Identity() if slope is None else nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.norm(self.conv(x)))


class ConvStack(nn.Module):
    """``count`` ConvNorm blocks, the first from ``in_channels``: nnU-Net's stem and decoder stages."""

    def __init__(
        self, count: int, in_channels: int, out_channels: int, kernel: list[int], bias: bool, norm: dict, slope: float
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                ConvNorm(in_channels if i == 0 else out_channels, out_channels, kernel, 1, bias, **norm, slope=slope)
                for i in range(count)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class ResidualBlock(nn.Module):
    """ResNet-D's basic block as nnU-Net's BasicBlockD: the stride in the first convolution, and on the skip an
    average pooling (not a strided 1x1x1 convolution, which would drop three voxels in four) before the
    projection."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: list[int],
        stride: list[int],
        bias: bool,
        norm: dict,
        slope: float,
    ) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, kernel, stride, bias, **norm, slope=slope)
        self.conv2 = ConvNorm(out_channels, out_channels, kernel, 1, bias, **norm, slope=None)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(nn.AvgPool3d(stride, stride))
        if in_channels != out_channels:  # nnU-Net's projection never has a bias, whatever conv_bias says
            skip.append(ConvNorm(in_channels, out_channels, [1, 1, 1], 1, False, **norm, slope=None))
        self.skip = nn.Sequential(*skip) if skip else nn.Identity()
        self.nonlin = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlin(self.conv2(self.conv1(x)) + self.skip(x))


class ResidualStage(nn.Module):
    """One encoder resolution: ``count`` residual blocks, the first one striding."""

    def __init__(
        self,
        count: int,
        in_channels: int,
        out_channels: int,
        kernel: list[int],
        stride: list[int],
        bias: bool,
        norm: dict,
        slope: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                ResidualBlock(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    kernel,
                    stride if i == 0 else [1, 1, 1],
                    bias,
                    norm,
                    slope,
                )
                for i in range(count)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    """The stem and the residual stages; returns every stage's output (the decoder's skips, the last lowest)."""

    def __init__(
        self,
        in_channels: int,
        stem_channels: int,
        features: list[int],
        kernels: list[list[int]],
        strides: list[list[int]],
        blocks: list[int],
        bias: bool,
        norm: dict,
        slope: float,
    ) -> None:
        super().__init__()
        self.stem = ConvStack(1, in_channels, stem_channels, kernels[0], bias, norm, slope)
        widths = [stem_channels, *features]
        self.stages = nn.Sequential(
            *(
                ResidualStage(blocks[s], widths[s], widths[s + 1], kernels[s], strides[s], bias, norm, slope)
                for s in range(len(features))
            )
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips: list[torch.Tensor] = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Up from the lowest resolution: transposed convolution, concatenation with the skip, convolutions; then
    the 1x1x1 head at full resolution."""

    def __init__(
        self,
        out_channels: int,
        features: list[int],
        kernels: list[list[int]],
        strides: list[list[int]],
        convs: list[int],
        bias: bool,
        norm: dict,
        slope: float,
    ) -> None:
        super().__init__()
        lower = list(range(len(features) - 1, 0, -1))  # the stage each step comes up from, lowest first
        self.transpconvs = nn.ModuleList(
            nn.ConvTranspose3d(features[s], features[s - 1], strides[s], strides[s], bias=bias) for s in lower
        )
        self.stages = nn.ModuleList(
            ConvStack(convs[i], 2 * features[s - 1], features[s - 1], kernels[s - 1], bias, norm, slope)
            for i, s in enumerate(lower)
        )
        self.head = nn.Conv3d(features[0], out_channels, 1)

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor:
        x = skips[-1]
        for i, (up, stage) in enumerate(zip(self.transpconvs, self.stages)):
            x = stage(torch.cat((up(x), skips[-(i + 2)]), 1))
        return self.head(x)


class ResidualEncoderUNet(nn.Module):
    """nnU-Net's ``ResidualEncoderUNet`` (3D, BasicBlockD, instance norm, leaky ReLU) at inference.

    The per-stage arguments as nnU-Net's plans name them in ``arch_kwargs`` (``features_per_stage``,
    ``kernel_sizes``, ``strides``, ``n_blocks_per_stage``, ``n_conv_per_stage_decoder``, ``conv_bias``,
    ``stem_channels``), kernels and strides in the network's axis order; the rest as plain values where the plans
    give classes and dicts: ``in_channels``/``out_channels`` (nnU-Net's input and output channels), ``norm_eps``
    and ``norm_affine`` (``norm_op_kwargs``), ``negative_slope`` (``nonlin_kwargs``). ``stem_channels`` defaults
    to the first stage's features, as nnU-Net's does.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        features_per_stage: list[int],
        kernel_sizes: list[list[int]],
        strides: list[list[int]],
        n_blocks_per_stage: list[int],
        n_conv_per_stage_decoder: list[int],
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        norm_affine: bool = True,
        negative_slope: float = 0.01,
        stem_channels: int | None = None,
    ) -> None:
        super().__init__()
        stages = len(features_per_stage)
        per_stage = {"kernel_sizes": kernel_sizes, "strides": strides, "n_blocks_per_stage": n_blocks_per_stage}
        wrong = [f"{k} has {len(v)}" for k, v in per_stage.items() if len(v) != stages]
        if len(n_conv_per_stage_decoder) != stages - 1:
            wrong.append(f"n_conv_per_stage_decoder has {len(n_conv_per_stage_decoder)} (one fewer is needed)")
        if any(len(k) != 3 for k in [*kernel_sizes, *strides]):
            wrong.append("kernels and strides need three values each (3D)")
        if stages < 2:
            wrong.append("a U-Net needs at least two")
        if wrong:
            raise ModelError(
                f"network ResidualEncoderUNet: {stages} stages in features_per_stage, but {'; '.join(wrong)}; "
                "give one entry per stage (as the plans' arch_kwargs do)"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        norm = {"eps": norm_eps, "affine": norm_affine}
        kernels, steps = [list(k) for k in kernel_sizes], [list(s) for s in strides]
        self.encoder = ResidualEncoder(
            in_channels,
            stem_channels or features_per_stage[0],
            list(features_per_stage),
            kernels,
            steps,
            list(n_blocks_per_stage),
            conv_bias,
            norm,
            negative_slope,
        )
        self.decoder = UNetDecoder(
            out_channels,
            list(features_per_stage),
            kernels,
            steps,
            list(n_conv_per_stage_decoder),
            conv_bias,
            norm,
            negative_slope,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
