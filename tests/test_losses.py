"""Tests of the anatomy-aware loss and its Dice combination, with exact expected values."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceLoss

from scripts.losses import AnatomyAwareLoss, DiceAnatomyAwareLoss, activation_centre, spacing_from_affine

SHAPE = (16, 12, 8)


def cube_mask(start: tuple[int, int, int], size: int = 3, shape: tuple[int, int, int] = SHAPE) -> torch.Tensor:
    """Return a (1, 1, X, Y, Z) class-index mask with a cube of ones at ``start``."""
    mask = torch.zeros(1, 1, *shape)
    x, y, z = start
    mask[0, 0, x : x + size, y : y + size, z : z + size] = 1
    return mask


def one_hot_probabilities(mask: torch.Tensor) -> torch.Tensor:
    """Return (1, 2, ...) background/foreground probabilities from a class-index mask."""
    return torch.cat([1 - mask, mask], dim=1)


def probability_loss(**kwargs) -> AnatomyAwareLoss:
    """The loss on probabilities given directly, so expected values are exact."""
    return AnatomyAwareLoss(softmax=False, **kwargs)


def test_centre_of_cube():
    mask = one_hot_probabilities(cube_mask((2, 3, 1)))
    centre = activation_centre(mask)[0, 1]
    # The cube covers voxels 2..4, 3..5 and 1..3; normalised by (size - 1).
    expected = torch.tensor([3 / 15, 4 / 11, 2 / 7])
    assert torch.allclose(centre, expected, atol=1e-6)


def test_centre_of_empty_mask_is_middle():
    centre = activation_centre(torch.zeros(1, 1, *SHAPE))
    assert torch.allclose(centre, torch.full((1, 1, 3), 0.5), atol=1e-6)


def test_identical_masks_give_zero():
    mask = cube_mask((4, 4, 2))
    loss = probability_loss()(one_hot_probabilities(mask), mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shift", [1, 3])
def test_shifted_cube_value(axis, shift):
    start = [2, 2, 1]
    moved = list(start)
    moved[axis] += shift
    truth, prediction = cube_mask(tuple(start)), cube_mask(tuple(moved))
    loss = probability_loss(beta=1.5)(one_hot_probabilities(prediction), truth)
    expected = (shift / (SHAPE[axis] - 1)) ** 1.5
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_spacing_scales_each_axis():
    truth = cube_mask((2, 2, 1))
    prediction = cube_mask((4, 3, 2))
    spacing = (0.4, 0.5, 4.4)
    loss = probability_loss(beta=2.0, spacing=spacing)(one_hot_probabilities(prediction), truth)
    expected = (2 / 15) ** 2 * 0.4 + (1 / 11) ** 2 * 0.5 + (1 / 7) ** 2 * 4.4
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_forward_spacing_overrides_constructor():
    truth, prediction = cube_mask((2, 2, 1)), cube_mask((2, 2, 3))
    loss = probability_loss(beta=1.0, spacing=(1.0, 1.0, 1.0))
    value = loss(one_hot_probabilities(prediction), truth, spacing=(1.0, 1.0, 3.0))
    assert value.item() == pytest.approx(3 * 2 / 7, rel=1e-5)


def test_spacing_from_metatensor_affine():
    truth_array, prediction = cube_mask((2, 2, 1)), cube_mask((2, 2, 3))
    affine = torch.diag(torch.tensor([0.4, 0.4, 4.4, 1.0]))
    truth = MetaTensor(truth_array, meta={"affine": affine[None]})
    value = probability_loss(beta=1.0)(one_hot_probabilities(prediction), truth)
    assert value.item() == pytest.approx(4.4 * 2 / 7, rel=1e-5)


def test_spacing_from_rotated_affine():
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = torch.eye(4)
    affine[:3, :3] = rotation @ torch.diag(torch.tensor([0.5, 0.7, 3.0]))
    assert torch.allclose(spacing_from_affine(affine).float(), torch.tensor([0.5, 0.7, 3.0]))


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_beta_is_the_exponent(beta):
    truth, prediction = cube_mask((1, 2, 1)), cube_mask((7, 2, 1))
    value = probability_loss(beta=beta)(one_hot_probabilities(prediction), truth)
    assert value.item() == pytest.approx((6 / 15) ** beta, rel=1e-5)


def test_empty_truth_and_prediction_are_finite():
    empty = torch.zeros(1, 1, *SHAPE)
    value = probability_loss()(one_hot_probabilities(empty), empty)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(0.0, abs=1e-10)


def test_empty_truth_penalises_off_centre_prediction():
    empty = torch.zeros(1, 1, *SHAPE)
    prediction = cube_mask((0, 0, 0))
    value = probability_loss(beta=1.0)(one_hot_probabilities(prediction), empty)
    expected = (0.5 - 1 / 15) + (0.5 - 1 / 11) + (0.5 - 1 / 7)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_batch_mean_and_none_reduction():
    truth = torch.cat([cube_mask((2, 2, 1)), cube_mask((2, 2, 1))])
    prediction = torch.cat([cube_mask((2, 2, 1)), cube_mask((5, 2, 1))])
    per_sample = probability_loss(beta=1.0, reduction="none")(one_hot_probabilities(prediction), truth)
    assert per_sample.shape == (2, 1)
    assert per_sample[1, 0].item() == pytest.approx(3 / 15, rel=1e-5)
    mean = probability_loss(beta=1.0)(one_hot_probabilities(prediction), truth)
    assert mean.item() == pytest.approx(3 / 30, rel=1e-5)


def test_gradient_moves_centre_toward_truth():
    torch.manual_seed(0)
    truth = cube_mask((10, 6, 4))
    logits = torch.zeros(1, 2, *SHAPE)
    logits[:, 1, 1:4, 1:4, 1:3] = 4.0  # a false positive far from the tumour
    logits[:, 1, 10:13, 6:9, 4:7] = 4.0  # and the tumour itself
    logits.requires_grad_(True)
    loss_function = AnatomyAwareLoss()

    loss = loss_function(logits, truth)
    loss.backward()
    assert logits.grad is not None
    assert logits.grad.abs().sum() > 0

    with torch.no_grad():
        before = activation_centre(torch.softmax(logits, 1))[0, 1]
        stepped = logits - 50.0 * logits.grad
        after = activation_centre(torch.softmax(stepped, 1))[0, 1]
    true_centre = activation_centre(one_hot_probabilities(truth))[0, 1]
    assert (after - true_centre).abs().sum() < (before - true_centre).abs().sum()
    assert loss_function(stepped, truth) < loss


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="beta"):
        AnatomyAwareLoss(beta=0.5)
    with pytest.raises(ValueError, match="epsilon"):
        AnatomyAwareLoss(epsilon=0)
    with pytest.raises(ValueError, match="spacing"):
        AnatomyAwareLoss(spacing=(1.0, 0.0, 1.0))


def test_target_shape_mismatch_raises():
    with pytest.raises(ValueError, match="class-index target"):
        AnatomyAwareLoss()(torch.zeros(1, 2, 8, 8, 4), torch.zeros(1, 3, 8, 8, 4))
    with pytest.raises(ValueError, match="does not match"):
        AnatomyAwareLoss(to_onehot_y=False)(torch.zeros(1, 2, 8, 8, 4), torch.zeros(1, 3, 8, 8, 4))


def test_combined_loss_value():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, *SHAPE)
    truth = torch.cat([cube_mask((2, 2, 1)), cube_mask((8, 5, 3))])
    combined = DiceAnatomyAwareLoss(initial_lambda=0.7)
    anatomy = AnatomyAwareLoss()(logits, truth)
    dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True)(logits, truth)
    value = combined(logits, truth)
    assert value.item() == pytest.approx(anatomy.item() + 0.7 * dice.item(), rel=1e-5)
    assert combined.last_anatomy_loss == pytest.approx(anatomy.item(), rel=1e-6)
    assert combined.last_dice_loss == pytest.approx(dice.item(), rel=1e-6)


def test_lambda_is_saved_in_state_dict():
    loss = DiceAnatomyAwareLoss()
    loss.set_lambda(3.5)
    restored = DiceAnatomyAwareLoss()
    restored.load_state_dict(loss.state_dict())
    assert float(restored.lambda_dice) == 3.5


def test_set_lambda_rejects_non_positive():
    with pytest.raises(ValueError, match="lambda_dice"):
        DiceAnatomyAwareLoss().set_lambda(0.0)
    with pytest.raises(ValueError, match="lambda_dice"):
        DiceAnatomyAwareLoss().set_lambda(float("nan"))
