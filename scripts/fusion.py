"""Window attention blocks of PT-Net's encoder: the shifted-window (Swin) block,
the window fusion block (WFB) and the multimodal fusion block (MFB).

All blocks take channels-last feature maps of shape (B, X, Y, Z, C), as MONAI's
Swin blocks do. They build on ``monai.networks.nets.swin_unetr`` (window
partition and reverse, shift masks, window clamping, ``WindowAttention``'s
parameters) and ``monai.networks.blocks.MLPBlock``.

The attention here differs from MONAI 1.6.1's ``WindowAttention.forward`` in one
respect. Where a feature map is smaller than the configured window on some
axis, the window shrinks to the feature size on that axis (the effective
window). MONAI then takes the top-left ``n x n`` block of the configured
window's relative position index, which holds the offsets of the wrong token
pairs unless only the first axis shrank. ``CrossWindowAttention`` instead selects
the rows and columns of the effective window's tokens, so every pair of tokens
reads the bias table row of its true offset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from monai.networks.nets.swin_unetr import (
    WindowAttention,
    compute_mask,
    get_window_size,
    window_partition,
    window_reverse,
)

__all__ = ["CrossWindowAttention", "SwinBlock", "WindowFusionBlock", "MultimodalFusionBlock"]

logger = logging.getLogger(__name__)


def _as_window(window_size: Sequence[int], name: str = "window_size") -> tuple[int, int, int]:
    """Validate a 3D window size and return it as a tuple of three ints."""
    window = tuple(int(w) for w in window_size)
    if len(window) != 3 or any(w < 1 for w in window):
        raise ValueError(f"{name} must be three positive integers (X, Y, Z), got {tuple(window_size)}.")
    return window  # type: ignore[return-value]


class CrossWindowAttention(WindowAttention):
    """Window multi-head attention with relative position bias, queries from one input and keys and values from another.

    For window tokens ``x`` (queries) and ``context`` (keys and values), each of shape
    (B * num_windows, n, C) with ``n`` tokens per window, every head computes
    ``softmax(q k^T / sqrt(C / num_heads) + bias + mask) v`` with ``q = x W_q``,
    ``k = context W_k`` and ``v = context W_v``, then the heads are concatenated and
    projected. With ``context=None`` (or ``context is x``) this is the self-attention
    of a Swin block.

    The parameters are those of MONAI's ``WindowAttention``, so state dicts are
    interchangeable: the first ``C`` output rows of ``qkv`` project queries and
    the remaining ``2C`` rows project keys and values.

    The relative position bias is read for the effective window given to
    ``forward``. Its index is built from the configured window's index (the
    rows and columns of the effective window's tokens) and cached per effective
    window and device.

    Args:
        dim: number of feature channels ``C``.
        num_heads: number of attention heads. ``dim`` must be divisible by it.
        window_size: configured window (X, Y, Z) in tokens. It sets the size of
            the bias table: ``(2X - 1)(2Y - 1)(2Z - 1)`` rows by ``num_heads``.
        qkv_bias: add a learnable bias to the query, key and value projections.
        attn_drop: dropout rate on the attention weights.
        proj_drop: dropout rate on the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        window = _as_window(window_size)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}). Change one of them.")
        super().__init__(
            dim=dim,
            num_heads=num_heads,
            window_size=window,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
        )
        self.window_size = window
        self._index_cache: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def relative_position_index_for(self, window_size: Sequence[int]) -> torch.Tensor:
        """Return the bias-table row of every token pair of an effective window.

        Args:
            window_size: effective window (X, Y, Z), at most the configured window on each axis.

        Returns:
            Long tensor (n, n) with ``n = X * Y * Z``. Entry ``[p, q]`` is the table row of
            the offset ``coords(p) - coords(q)``, tokens flattened in (X, Y, Z) order.
        """
        window = _as_window(window_size)
        if any(w > full for w, full in zip(window, self.window_size)):
            raise ValueError(
                f"effective window {window} is larger than the configured window {self.window_size} on some axis. "
                "Pass a window clamped to the configured size."
            )
        index: torch.Tensor = self.relative_position_index  # type: ignore[assignment]
        key = (window, index.device)
        cached = self._index_cache.get(key)
        if cached is not None:
            return cached

        if window == self.window_size:
            selected = index
        else:
            # Flat positions, inside the configured window, of the effective window's tokens.
            full_y, full_z = self.window_size[1], self.window_size[2]
            grid = torch.meshgrid(*[torch.arange(w, device=index.device) for w in window], indexing="ij")
            tokens = (grid[0] * full_y * full_z + grid[1] * full_z + grid[2]).reshape(-1)  # (n,)
            selected = index[tokens][:, tokens]  # (n, n)
        # A tensor cached while tracing would enter the next trace as a constant, and
        # torch.jit.trace's check would then see two different graphs.
        if not torch.jit.is_tracing():
            self._index_cache[key] = selected
        return selected

    def relative_position_bias(self, window_size: Sequence[int] | None = None) -> torch.Tensor:
        """Return the relative position bias of an effective window, shape (num_heads, n, n)."""
        window = self.window_size if window_size is None else _as_window(window_size)
        index = self.relative_position_index_for(window)
        n = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)].reshape(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        window_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Attend from the tokens of ``x`` to the tokens of ``context`` in the same window.

        Args:
            x: query tokens (B * num_windows, n, C).
            mask: additive shift mask (num_windows, n, n) with 0 or -100, or None.
            context: key and value tokens, same shape as ``x``. None means ``x``.
            window_size: effective window (X, Y, Z) with ``X * Y * Z == n``. None means the
                configured window.

        Returns:
            Tensor (B * num_windows, n, C).
        """
        b, n, c = x.shape
        head_dim = c // self.num_heads

        if context is None or context is x:
            qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # each (b, heads, n, head_dim)
        else:
            weight_q, weight_kv = self.qkv.weight.split([c, 2 * c], dim=0)
            bias_q: torch.Tensor | None = None
            bias_kv: torch.Tensor | None = None
            if self.qkv.bias is not None:
                bias_q, bias_kv = self.qkv.bias.split([c, 2 * c], dim=0)
            q = F.linear(x, weight_q, bias_q).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
            kv = F.linear(context, weight_kv, bias_kv).reshape(b, n, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
            k, v = kv[0], kv[1]  # each (b, heads, n, head_dim)

        attn = (q * self.scale) @ k.transpose(-2, -1)  # (b, heads, n, n)
        attn = attn + self.relative_position_bias(window_size).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(b // num_windows, num_windows, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(b, self.num_heads, n, n)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn).to(v.dtype)

        out = (attn @ v).transpose(1, 2).reshape(b, n, c)  # heads concatenated
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """Swin Transformer block with window self-attention (the shift-window block, SWB).

    ``Z = x + DropPath(W-MSA(LN(x)))`` then ``out = Z + DropPath(MLP(LN(Z)))``, where W-MSA is
    window multi-head self-attention with relative position bias. A shifted block
    rolls the feature map by half a window before partitioning and masks the
    token pairs that the roll brought together.

    Per axis, the window shrinks to the feature size where the feature map is not
    larger than the window, and on such an axis the block does not shift
    (``monai.networks.nets.swin_unetr.get_window_size``). Feature sizes that are not
    multiples of the window are zero-padded after the first LayerNorm.

    Args:
        dim: number of feature channels ``C``.
        num_heads: number of attention heads.
        window_size: configured window (X, Y, Z) in tokens.
        shifted: shift the windows by ``window_size // 2``.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: add a learnable bias to the query, key and value projections.
        drop: dropout rate after the attention projection and in the MLP.
        attn_drop: dropout rate on the attention weights.
        drop_path: stochastic depth rate of both residual branches.
        use_checkpoint: recompute the block in the backward pass (gradient
            checkpointing) while training, to save memory.

    Shapes:
        ``forward(x)``: x (B, X, Y, Z, C) -> (B, X, Y, Z, C).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int],
        shifted: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}.")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}.")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = _as_window(window_size)
        self.shifted = shifted
        self.shift_size = tuple(w // 2 for w in self.window_size) if shifted else (0, 0, 0)
        self.use_checkpoint = use_checkpoint

        self.norm1 = nn.LayerNorm(dim)
        self.attn = CrossWindowAttention(
            dim, num_heads, self.window_size, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(hidden_size=dim, mlp_dim=int(dim * mlp_ratio), dropout_rate=drop, dropout_mode="swin")
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def window_and_shift(self, spatial_size: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return the effective window and shift (X, Y, Z) for a feature map of ``spatial_size``."""
        window, shift = get_window_size(tuple(int(s) for s in spatial_size), self.window_size, self.shift_size)
        return tuple(window), tuple(shift)

    def shift_mask(
        self, padded_size: Sequence[int], window: Sequence[int], shift: Sequence[int], device: torch.device
    ) -> torch.Tensor | None:
        """Return the additive attention mask (num_windows, n, n) of a shifted partition, or None without shift."""
        if not any(s > 0 for s in shift):
            return None
        key = (tuple(padded_size), tuple(window), tuple(shift), device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = compute_mask(list(padded_size), tuple(window), tuple(shift), device)
            if not torch.jit.is_tracing():  # see relative_position_index_for
                self._mask_cache[key] = mask
        return mask

    def _attend(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Apply (shifted) window attention to normalised channels-last maps, returning (B, X, Y, Z, C)."""
        b, size_x, size_y, size_z, c = x.shape
        window, shift = self.window_and_shift((size_x, size_y, size_z))

        # Zero-pad each spatial axis up to a multiple of the window.
        pad_x = (window[0] - size_x % window[0]) % window[0]
        pad_y = (window[1] - size_y % window[1]) % window[1]
        pad_z = (window[2] - size_z % window[2]) % window[2]
        padding = (0, 0, 0, pad_z, 0, pad_y, 0, pad_x)
        if pad_x or pad_y or pad_z:
            x = F.pad(x, padding)
            if context is not None:
                context = F.pad(context, padding)
        padded = (size_x + pad_x, size_y + pad_y, size_z + pad_z)

        mask = self.shift_mask(padded, window, shift, x.device)
        if mask is not None:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
            if context is not None:
                context = torch.roll(context, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))

        x_windows = window_partition(x, window)  # (B * num_windows, n, C)
        context_windows = None if context is None else window_partition(context, window)
        out_windows = self.attn(x_windows, mask=mask, context=context_windows, window_size=window)
        out_windows = out_windows.view(-1, window[0], window[1], window[2], c)
        out = window_reverse(out_windows, window, [b, padded[0], padded[1], padded[2]])  # (B, Xp, Yp, Zp, C)

        if mask is not None:
            out = torch.roll(out, shifts=(shift[0], shift[1], shift[2]), dims=(1, 2, 3))
        if pad_x or pad_y or pad_z:
            out = out[:, :size_x, :size_y, :size_z, :].contiguous()
        return out

    def _block(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Apply the attention and MLP residual branches to ``x``, with ``context`` already normalised."""
        x = x + self.drop_path(self._attend(self.norm1(x), context))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _run(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Run ``_block``, under gradient checkpointing when enabled and training."""
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._block, x, context, use_reentrant=False)  # type: ignore[no-any-return]
        return self._block(x, context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply window self-attention and the MLP to ``x`` (B, X, Y, Z, C)."""
        return self._run(x, None)


class WindowFusionBlock(SwinBlock):
    """Window fusion block (WFB): a Swin block whose attention reads keys and values from a second modality.

    For the major modality's map ``x1`` and a minor modality's map ``x2``:
    ``Z = x1 + DropPath(WF-MSA(LN1(x1), LN2(x2)))`` then ``out = Z + DropPath(MLP(LN(Z)))``,
    where WF-MSA is window multi-head attention with queries from ``LN1(x1)`` and
    keys and values from ``LN2(x2)`` in the same window (``CrossWindowAttention``).
    Both inputs are partitioned, padded and shifted identically. Arguments are
    those of ``SwinBlock``.

    Shapes:
        ``forward(x, context)``: x and context (B, X, Y, Z, C) -> (B, X, Y, Z, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], **kwargs) -> None:
        super().__init__(dim, num_heads, window_size, **kwargs)
        self.norm_context = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Fuse ``context`` (minor modality) into ``x`` (major modality), both (B, X, Y, Z, C)."""
        if context.shape != x.shape:
            raise ValueError(
                f"major and minor feature maps must have the same shape, got {tuple(x.shape)} and "
                f"{tuple(context.shape)}."
            )
        return self._run(x, self.norm_context(context))


class MultimodalFusionBlock(nn.Module):
    """Multimodal fusion block (MFB): fuses the other modalities into one modality's feature map.

    For the major modality ``x_i`` and the minor modalities, in modality order:

    - three modalities (minors ``x_j``, ``x_k``): ``x_ij = WFB(x_i, x_j)``,
      ``x_ik = WFB(x_i, x_k)``, ``out = WFB(x_ij, x_ik)``, three blocks with their own weights;
    - two modalities (minor ``x_j``): ``out = WFB(x_i, x_j)``;
    - one modality: ``out = SwinBlock(x_i)``, a window self-attention block. With no
      partner to fuse, the block degenerates to a Swin window block, so a
      one-modality PT-Net is a plain Swin encoder with two blocks per stage.

    The fusion blocks use regular (unshifted) windows. Each encoder stage then
    pairs the regular-window fusion with the shifted-window self-attention block
    that follows it, the same W-MSA / SW-MSA alternation as Swin Transformer, so
    information crosses window borders once per stage.

    Args:
        dim: number of feature channels ``C``.
        num_heads: number of attention heads.
        window_size: configured window (X, Y, Z) in tokens.
        num_modalities: number of modalities M, 1, 2 or 3.
        kwargs: ``mlp_ratio``, ``qkv_bias``, ``drop``, ``attn_drop``, ``drop_path`` and
            ``use_checkpoint`` of ``SwinBlock``, shared by every block.

    Shapes:
        ``forward(major, minors)``: major (B, X, Y, Z, C), ``minors`` a list of M - 1 maps of
        the same shape -> (B, X, Y, Z, C).
    """

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], num_modalities: int, **kwargs) -> None:
        super().__init__()
        if num_modalities not in (1, 2, 3):
            raise ValueError(f"num_modalities must be 1, 2 or 3, got {num_modalities}.")
        if kwargs.get("shifted", False):
            raise ValueError("the fusion blocks use regular windows, so remove shifted=True.")
        self.num_modalities = num_modalities
        self.blocks = nn.ModuleList()
        if num_modalities == 1:
            self.blocks.append(SwinBlock(dim, num_heads, window_size, **kwargs))
        else:
            num_fusions = 1 if num_modalities == 2 else 3
            for _ in range(num_fusions):
                self.blocks.append(WindowFusionBlock(dim, num_heads, window_size, **kwargs))

    def forward(self, major: torch.Tensor, minors: list[torch.Tensor]) -> torch.Tensor:
        """Fuse the ``minors`` into ``major`` (formulas in the class docstring)."""
        if len(minors) != self.num_modalities - 1:
            raise ValueError(
                f"expected {self.num_modalities - 1} minor modality maps for {self.num_modalities} modalities, "
                f"got {len(minors)}."
            )
        if self.num_modalities == 1:
            return self.blocks[0](major)
        if self.num_modalities == 2:
            return self.blocks[0](major, minors[0])

        fused_first = self.blocks[0](major, minors[0])
        fused_second = self.blocks[1](major, minors[1])
        return self.blocks[2](fused_first, fused_second)
