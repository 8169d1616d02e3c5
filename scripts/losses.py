"""Anatomy-aware loss and its combination with Dice loss.

The anatomy-aware loss compares where the predicted foreground lies with where
the ground truth lies. For every sample and foreground class it computes the
activation centre of the softmax probabilities ``P`` and of the one-hot ground
truth ``G`` along each spatial axis,

    c = sum(u * (I + eps)) / sum(I + eps),

with ``u`` the voxel coordinate normalised to [0, 1] along that axis and ``I``
the voxel value in ``P`` or ``G``. The ``eps`` in the numerator and the
denominator puts the centre of an empty mask in the middle of the patch. A
prediction of tumour in a patch without tumour is then pulled toward the centre
instead of getting no gradient. The loss is

    L_A = sum over axes |c_G - c_P| ** beta * spacing_axis,

so a false positive far from the tumour (a vessel or a muscle with tumour-like
intensity) costs more than one next to it. Because the centres are normalised
coordinates, ``L_A`` is at most ``sum(spacing)`` for ``beta >= 1``.

Reference: Gao, Dai, Liu, Chen and Shi, "An Anatomy-aware Framework for
Automatic Segmentation of Parotid Tumor from Multimodal MRI".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.losses import DiceLoss
from monai.networks import one_hot
from torch import nn
from torch.nn.modules.loss import _Loss

logger = logging.getLogger(__name__)

__all__ = ["AnatomyAwareLoss", "DiceAnatomyAwareLoss", "activation_centre", "spacing_from_affine"]


def activation_centre(mask: torch.Tensor, epsilon: float = 1e-8) -> torch.Tensor:
    """Compute the activation centre of each channel along each spatial axis.

    Args:
        mask: non-negative values of shape (B, C, *spatial), e.g. probabilities or
            a one-hot mask.
        epsilon: stability constant added to every voxel, so that an empty channel
            has its centre in the middle of each axis.

    Returns:
        Centres of shape (B, C, N) for N spatial axes, in normalised coordinates
        where 0 is the first voxel and 1 the last voxel of the axis (an axis of
        length 1 has its only voxel at 0.5).
    """
    spatial_dims = mask.ndim - 2
    centres = []
    for axis in range(spatial_dims):
        size = mask.shape[2 + axis]
        other_axes = [2 + a for a in range(spatial_dims) if a != axis]
        voxels_per_slice = mask[0, 0].numel() // size

        # The marginal along this axis: (B, C, size). Adding epsilon to every voxel
        # equals adding epsilon times the number of voxels in each slice.
        marginal = mask.sum(dim=other_axes) + epsilon * voxels_per_slice

        if size > 1:
            coordinates = torch.linspace(0.0, 1.0, size, device=mask.device, dtype=marginal.dtype)
        else:
            coordinates = torch.full((1,), 0.5, device=mask.device, dtype=marginal.dtype)
        centres.append((marginal * coordinates).sum(dim=-1) / marginal.sum(dim=-1))
    return torch.stack(centres, dim=-1)


def spacing_from_affine(affine: torch.Tensor, spatial_dims: int = 3) -> torch.Tensor:
    """Return the voxel spacing (mm) per array axis from one affine or a batch of them.

    Args:
        affine: (spatial_dims + 1, spatial_dims + 1) or (B, spatial_dims + 1, spatial_dims + 1).

    Returns:
        (spatial_dims,) or (B, spatial_dims), from MONAI's ``affine_to_spacing`` (the
        norm of each column of the rotation-and-scaling block, so it stays correct
        after reorientation), applied per sample for a batch.
    """
    affine = torch.as_tensor(affine, dtype=torch.float64)
    if affine.ndim == 2:
        return affine_to_spacing(affine, r=spatial_dims, dtype=torch.float64)
    return torch.stack([affine_to_spacing(sample, r=spatial_dims, dtype=torch.float64) for sample in affine])


class AnatomyAwareLoss(_Loss):
    """Distance between the activation centres of prediction and ground truth.

    ``L_A = sum over axes |c_G - c_P| ** beta * spacing_axis``, computed for each
    sample and each class kept (foreground only by default), then averaged (or
    summed) over classes and batch. See the module docstring for the centre.

    Args:
        beta: distance penalty exponent; larger values punish far-off predictions
            more. Must be at least 1 so that the gradient exists where the centres
            coincide. Default 1.5.
        epsilon: stability constant of the centre. Default 1e-8.
        spacing: voxel spacing in mm per spatial axis, used for every sample. When
            None, the spacing is read per sample from the target's (or input's)
            MetaTensor affine, and is 1 mm when neither carries one.
        softmax: apply softmax over the channel axis of the input (logits).
        to_onehot_y: convert a class-index target (B, 1, *spatial) to one-hot.
        include_background: keep channel 0 in the loss.
        reduction: "mean", "sum" or "none" (returns (B, C)).

    Shapes:
        input: (B, C, *spatial) logits (or probabilities when ``softmax=False``).
        target: (B, 1, *spatial) class indices, or (B, C, *spatial) one-hot.
    """

    def __init__(
        self,
        beta: float = 1.5,
        epsilon: float = 1e-8,
        spacing: Sequence[float] | None = None,
        softmax: bool = True,
        to_onehot_y: bool = True,
        include_background: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
        if beta < 1:
            raise ValueError(f"beta must be at least 1 (the gradient of |d|**beta is undefined at d=0 below 1), got {beta}.")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive so that empty masks have a centre, got {epsilon}.")
        if spacing is not None and any(float(s) <= 0 for s in spacing):
            raise ValueError(f"spacing must hold positive millimetres per axis, got {list(spacing)}.")
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self.spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.softmax = softmax
        self.to_onehot_y = to_onehot_y
        self.include_background = include_background

    def _resolve_spacing(
        self, input: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None
    ) -> torch.Tensor:
        """Return the spacing as (B, N) in mm: argument, then constructor, then metadata, then 1."""
        batch, spatial_dims = input.shape[0], input.ndim - 2
        if spacing is None and self.spacing is not None:
            spacing = self.spacing
        if spacing is None:
            for tensor in (target, input):
                if isinstance(tensor, MetaTensor) and "affine" in tensor.meta:
                    spacing = spacing_from_affine(torch.as_tensor(tensor.meta["affine"]), spatial_dims)
                    break
        if spacing is None:
            return torch.ones(batch, spatial_dims, device=input.device, dtype=torch.float32)

        spacing = torch.as_tensor(spacing, dtype=torch.float32, device=input.device)
        if spacing.shape[-1] != spatial_dims:
            raise ValueError(
                f"spacing has {spacing.shape[-1]} values per sample but the input has {spatial_dims} spatial axes."
            )
        if spacing.ndim == 1:
            spacing = spacing.expand(batch, spatial_dims)
        if spacing.shape[0] != batch:
            raise ValueError(f"spacing has {spacing.shape[0]} rows but the batch has {batch} samples; pass one row per sample.")
        return spacing

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """Compute the loss; ``spacing`` (N,) or (B, N) in mm overrides every other source."""
        spacing_mm = self._resolve_spacing(input, target, spacing)
        if isinstance(input, MetaTensor):
            input = input.as_tensor()
        if isinstance(target, MetaTensor):
            target = target.as_tensor()
        if input.ndim < 3:
            raise ValueError(f"input must have shape (B, C, *spatial), got {tuple(input.shape)}.")

        num_classes = input.shape[1]
        probabilities = torch.softmax(input.float(), dim=1) if self.softmax else input.float()
        if self.to_onehot_y:
            if target.shape[1] != 1:
                raise ValueError(
                    f"to_onehot_y=True expects a class-index target (B, 1, ...), got {tuple(target.shape)}; "
                    "pass a one-hot target with to_onehot_y=False."
                )
            target = one_hot(target, num_classes=num_classes)
        if target.shape != probabilities.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)} after one-hot."
            )
        if not self.include_background:
            if num_classes == 1:
                raise ValueError("include_background=False needs at least two channels; the input has one.")
            probabilities = probabilities[:, 1:]
            target = target[:, 1:]

        centre_pred = activation_centre(probabilities, self.epsilon)
        centre_true = activation_centre(target.float(), self.epsilon)

        # (B, C, N) distances per axis, weighted by spacing and summed over axes: (B, C).
        distance = (centre_true - centre_pred).abs().pow(self.beta)
        loss = (distance * spacing_mm[:, None, :]).sum(dim=-1)

        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class DiceAnatomyAwareLoss(nn.Module):
    """Anatomy-aware loss plus weighted Dice loss: ``L = L_A + lambda_dice * L_Dice``.

    ``lambda_dice`` starts at ``initial_lambda`` (1 by default).
    ``scripts.handlers.AdaptiveLossWeightHandler`` sets it after every epoch to
    mean(L_A) / mean(L_Dice) over that epoch's iterations, so both terms weigh the same. The weight is a buffer, so it is saved in ``state_dict`` and a resumed
    run continues with it. The components of the last call are kept as floats in
    ``last_anatomy_loss`` and ``last_dice_loss`` for that handler.

    Args:
        beta, epsilon, spacing: as in :class:`AnatomyAwareLoss`.
        softmax, to_onehot_y, include_background: shared by both terms.
        initial_lambda: Dice weight before the first update.
        smooth_nr, smooth_dr: Dice loss smoothing terms (see ``monai.losses.DiceLoss``).
        batch: compute Dice over the whole batch instead of per sample.
    """

    def __init__(
        self,
        beta: float = 1.5,
        epsilon: float = 1e-8,
        spacing: Sequence[float] | None = None,
        softmax: bool = True,
        to_onehot_y: bool = True,
        include_background: bool = False,
        initial_lambda: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
    ) -> None:
        super().__init__()
        if initial_lambda <= 0:
            raise ValueError(f"initial_lambda must be positive, got {initial_lambda}.")
        self.anatomy = AnatomyAwareLoss(
            beta=beta,
            epsilon=epsilon,
            spacing=spacing,
            softmax=softmax,
            to_onehot_y=to_onehot_y,
            include_background=include_background,
        )
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=to_onehot_y,
            softmax=softmax,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )
        self.register_buffer("lambda_dice", torch.tensor(float(initial_lambda), dtype=torch.float64))
        self.last_anatomy_loss = float("nan")
        self.last_dice_loss = float("nan")

    def set_lambda(self, value: float) -> None:
        """Set the Dice weight; it must be a positive finite number."""
        value = float(value)
        if not torch.isfinite(torch.tensor(value)) or value <= 0:
            raise ValueError(f"lambda_dice must be a positive finite number, got {value}.")
        self.lambda_dice.fill_(value)

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor | Sequence[float] | None = None
    ) -> torch.Tensor:
        """Compute ``L_A + lambda_dice * L_Dice`` for logits (B, C, *spatial) and a target."""
        anatomy_loss = self.anatomy(input, target, spacing=spacing)
        plain_input = input.as_tensor() if isinstance(input, MetaTensor) else input
        plain_target = target.as_tensor() if isinstance(target, MetaTensor) else target
        dice_loss = self.dice(plain_input, plain_target)

        self.last_anatomy_loss = float(anatomy_loss.detach())
        self.last_dice_loss = float(dice_loss.detach())
        return anatomy_loss + self.lambda_dice.to(dice_loss.dtype) * dice_loss
