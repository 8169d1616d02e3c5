"""Unit tests of the PT-Net network: shapes, input checks, ablations, encoders, gradients and tracing."""

from __future__ import annotations

import re

import pytest
import torch

from monai.bundle import ConfigParser
from scripts.ptnet import SMALL_PRESET, SPATIAL_DIVISOR, PTNet, nearest_valid_size

PATCH = (64, 64, 8)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def small_net(in_channels: int = 3, **kwargs) -> PTNet:
    return PTNet(in_channels=in_channels, **{**SMALL_PRESET, **kwargs})


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("in_channels", [1, 2, 3])
def test_output_shape_per_modality_count(in_channels: int) -> None:
    net = small_net(in_channels).eval()
    x = torch.randn(2, in_channels, *PATCH)

    with torch.no_grad():
        out = net(x)

    assert out.shape == (2, 2, *PATCH)


def test_output_channels_option() -> None:
    net = small_net(out_channels=3).eval()

    with torch.no_grad():
        out = net(torch.randn(1, 3, *PATCH))

    assert out.shape == (1, 3, *PATCH)


def test_level_shapes_small_preset() -> None:
    net = small_net().eval()
    captured: list[list[tuple[int, ...]]] = []
    net.decoder.register_forward_pre_hook(lambda _module, args: captured.append([tuple(t.shape) for t in args[1]]))

    with torch.no_grad():
        net(torch.randn(1, 3, 128, 128, 16))

    # Three modalities of 12 * 2**level channels, strides (4, 4, 2), then (2, 2, 1) twice and (2, 2, 2) twice.
    assert captured[0] == [
        (1, 36, 32, 32, 8),
        (1, 72, 16, 16, 8),
        (1, 144, 8, 8, 8),
        (1, 288, 4, 4, 4),
        (1, 576, 2, 2, 2),
    ]


def test_small_preset_parameter_count() -> None:
    assert count_parameters(small_net()) == 8_365_667


def test_spatial_divisor_value() -> None:
    assert SPATIAL_DIVISOR == (64, 64, 8)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((64, 60, 8), (64, 64, 8)),
        ((100, 64, 12), (128, 64, 16)),
        ((20, 20, 3), (64, 64, 8)),
        ((320, 320, 8), (320, 320, 8)),
    ],
)
def test_nearest_valid_size(size: tuple[int, int, int], expected: tuple[int, int, int]) -> None:
    assert nearest_valid_size(size) == expected


@pytest.mark.parametrize(("size", "suggested"), [((64, 60, 8), "(64, 64, 8)"), ((100, 64, 12), "(128, 64, 16)")])
def test_invalid_size_raises_with_suggestion(size: tuple[int, int, int], suggested: str) -> None:
    net = small_net()

    with pytest.raises(ValueError, match=re.escape(f"nearest valid size is {suggested}")):
        net(torch.randn(1, 3, *size))


def test_invalid_size_message_names_shape() -> None:
    net = small_net()

    with pytest.raises(ValueError, match=r"input spatial size \(64, 60, 8\)"):
        net(torch.randn(1, 3, 64, 60, 8))


def test_wrong_channel_count_raises() -> None:
    net = small_net(3)

    with pytest.raises(ValueError, match="built for 3 modalities .* input has 2"):
        net(torch.randn(1, 2, *PATCH))


def test_wrong_dimension_count_raises() -> None:
    net = small_net(3)

    with pytest.raises(ValueError, match="5D input"):
        net(torch.randn(3, *PATCH))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"in_channels": 4}, "in_channels"),
        ({"embed_dim": 13}, "embed_dim"),
        ({"num_heads": [5, 2, 4, 8]}, "not divisible by num_heads"),
        ({"num_heads": [1, 2, 4]}, "num_heads must be 4"),
        ({"window_size": (4, 4)}, "window_size"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"embed_norm": "batch"}, "embed_norm"),
        ({"out_channels": 0}, "out_channels"),
    ],
)
def test_invalid_argument_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        small_net(**kwargs)


@pytest.mark.parametrize("ablation", [{"use_se": False}, {"use_fusion": False}])
def test_ablation_runs_with_fewer_parameters(ablation: dict) -> None:
    full = small_net()
    ablated = small_net(**ablation).eval()

    with torch.no_grad():
        out = ablated(torch.randn(1, 3, *PATCH))

    assert out.shape == (1, 2, *PATCH)
    assert count_parameters(ablated) < count_parameters(full)


def test_instance_embedding_norm_runs() -> None:
    net = small_net(embed_norm="instance").eval()

    with torch.no_grad():
        out = net(torch.randn(1, 3, *PATCH))

    assert out.shape == (1, 2, *PATCH)


def test_encoders_do_not_share_weights() -> None:
    net = small_net(3)
    storages = [{p.data_ptr() for p in net.encoder_parameters(i)} for i in range(3)]

    assert not storages[0] & storages[1]
    assert not storages[0] & storages[2]
    assert not storages[1] & storages[2]
    assert not torch.equal(net.embeddings[0][0].conv.weight, net.embeddings[1][0].conv.weight)


def test_encoder_parameters_cover_encoder() -> None:
    net = small_net(3)
    decoder = count_parameters(net.decoder)
    encoders = sum(p.numel() for i in range(3) for p in net.encoder_parameters(i))

    assert encoders + decoder == count_parameters(net)


def test_gradients_reach_every_encoder() -> None:
    net = small_net(3)
    out = net(torch.randn(1, 3, *PATCH))

    out.square().mean().backward()

    for i in range(3):
        missing = [p.shape for p in net.encoder_parameters(i) if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert missing == [], f"encoder {i} parameters without gradient: {missing}"


def test_checkpointing_keeps_gradients() -> None:
    plain = small_net(3)
    checkpointed = small_net(3, use_checkpoint=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, *PATCH)

    plain(x).square().mean().backward()
    checkpointed(x).square().mean().backward()

    for (name, p_plain), p_ckpt in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p_plain.grad, p_ckpt.grad, atol=1e-6), name


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_matches_eager() -> None:
    net = small_net(3).eval()
    example = torch.randn(1, 3, *PATCH)
    other = torch.randn(1, 3, *PATCH)

    # check_trace stays on, as in MONAI's ckpt_export, so a trace that differs between runs fails here.
    with torch.no_grad():
        traced = torch.jit.trace(net, example)
        traced_out = traced(other)
        eager_out = net(other)

    assert torch.allclose(traced_out, eager_out, atol=1e-5)


def test_bundle_config_instantiates() -> None:
    config = {"network_def": {"_target_": "scripts.ptnet.PTNet", "in_channels": 3, **SMALL_PRESET}}

    net = ConfigParser(config).get_parsed_content("network_def")

    assert isinstance(net, PTNet)
    assert net.embed_dim == SMALL_PRESET["embed_dim"]
