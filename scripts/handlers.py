"""Ignite handlers used by the training workflow."""

from __future__ import annotations

import logging
import math

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from scripts.losses import DiceAnatomyAwareLoss

logger = logging.getLogger(__name__)

__all__ = ["AdaptiveLossWeightHandler"]


class AdaptiveLossWeightHandler:
    """Set the Dice weight of a :class:`DiceAnatomyAwareLoss` after every epoch.

    The loss is ``L = L_A + lambda * L_Dice``. During an epoch the handler sums the
    two components that the loss recorded at each iteration. When the epoch ends it
    sets ``lambda = mean(L_A) / mean(L_Dice)`` for the next epoch, so both terms
    weigh the same. Under torch.distributed the sums are reduced over all ranks
    first, so every rank gets the same weight. The weight keeps its previous value
    when the epoch's mean Dice loss is zero or either mean is not finite.

    The epoch's means and the new weight are logged and stored in
    ``engine.state.metrics`` as ``loss_anatomy``, ``loss_dice`` and ``lambda_dice``,
    so that the TensorBoard and stats handlers record them.

    Args:
        loss: the loss whose weight to set (the same object the trainer calls).
        min_lambda, max_lambda: bounds for the weight, which guard against a
            Dice loss that is nearly zero. Defaults 1e-4 and 1e4.
    """

    def __init__(self, loss: DiceAnatomyAwareLoss, min_lambda: float = 1e-4, max_lambda: float = 1e4) -> None:
        if not isinstance(loss, DiceAnatomyAwareLoss):
            raise TypeError(f"loss must be a DiceAnatomyAwareLoss, got {type(loss).__name__}.")
        if not 0 < min_lambda <= max_lambda:
            raise ValueError(f"need 0 < min_lambda <= max_lambda, got {min_lambda} and {max_lambda}.")
        self.loss = loss
        self.min_lambda = float(min_lambda)
        self.max_lambda = float(max_lambda)
        self._reset()

    def _reset(self) -> None:
        self.anatomy_sum = 0.0
        self.dice_sum = 0.0
        self.count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        self._reset()

    def iteration_completed(self, engine: Engine) -> None:
        anatomy, dice = self.loss.last_anatomy_loss, self.loss.last_dice_loss
        if math.isfinite(anatomy) and math.isfinite(dice):
            self.anatomy_sum += anatomy
            self.dice_sum += dice
            self.count += 1

    def epoch_completed(self, engine: Engine) -> None:
        sums = torch.tensor([self.anatomy_sum, self.dice_sum, float(self.count)], dtype=torch.float64)
        sums = idist.all_reduce(sums)
        anatomy_sum, dice_sum, count = (float(value) for value in sums)
        epoch = engine.state.epoch
        if count == 0:
            logger.warning("Epoch %d recorded no finite loss components; lambda_dice stays %.4g.", epoch, self.weight)
            return

        anatomy_mean, dice_mean = anatomy_sum / count, dice_sum / count
        if dice_mean > 0 and math.isfinite(anatomy_mean) and math.isfinite(dice_mean):
            new_weight = min(max(anatomy_mean / dice_mean, self.min_lambda), self.max_lambda)
            self.loss.set_lambda(new_weight)
        else:
            logger.warning("Epoch %d mean Dice loss is %.4g; lambda_dice stays %.4g.", epoch, dice_mean, self.weight)

        engine.state.metrics["loss_anatomy"] = anatomy_mean
        engine.state.metrics["loss_dice"] = dice_mean
        engine.state.metrics["lambda_dice"] = self.weight
        logger.info(
            "Epoch %d: mean anatomy-aware loss %.4f, mean Dice loss %.4f over %d iterations; lambda_dice set to %.4f.",
            epoch,
            anatomy_mean,
            dice_mean,
            int(count),
            self.weight,
        )

    @property
    def weight(self) -> float:
        """The current Dice weight of the loss."""
        return float(self.loss.lambda_dice)
