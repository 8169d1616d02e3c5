"""Tests of the handler that sets the Dice weight after every epoch."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from scripts.handlers import AdaptiveLossWeightHandler
from scripts.losses import DiceAnatomyAwareLoss


def make_batches(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random logits and cube labels, different for every iteration."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(count):
        logits = torch.randn(2, 2, 12, 12, 6, generator=generator)
        label = torch.zeros(2, 1, 12, 12, 6)
        label[:, :, index % 6 : index % 6 + 4, 2:6, 1:4] = 1
        batches.append((logits, label))
    return batches


def run_epochs(loss: DiceAnatomyAwareLoss, batches, max_epochs: int) -> tuple[Engine, list[list[tuple[float, float]]]]:
    """Run an engine that calls the loss once per batch and records its components per epoch."""
    seen: list[list[tuple[float, float]]] = []

    def step(engine: Engine, batch):
        if engine.state.iteration % len(batches) == 1 or len(batches) == 1:
            seen.append([])
        logits, label = batch
        value = loss(logits, label)
        seen[-1].append((loss.last_anatomy_loss, loss.last_dice_loss))
        return value.item()

    engine = Engine(step)
    AdaptiveLossWeightHandler(loss).attach(engine)
    engine.run(batches, max_epochs=max_epochs)
    return engine, seen


def test_lambda_starts_at_one():
    assert float(DiceAnatomyAwareLoss().lambda_dice) == 1.0


def test_lambda_is_ratio_of_epoch_means():
    loss = DiceAnatomyAwareLoss()
    engine, seen = run_epochs(loss, make_batches(5), max_epochs=1)
    anatomy_mean = sum(a for a, _ in seen[0]) / 5
    dice_mean = sum(d for _, d in seen[0]) / 5
    assert float(loss.lambda_dice) == pytest.approx(anatomy_mean / dice_mean, rel=1e-9)
    assert engine.state.metrics["lambda_dice"] == pytest.approx(anatomy_mean / dice_mean, rel=1e-9)
    assert engine.state.metrics["loss_anatomy"] == pytest.approx(anatomy_mean, rel=1e-9)


def test_lambda_uses_only_the_last_epoch():
    loss = DiceAnatomyAwareLoss()
    batches = make_batches(4, seed=3)
    _, seen = run_epochs(loss, batches, max_epochs=2)
    assert len(seen) == 2
    anatomy_mean = sum(a for a, _ in seen[1]) / 4
    dice_mean = sum(d for _, d in seen[1]) / 4
    assert float(loss.lambda_dice) == pytest.approx(anatomy_mean / dice_mean, rel=1e-9)


def epoch_ratio(batches) -> float:
    """Return mean(L_A) / mean(L_Dice) over the batches, computed independently of the handler."""
    loss = DiceAnatomyAwareLoss()
    anatomy, dice = 0.0, 0.0
    for batch in batches:
        loss(*batch)
        anatomy += loss.last_anatomy_loss
        dice += loss.last_dice_loss
    return anatomy / dice


def test_lambda_weights_the_next_epoch():
    loss = DiceAnatomyAwareLoss()
    batches = make_batches(3, seed=5)
    values: list[float] = []

    def step(engine: Engine, batch):
        value = loss(*batch)
        values.append(value.item())
        return value.item()

    engine = Engine(step)
    AdaptiveLossWeightHandler(loss).attach(engine)
    engine.run(batches, max_epochs=2)

    reference = DiceAnatomyAwareLoss()
    anatomy = reference.anatomy(*batches[0]).item()
    dice = reference.dice(*batches[0]).item()
    assert values[0] == pytest.approx(anatomy + dice, rel=1e-6)
    assert values[3] == pytest.approx(anatomy + epoch_ratio(batches) * dice, rel=1e-6)


def test_lambda_is_clamped():
    loss = DiceAnatomyAwareLoss()
    handler = AdaptiveLossWeightHandler(loss, min_lambda=0.5, max_lambda=0.6)
    engine = Engine(lambda engine, batch: loss(*batch).item())
    handler.attach(engine)
    engine.run(make_batches(2), max_epochs=1)
    assert 0.5 <= float(loss.lambda_dice) <= 0.6


def test_handler_rejects_other_losses():
    with pytest.raises(TypeError, match="DiceAnatomyAwareLoss"):
        AdaptiveLossWeightHandler(torch.nn.MSELoss())
