"""Convolutional decoder of PT-Net: information calibration modules (ICM) and U-Net up-sampling.

The decoder receives, at every encoder level, the feature maps of the M
modality encoders stacked along channels. An ICM calibrates each stack with
squeeze-and-excitation (SE) channel attention and reduces it to the channel
count of one modality. U-Net up-sampling blocks (MONAI's ``UnetrUpBlock``) then
merge the calibrated levels from coarse to fine up to the input resolution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

from monai.networks.blocks import ChannelSELayer, UnetOutBlock, UnetResBlock, UnetrUpBlock
from monai.networks.blocks.dynunet_block import get_conv_layer

__all__ = ["UnetResSEBlock", "InformationCalibrationModule", "PTNetDecoder"]

logger = logging.getLogger(__name__)


class UnetResSEBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` with squeeze-and-excitation before the residual sum.

    ``out = LeakyReLU(SE(IN(conv(LeakyReLU(IN(conv(x)))))) + shortcut(x))``, where IN is instance
    normalisation, ``shortcut`` is the identity, or a 1x1x1 convolution with IN when the
    channel count or stride changes, and SE is ``monai.networks.blocks.ChannelSELayer``
    (global average pooling, two fully connected layers with ReLU and sigmoid, channel
    reweighting). With ``use_se=False`` the block is exactly ``UnetResBlock``.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: convolution kernel size.
        stride: stride of the first convolution.
        norm_name: feature normalisation, as in ``UnetResBlock``.
        use_se: apply the SE channel attention.
        se_reduction: SE reduction ratio ``r``: the hidden layer has ``out_channels // r`` units.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int] | int = 3,
        stride: Sequence[int] | int = 1,
        norm_name: tuple | str = "instance",
        use_se: bool = True,
        se_reduction: int = 2,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size, stride, norm_name)
        self.se: nn.Module = (
            ChannelSELayer(spatial_dims, out_channels, r=se_reduction) if use_se else nn.Identity()
        )

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``inp`` (B, in_channels, *spatial)."""
        residual = inp
        out = self.lrelu(self.norm1(self.conv1(inp)))
        out = self.se(self.norm2(self.conv2(out)))
        if hasattr(self, "conv3"):
            residual = self.norm3(self.conv3(residual))
        return self.lrelu(out + residual)


class InformationCalibrationModule(nn.Module):
    """Information calibration module (ICM) of one decoder level.

    A transposed convolution (kernel = stride = ``upsample``) up-samples the stacked
    modality maps and reduces the channels from ``M * C`` to ``C``, and a
    ``UnetResSEBlock`` (C -> C) calibrates them with SE channel attention.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the stacked modalities, ``M * C``.
        out_channels: channels after calibration, ``C``.
        upsample: up-sampling factor per axis (X, Y, Z).
        use_se: apply the SE channel attention.
        se_reduction: SE reduction ratio.

    Shapes:
        (B, M * C, X, Y, Z) -> (B, C, X * ux, Y * uy, Z * uz) for ``upsample = (ux, uy, uz)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        upsample: Sequence[int] | int,
        use_se: bool = True,
        se_reduction: int = 2,
    ) -> None:
        super().__init__()
        self.upsample = get_conv_layer(
            spatial_dims,
            in_channels,
            out_channels,
            kernel_size=upsample,
            stride=upsample,
            conv_only=True,
            is_transposed=True,
        )
        self.calibrate = UnetResSEBlock(
            spatial_dims, out_channels, out_channels, kernel_size=3, stride=1, use_se=use_se, se_reduction=se_reduction
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Up-sample and calibrate the stacked modality maps ``x``."""
        return self.calibrate(self.upsample(x))


class PTNetDecoder(nn.Module):
    """CNN decoder of PT-Net: one ICM per encoder level, U-Net skip connections, and a 1x1x1 output convolution.

    Level ``l`` (0 = embedding output, 1-4 = the encoder stages' outputs) carries ``M * C_l``
    channels with ``C_l = embed_dim * 2**l`` at resolution ``R_l``, where ``R_0`` is the input
    size divided by ``level_strides[0]`` and ``R_l = R_{l-1} / level_strides[l]``. The decoder

    1. calibrates every level: ``U_l = ICM_l(level_l)`` with ``C_l`` channels at ``R_l * calibration_upsample``;
    2. encodes the raw input at full resolution, ``E = UnetResSEBlock(M -> C_0 / 2)(input)``;
    3. merges from coarse to fine with ``UnetrUpBlock`` (transposed convolution, concatenation
       with the skip, ``UnetResBlock``): ``D_4 = U_4``, ``D_{l-1} = Up(D_l, skip U_{l-1})`` with
       factor ``level_strides[l]`` for l = 4 .. 1, then ``D = Up(D_0, skip E)`` with factor
       ``level_strides[0] / calibration_upsample``;
    4. maps ``D`` (C_0 / 2 channels, full resolution) to ``out_channels`` logits.

    Args:
        num_modalities: number of modalities M.
        embed_dim: channels of one modality at level 0, ``C_0``. Must be even.
        out_channels: number of output channels (classes).
        level_strides: down-sampling factor (X, Y, Z) of each level relative to the previous
            one, level 0 relative to the input. PT-Net uses ``((4, 4, 2), (2, 2, 1), (2, 2, 1),
            (2, 2, 2), (2, 2, 2))``.
        calibration_upsample: up-sampling factor of every ICM, (2, 2, 1) in PT-Net: the
            through-plane resolution stays and the in-plane resolution doubles.
        use_se: use SE channel attention in the ICMs and the full-resolution input block.
        se_reduction: SE reduction ratio.

    Shapes:
        ``forward(image, levels)``: image (B, M, X, Y, Z), ``levels[l]`` (B, M * C_l, *R_l)
        -> (B, out_channels, X, Y, Z).
    """

    def __init__(
        self,
        num_modalities: int,
        embed_dim: int,
        out_channels: int,
        level_strides: Sequence[Sequence[int]],
        calibration_upsample: Sequence[int] = (2, 2, 1),
        use_se: bool = True,
        se_reduction: int = 2,
    ) -> None:
        super().__init__()
        if embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be even (the input block has embed_dim / 2 channels), got {embed_dim}.")
        strides = [tuple(int(s) for s in stride) for stride in level_strides]
        upsample = tuple(int(u) for u in calibration_upsample)
        if len(strides) < 2 or any(len(s) != 3 for s in strides) or len(upsample) != 3:
            raise ValueError(
                f"level_strides must list at least two (X, Y, Z) factors and calibration_upsample must be (X, Y, Z), "
                f"got {level_strides} and {calibration_upsample}."
            )
        if any(s % u != 0 for s, u in zip(strides[0], upsample)):
            raise ValueError(
                f"level_strides[0] {strides[0]} must be a multiple of calibration_upsample {upsample} on every axis."
            )
        final_upsample = tuple(s // u for s, u in zip(strides[0], upsample))

        num_levels = len(strides)
        channels = [embed_dim * 2**level for level in range(num_levels)]
        self.num_modalities = num_modalities
        self.level_channels = channels

        self.calibrations = nn.ModuleList(
            [
                InformationCalibrationModule(
                    3, num_modalities * c, c, upsample=upsample, use_se=use_se, se_reduction=se_reduction
                )
                for c in channels
            ]
        )
        self.input_block = UnetResSEBlock(
            3, num_modalities, embed_dim // 2, kernel_size=3, stride=1, use_se=use_se, se_reduction=se_reduction
        )
        # up_blocks[l - 1] merges level l into level l - 1; up_blocks[-1] reaches the input resolution.
        self.up_blocks = nn.ModuleList(
            [
                UnetrUpBlock(3, channels[level], channels[level - 1], 3, strides[level], "instance", res_block=True)
                for level in range(1, num_levels)
            ]
        )
        self.up_blocks.append(
            UnetrUpBlock(3, channels[0], embed_dim // 2, 3, final_upsample, "instance", res_block=True)
        )
        self.out = UnetOutBlock(3, embed_dim // 2, out_channels)

    def forward(self, image: torch.Tensor, levels: list[torch.Tensor]) -> torch.Tensor:
        """Decode the stacked encoder ``levels`` into logits at the resolution of ``image``."""
        if len(levels) != len(self.calibrations):
            raise ValueError(f"expected {len(self.calibrations)} encoder levels, got {len(levels)}.")
        calibrated = [icm(level) for icm, level in zip(self.calibrations, levels)]

        decoded = calibrated[-1]
        for level in range(len(calibrated) - 1, 0, -1):
            decoded = self.up_blocks[level - 1](decoded, calibrated[level - 1])
        decoded = self.up_blocks[-1](decoded, self.input_block(image))
        return self.out(decoded)
