"""PT-Net: a Transformer network with cross-modality window attention for multimodal MRI segmentation.

A bundle config builds it with ``_target_: scripts.ptnet.PTNet``. ``SMALL_PRESET`` lists
the constructor values of a small variant for tests and CPU profiling.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from monai.networks.blocks import Convolution

from scripts.decoder import PTNetDecoder
from scripts.fusion import MultimodalFusionBlock, SwinBlock

__all__ = ["PTNet", "SMALL_PRESET", "SPATIAL_DIVISOR", "EMBED_STRIDES", "STAGE_STRIDES", "nearest_valid_size"]

logger = logging.getLogger(__name__)

EMBED_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 2, 2), (2, 2, 1))
"""Strides (X, Y, Z) of the two embedding convolution blocks: the through-plane axis Z is halved once."""

STAGE_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))
"""Strides (X, Y, Z) of the patch merging at the end of each encoder stage."""

SPATIAL_DIVISOR: tuple[int, int, int] = tuple(  # type: ignore[assignment]
    math.prod(stride[axis] for stride in EMBED_STRIDES + STAGE_STRIDES) for axis in range(3)
)
"""Every input size (X, Y, Z) must be a multiple of this, (64, 64, 8)."""

SMALL_PRESET: dict = {"embed_dim": 12, "num_heads": [1, 2, 4, 8], "drop_path_rate": 0.0}
"""Constructor values of a small PT-Net for tests and CPU profiling.

Channels 12, 24, 48, 96 and 192 per modality at the five encoder levels (a quarter of
the default), heads chosen to keep 12 channels per head as the default does, and no
stochastic depth. With three modalities it has 8.4 million parameters against 132.7
million for the default. In a bundle config, set the same keys next to
``_target_: scripts.ptnet.PTNet``, for example ``embed_dim: 12`` and ``num_heads: [1, 2, 4, 8]``.
"""


def nearest_valid_size(spatial_size: Sequence[int]) -> tuple[int, ...]:
    """Return the input size (X, Y, Z) closest to ``spatial_size`` that PT-Net accepts.

    Each axis is rounded to the nearest multiple of ``SPATIAL_DIVISOR`` (halves round up),
    and to at least one multiple.
    """
    return tuple(max(d, d * math.floor(s / d + 0.5)) for s, d in zip(spatial_size, SPATIAL_DIVISOR))


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first map (B, C, X, Y, Z), each voxel on its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (B, C, *spatial) over C."""
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


def _embedding_norm(name: str, channels: int) -> nn.Module:
    """Return the normalisation layer of the embedding for ``name`` "instance" or "layer"."""
    if name == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return ChannelLayerNorm(channels)


class ConvEmbedding(nn.Sequential):
    """Convolutional embedding of one modality: two blocks of two 3x3x3 convolutions, each followed by GELU and a norm.

    The first convolution of each block has the block's stride (``EMBED_STRIDES``,
    (2, 2, 2) then (2, 2, 1)), and the blocks output ``embed_dim / 2`` and ``embed_dim``
    channels.

    Shapes:
        (B, 1, X, Y, Z) -> (B, embed_dim, X / 4, Y / 4, Z / 2).
    """

    def __init__(self, embed_dim: int, norm: str) -> None:
        layers: list[nn.Module] = []
        in_channels = 1
        for stride, channels in zip(EMBED_STRIDES, (embed_dim // 2, embed_dim)):
            for conv_stride in (stride, 1):
                layers.append(
                    Convolution(3, in_channels, channels, strides=conv_stride, kernel_size=3, act="GELU", norm=None)
                )
                layers.append(_embedding_norm(norm, channels))
                in_channels = channels
        super().__init__(*layers)


class ConvPatchMerging(nn.Module):
    """Patch merging: GELU, LayerNorm, then a 3x3x3 strided convolution that doubles the channels.

    Shapes:
        (B, X, Y, Z, C) channels-last -> (B, 2C, X / sx, Y / sy, Z / sz) channels-first.
    """

    def __init__(self, dim: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim)
        self.reduction = Convolution(3, dim, 2 * dim, strides=tuple(stride), kernel_size=3, conv_only=True, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Down-sample the channels-last map ``x``."""
        x = self.norm(self.act(x))
        return self.reduction(x.permute(0, 4, 1, 2, 3))  # (B, C, X, Y, Z) into the convolution


class EncoderStage(nn.Module):
    """One encoder stage for all modalities: MFB -> shifted Swin block -> patch merging, per modality.

    Each modality has its own blocks (no shared weights). Modality ``i`` fuses the maps
    that the other modalities had at the start of the stage.

    Args:
        dim: channels per modality at the stage input, ``C``.
        num_modalities: number of modalities M.
        num_heads: attention heads of every block in the stage.
        window_size: configured window (X, Y, Z).
        stride: patch-merging stride (X, Y, Z).
        drop_path: stochastic depth rates of the fusion block and of the Swin block.
        use_fusion: use the MFB; False replaces it with a regular-window ``SwinBlock``
            per modality (modality-independent encoders).
        block_kwargs: ``mlp_ratio``, ``qkv_bias``, ``drop``, ``attn_drop``, ``use_checkpoint``.

    Shapes:
        ``forward(features)``: M maps (B, C, X, Y, Z) -> (M maps (B, 2C, X', Y', Z') for the
        next stage, M of the same maps after a channel LayerNorm for the decoder).
    """

    def __init__(
        self,
        dim: int,
        num_modalities: int,
        num_heads: int,
        window_size: Sequence[int],
        stride: Sequence[int],
        drop_path: tuple[float, float],
        use_fusion: bool,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.num_modalities = num_modalities
        self.use_fusion = use_fusion
        self.fusion_blocks = nn.ModuleList()
        self.swin_blocks = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.output_norms = nn.ModuleList()
        for _ in range(num_modalities):
            if use_fusion:
                first: nn.Module = MultimodalFusionBlock(
                    dim, num_heads, window_size, num_modalities, drop_path=drop_path[0], **block_kwargs
                )
            else:
                first = SwinBlock(dim, num_heads, window_size, shifted=False, drop_path=drop_path[0], **block_kwargs)
            self.fusion_blocks.append(first)
            self.swin_blocks.append(
                SwinBlock(dim, num_heads, window_size, shifted=True, drop_path=drop_path[1], **block_kwargs)
            )
            self.merges.append(ConvPatchMerging(dim, stride))
            self.output_norms.append(ChannelLayerNorm(2 * dim))

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the stage on the M modality maps (shapes in the class docstring)."""
        channels_last = [f.permute(0, 2, 3, 4, 1) for f in features]  # M x (B, X, Y, Z, C)

        merged: list[torch.Tensor] = []
        normalised: list[torch.Tensor] = []
        for i in range(self.num_modalities):
            major = channels_last[i]
            if self.use_fusion:
                minors = [channels_last[j] for j in range(self.num_modalities) if j != i]
                x = self.fusion_blocks[i](major, minors)
            else:
                x = self.fusion_blocks[i](major)
            x = self.swin_blocks[i](x)
            out = self.merges[i](x)  # (B, 2C, X', Y', Z')
            merged.append(out)
            normalised.append(self.output_norms[i](out))
        return merged, normalised


class PTNet(nn.Module):
    """PT-Net, the multimodal Transformer segmentation network of Gao et al., "An Anatomy-aware Framework
    for Automatic Segmentation of Parotid Tumor from Multimodal MRI".

    Each of the M modalities has its own encoder (no shared weights). An encoder is a
    convolutional embedding followed by four stages. A stage is a multimodal fusion
    block (MFB: window attention with queries from this modality and keys and values
    from the others), a shifted-window Swin block and a convolutional patch merging.
    The decoder stacks the M maps of every level and calibrates them with an
    information calibration module (ICM: transposed convolution, then a residual block
    with squeeze-and-excitation), which reduces the channels to those of one modality.
    U-Net skip connections merge the calibrated levels up to the input resolution.

    Shapes for the default 320 x 320 x 8 patch (X, Y, Z; the through-plane axis last), M = 3,
    ``embed_dim = 48``, batch B, per modality unless stacked:

    ================================  ========================  =================
    step                              output                    window / heads
    ================================  ========================  =================
    input                             (B, 3, 320, 320, 8)
    embedding block 1, stride 2,2,2   (B, 24, 160, 160, 4)
    embedding block 2, stride 2,2,1   (B, 48, 80, 80, 4)        level 0
    stage 1 MFB + SWB                 (B, 48, 80, 80, 4)        4,4,4 / 4
    stage 1 merging, stride 2,2,1     (B, 96, 40, 40, 4)        level 1
    stage 2 MFB + SWB, merging        (B, 192, 20, 20, 4)       4,4,4 / 8, level 2
    stage 3, merging stride 2,2,2     (B, 384, 10, 10, 2)       4,4,4 / 16, level 3
    stage 4, merging stride 2,2,2     (B, 768, 5, 5, 1)         4,4,2 / 32, level 4
    ICM 0..4 (stacked 3 x C in)       (B, 48, 160, 160, 4) .. (B, 768, 10, 10, 1)
    full-resolution input block       (B, 24, 320, 320, 8)
    up-sampling 768 -> 384 -> 192     (B, 192, 40, 40, 4)       strides 2,2,2
    up-sampling 192 -> 96 -> 48       (B, 48, 160, 160, 4)      strides 2,2,1
    up-sampling 48 -> 24, output      (B, 2, 320, 320, 8)       stride 2,2,2
    ================================  ========================  =================

    The shifted Swin blocks shift by half a window on the axes where the feature map is
    larger than the window. At this patch size no stage has more than 4 slices (Z), so
    no window shifts along Z, and at stage 4 the window is clamped to 2 slices. The
    relative position bias is correct for clamped windows (see
    ``scripts.fusion.CrossWindowAttention``).

    With the defaults and three modalities the network has 132.7 million parameters:
    60.6 million in the three encoders, 52.6 million in the ICMs and 19.4 million in the
    up-sampling path.

    ``torch.jit.trace`` works (MONAI's ``ckpt_export --use_trace True``). ``torch.jit.script``
    does not, because MONAI's window helpers ``get_window_size`` and ``compute_mask`` are not
    scriptable.

    NOTE: a traced PT-Net is valid only for the spatial size it was traced with (the batch
    size may change). Another size runs without error but gives wrong logits, because the
    trace fixes the windows, shifts and masks. Trace with the sliding-window ROI size.

    Args:
        in_channels: number of modalities M, 1, 2 or 3, stacked as input channels.
        out_channels: number of output channels (classes, logits), default 2.
        embed_dim: channels per modality after the embedding, ``C``. The four stages work at
            C, 2C, 4C and 8C channels. Must be even and make every stage's channels
            divisible by its heads.
        num_heads: attention heads of the four stages, default (4, 8, 16, 32).
        window_size: attention window (X, Y, Z) in tokens, default (4, 4, 4). On each axis
            it is clamped to the feature size where the feature map is not larger.
        mlp_ratio: hidden width of the Transformer MLPs as a multiple of the channels.
        qkv_bias: add a learnable bias to the query, key and value projections.
        drop_rate: dropout rate after attention projections and in the MLPs.
        attn_drop_rate: dropout rate on attention weights.
        drop_path_rate: stochastic depth rate of the last Transformer block. The rate rises
            linearly from 0 over the eight blocks of each encoder (MFB and Swin block of
            the four stages), as in Swin Transformer. Default 0.2.
        embed_norm: normalisation after each embedding convolution, "layer" (default:
            LayerNorm over the channels of each voxel) or "instance" (InstanceNorm3d with
            affine parameters). The method's text names instance normalisation and the
            authors' public implementation uses LayerNorm. "layer" is the default because
            it does not depend on the content of the patch, so a sliding-window patch at
            the edge of a volume (mostly background) is embedded with the same statistics
            as a training patch, and it matches the LayerNorm of the Transformer stages.
        use_se: use squeeze-and-excitation in the decoder (False is the "without SE" ablation).
        use_fusion: use the multimodal fusion blocks (False is the "without MFB" ablation:
            each modality's encoder has a regular-window Swin block in place of the MFB, and
            the modalities only meet in the decoder). No effect with one modality.
        use_checkpoint: gradient checkpointing of every Transformer block while training.

    Raises:
        ValueError: on invalid arguments, and in ``forward`` on an input with the wrong number
            of dimensions or channels or a spatial size that is not a multiple of
            ``SPATIAL_DIVISOR`` (64, 64, 8).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 2,
        embed_dim: int = 48,
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: Sequence[int] = (4, 4, 4),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        embed_norm: str = "layer",
        use_se: bool = True,
        use_fusion: bool = True,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        heads = tuple(int(h) for h in num_heads)
        window = tuple(int(w) for w in window_size)
        self._validate_arguments(in_channels, out_channels, embed_dim, heads, window, drop_path_rate, embed_norm)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.embed_dim = embed_dim
        self.window_size = window

        self.embeddings = nn.ModuleList([ConvEmbedding(embed_dim, embed_norm) for _ in range(in_channels)])

        num_stages = len(STAGE_STRIDES)
        rates = torch.linspace(0, drop_path_rate, 2 * num_stages).tolist()
        block_kwargs = {
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "drop": drop_rate,
            "attn_drop": attn_drop_rate,
            "use_checkpoint": use_checkpoint,
        }
        self.stages = nn.ModuleList(
            [
                EncoderStage(
                    embed_dim * 2**stage,
                    in_channels,
                    heads[stage],
                    window,
                    STAGE_STRIDES[stage],
                    drop_path=(rates[2 * stage], rates[2 * stage + 1]),
                    use_fusion=use_fusion,
                    **block_kwargs,
                )
                for stage in range(num_stages)
            ]
        )

        embed_total = tuple(math.prod(stride[axis] for stride in EMBED_STRIDES) for axis in range(3))
        self.decoder = PTNetDecoder(
            num_modalities=in_channels,
            embed_dim=embed_dim,
            out_channels=out_channels,
            level_strides=(embed_total,) + STAGE_STRIDES,
            calibration_upsample=EMBED_STRIDES[-1],
            use_se=use_se,
        )
        logger.debug(
            "built PTNet: %d modalities, embed_dim %d, %d parameters",
            in_channels,
            embed_dim,
            sum(p.numel() for p in self.parameters()),
        )

    @staticmethod
    def _validate_arguments(
        in_channels: int,
        out_channels: int,
        embed_dim: int,
        heads: tuple[int, ...],
        window: tuple[int, ...],
        drop_path_rate: float,
        embed_norm: str,
    ) -> None:
        """Raise ValueError naming the first invalid constructor argument."""
        if in_channels not in (1, 2, 3):
            raise ValueError(f"in_channels (number of modalities) must be 1, 2 or 3, got {in_channels}.")
        if out_channels < 1:
            raise ValueError(f"out_channels must be at least 1, got {out_channels}.")
        if embed_dim < 2 or embed_dim % 2 != 0:
            raise ValueError(f"embed_dim must be a positive even number, got {embed_dim}.")
        if len(heads) != len(STAGE_STRIDES) or any(h < 1 for h in heads):
            raise ValueError(f"num_heads must be {len(STAGE_STRIDES)} positive integers, one per stage, got {heads}.")
        for stage, h in enumerate(heads):
            channels = embed_dim * 2**stage
            if channels % h != 0:
                raise ValueError(
                    f"stage {stage + 1} has {channels} channels, not divisible by num_heads[{stage}] = {h}. "
                    "Choose heads that divide embed_dim * 2**stage."
                )
        if len(window) != 3 or any(w < 1 for w in window):
            raise ValueError(f"window_size must be three positive integers (X, Y, Z), got {window}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        if embed_norm not in ("instance", "layer"):
            raise ValueError(f'embed_norm must be "instance" or "layer", got {embed_norm!r}.')

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, in_channels, X, Y, Z) with X, Y, Z multiples of (64, 64, 8)."""
        if x.ndim != 5:
            raise ValueError(
                f"PTNet expects a 5D input (B, M, X, Y, Z), got shape {tuple(x.shape)} with {x.ndim} dimensions."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"PTNet was built for {self.in_channels} modalities (input channels) but the input has "
                f"{x.shape[1]}. Stack the modalities as channels or set in_channels={x.shape[1]}."
            )
        spatial = tuple(int(s) for s in x.shape[2:])
        if any(s % d != 0 for s, d in zip(spatial, SPATIAL_DIVISOR)):
            raise ValueError(
                f"input spatial size {spatial} is not a multiple of {SPATIAL_DIVISOR} (X, Y, Z), which the "
                f"down-sampling requires. The nearest valid size is {nearest_valid_size(spatial)}."
            )

    def encoder_parameters(self, modality: int) -> list[nn.Parameter]:
        """Return the parameters of one modality's encoder: embedding and every stage's blocks."""
        modules: list[nn.Module] = [self.embeddings[modality]]
        for stage in self.stages:
            modules += [
                stage.fusion_blocks[modality],
                stage.swin_blocks[modality],
                stage.merges[modality],
                stage.output_norms[modality],
            ]
        return [p for module in modules for p in module.parameters()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment ``x`` (B, M, X, Y, Z) into logits (B, out_channels, X, Y, Z)."""
        self.check_input(x)

        features = [embedding(x[:, i : i + 1]) for i, embedding in enumerate(self.embeddings)]
        levels = [torch.cat(features, dim=1)]  # (B, M * C, X / 4, Y / 4, Z / 2)
        for stage in self.stages:
            features, normalised = stage(features)
            levels.append(torch.cat(normalised, dim=1))  # (B, M * C_l, *R_l)

        return self.decoder(x, levels)
