"""Unit tests of PT-Net's window attention, Swin, window fusion and multimodal fusion blocks."""

from __future__ import annotations

import itertools

import pytest
import torch

from monai.networks.nets.swin_unetr import SwinTransformerBlock, WindowAttention, compute_mask, get_window_size
from scripts.fusion import CrossWindowAttention, MultimodalFusionBlock, SwinBlock, WindowFusionBlock

DIM = 8
HEADS = 2
WINDOW = (4, 4, 4)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def expected_bias(table: torch.Tensor, window: tuple[int, int, int], full: tuple[int, int, int]) -> torch.Tensor:
    """Build the (heads, n, n) bias of ``window`` token by token from the table of a ``full`` window."""
    tokens = list(itertools.product(*[range(w) for w in window]))
    n = len(tokens)
    bias = torch.empty(table.shape[1], n, n)
    for p, (px, py, pz) in enumerate(tokens):
        for q, (qx, qy, qz) in enumerate(tokens):
            row = (
                (px - qx + full[0] - 1) * (2 * full[1] - 1) * (2 * full[2] - 1)
                + (py - qy + full[1] - 1) * (2 * full[2] - 1)
                + (pz - qz + full[2] - 1)
            )
            bias[:, p, q] = table[row]
    return bias


def numbered_attention() -> CrossWindowAttention:
    """Return an attention module whose bias table contains distinct values, so a wrong row cannot go unnoticed."""
    attn = CrossWindowAttention(DIM, HEADS, WINDOW)
    with torch.no_grad():
        table = attn.relative_position_bias_table
        table.copy_(torch.arange(table.numel(), dtype=table.dtype).reshape(table.shape))
    return attn


@pytest.mark.parametrize("window", [(4, 4, 2), (4, 2, 4), (2, 2, 2), (3, 4, 1), (2, 4, 4), (4, 4, 4)])
def test_bias_clamped_window_exact(window: tuple[int, int, int]) -> None:
    attn = numbered_attention()
    expected = expected_bias(attn.relative_position_bias_table.detach(), window, WINDOW)

    bias = attn.relative_position_bias(window).detach()

    assert torch.equal(bias, expected)


def test_bias_index_cached_per_window() -> None:
    attn = numbered_attention()

    first = attn.relative_position_index_for((4, 4, 2))
    second = attn.relative_position_index_for((4, 4, 2))

    assert first is second


def test_bias_rejects_larger_window() -> None:
    attn = numbered_attention()

    with pytest.raises(ValueError, match="larger than the configured window"):
        attn.relative_position_bias((4, 4, 5))


def test_attention_adds_clamped_bias() -> None:
    attn = numbered_attention()
    with torch.no_grad():
        attn.relative_position_bias_table.mul_(0.01)
        attn.qkv.weight[: 2 * DIM].zero_()  # queries and keys are zero, so the logits are the bias alone
        attn.qkv.bias[: 2 * DIM].zero_()
    window = (4, 4, 2)
    x = torch.randn(3, 32, DIM)

    out = attn(x, window_size=window)

    bias = expected_bias(attn.relative_position_bias_table.detach(), window, WINDOW)
    v = torch.nn.functional.linear(x, attn.qkv.weight[2 * DIM :], attn.qkv.bias[2 * DIM :])
    v = v.reshape(3, 32, HEADS, DIM // HEADS).transpose(1, 2)
    expected = (bias.softmax(-1).unsqueeze(0) @ v).transpose(1, 2).reshape(3, 32, DIM)
    expected = attn.proj(expected)
    assert torch.allclose(out, expected, atol=1e-6)


def test_self_attention_matches_monai() -> None:
    ours = CrossWindowAttention(DIM, HEADS, WINDOW)
    reference = WindowAttention(DIM, HEADS, WINDOW, qkv_bias=True)
    reference.load_state_dict(ours.state_dict())
    mask = compute_mask([8, 8, 8], WINDOW, (2, 2, 2), torch.device("cpu"))  # 8 windows of 64 tokens
    x = torch.randn(16, 64, DIM)

    out = ours(x, mask=mask)

    assert torch.allclose(out, reference(x, mask), atol=1e-6)


def test_context_none_equals_self_context() -> None:
    attn = CrossWindowAttention(DIM, HEADS, WINDOW)
    x = torch.randn(2, 64, DIM)

    assert torch.allclose(attn(x), attn(x, context=x.clone()), atol=1e-6)


def test_keys_values_from_context() -> None:
    attn = CrossWindowAttention(DIM, HEADS, WINDOW)
    # Every context token of a window is the same vector, so any query yields that token's value.
    context = torch.randn(2, 1, DIM).expand(2, 64, DIM).contiguous()

    out_first = attn(torch.randn(2, 64, DIM), context=context)
    out_second = attn(torch.randn(2, 64, DIM), context=context)

    assert torch.allclose(out_first, out_second, atol=1e-6)


def test_queries_from_major() -> None:
    attn = CrossWindowAttention(DIM, HEADS, WINDOW)
    context = torch.randn(2, 64, DIM)

    out_first = attn(torch.randn(2, 64, DIM), context=context)
    out_second = attn(torch.randn(2, 64, DIM), context=context)

    assert not torch.allclose(out_first, out_second, atol=1e-4)


def test_fusion_block_minor_changes_output() -> None:
    block = WindowFusionBlock(DIM, HEADS, WINDOW).eval()
    major = torch.randn(1, 8, 8, 4, DIM)

    out_first = block(major, torch.randn(1, 8, 8, 4, DIM))
    out_second = block(major, torch.randn(1, 8, 8, 4, DIM))

    assert not torch.allclose(out_first, out_second, atol=1e-4)


def test_fusion_block_self_differs_from_zero_minor() -> None:
    block = WindowFusionBlock(DIM, HEADS, WINDOW).eval()
    major = torch.randn(1, 8, 8, 4, DIM)

    with_self = block(major, major)
    with_zeros = block(major, torch.zeros_like(major))

    assert not torch.allclose(with_self, with_zeros, atol=1e-4)


def test_fusion_block_residual_from_major() -> None:
    block = WindowFusionBlock(DIM, HEADS, WINDOW).eval()
    with torch.no_grad():
        for layer in (block.attn.proj, block.mlp.linear2):
            layer.weight.zero_()
            layer.bias.zero_()
    major = torch.randn(1, 8, 8, 4, DIM)

    out = block(major, torch.randn(1, 8, 8, 4, DIM))

    assert torch.equal(out, major)


def test_fusion_block_rejects_shape_mismatch() -> None:
    block = WindowFusionBlock(DIM, HEADS, WINDOW)

    with pytest.raises(ValueError, match="same shape"):
        block(torch.randn(1, 8, 8, 4, DIM), torch.randn(1, 8, 8, 8, DIM))


def test_fusion_block_pads_uneven_map() -> None:
    block = WindowFusionBlock(DIM, HEADS, WINDOW, shifted=True).eval()
    major = torch.randn(2, 10, 10, 2, DIM)

    out = block(major, torch.randn(2, 10, 10, 2, DIM))

    assert out.shape == major.shape


@pytest.mark.parametrize("shifted", [False, True])
def test_swin_block_matches_monai(shifted: bool) -> None:
    ours = SwinBlock(DIM, HEADS, WINDOW, shifted=shifted).eval()
    shift = (2, 2, 2) if shifted else (0, 0, 0)
    reference = SwinTransformerBlock(DIM, HEADS, WINDOW, shift, qkv_bias=True).eval()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 8, 4, DIM)
    window, effective_shift = get_window_size((8, 8, 4), WINDOW, shift)
    mask = compute_mask([8, 8, 4], window, effective_shift, x.device)

    out = ours(x)

    assert torch.allclose(out, reference(x, mask), atol=1e-5)


def test_shift_skipped_when_map_fits_window() -> None:
    shifted = SwinBlock(DIM, HEADS, WINDOW, shifted=True).eval()
    regular = SwinBlock(DIM, HEADS, WINDOW, shifted=False).eval()
    regular.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 4, 4, 4, DIM)

    assert shifted.window_and_shift((4, 4, 4)) == ((4, 4, 4), (0, 0, 0))
    assert shifted.shift_mask((4, 4, 4), (4, 4, 4), (0, 0, 0), x.device) is None
    assert torch.equal(shifted(x), regular(x))


def test_shift_only_on_larger_axes() -> None:
    block = SwinBlock(DIM, HEADS, WINDOW, shifted=True)

    assert block.window_and_shift((8, 8, 4)) == ((4, 4, 4), (2, 2, 0))
    assert block.window_and_shift((8, 4, 2)) == ((4, 4, 2), (2, 0, 0))


def test_shift_mask_applied_on_larger_map() -> None:
    shifted = SwinBlock(DIM, HEADS, WINDOW, shifted=True).eval()
    regular = SwinBlock(DIM, HEADS, WINDOW, shifted=False).eval()
    regular.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 8, 8, 4, DIM)

    mask = shifted.shift_mask((8, 8, 4), (4, 4, 4), (2, 2, 0), x.device)

    assert mask is not None
    assert mask.shape == (4, 64, 64)
    assert bool((mask == -100.0).any())
    assert not torch.allclose(shifted(x), regular(x), atol=1e-4)


@pytest.mark.parametrize(
    ("num_modalities", "block_type", "count"), [(1, SwinBlock, 1), (2, WindowFusionBlock, 1), (3, WindowFusionBlock, 3)]
)
def test_mfb_structure(num_modalities: int, block_type: type, count: int) -> None:
    mfb = MultimodalFusionBlock(DIM, HEADS, WINDOW, num_modalities)

    assert len(mfb.blocks) == count
    assert all(type(block) is block_type for block in mfb.blocks)


def test_mfb_three_modalities_formula() -> None:
    mfb = MultimodalFusionBlock(DIM, HEADS, WINDOW, 3).eval()
    x1, x2, x3 = (torch.randn(1, 8, 8, 4, DIM) for _ in range(3))

    out = mfb(x1, [x2, x3])

    expected = mfb.blocks[2](mfb.blocks[0](x1, x2), mfb.blocks[1](x1, x3))
    assert torch.equal(out, expected)


def test_mfb_minor_order_matters() -> None:
    mfb = MultimodalFusionBlock(DIM, HEADS, WINDOW, 3).eval()
    x1, x2, x3 = (torch.randn(1, 8, 8, 4, DIM) for _ in range(3))

    assert not torch.allclose(mfb(x1, [x2, x3]), mfb(x1, [x3, x2]), atol=1e-5)


def test_mfb_rejects_wrong_minor_count() -> None:
    mfb = MultimodalFusionBlock(DIM, HEADS, WINDOW, 3)
    x = torch.randn(1, 4, 4, 4, DIM)

    with pytest.raises(ValueError, match="expected 2 minor"):
        mfb(x, [x])


def test_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossWindowAttention(10, 4, WINDOW)
