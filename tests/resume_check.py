"""Helpers for resume tests: stop training as a kill would, and compare two fits exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from msakit.data.schema import MultimodalDataset
from msakit.training.trainer import FitResult, Trainer


class Interrupted(Exception):
    """Stands for the process being killed."""


def fit_until_interrupted(
    trainer: Trainer, data: MultimodalDataset, seed: int, state_file: Path, epochs: int, **options
) -> None:
    """Fit with `state_file` and stop when the training of epoch `epochs + 1` (counted over every
    stage) begins, i.e. after the model's epoch hook and before any update of that epoch."""
    original, calls = trainer.train_epoch, []

    def train_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) > epochs:
            raise Interrupted
        return original(*args, **kwargs)

    trainer.train_epoch = train_epoch
    with pytest.raises(Interrupted):
        trainer.fit(data.train, data.valid, seed, state_file=state_file, **options)
    assert state_file.is_file()


def interrupt_training(monkeypatch: pytest.MonkeyPatch, after: int) -> list[int]:
    """Make training stop (once, as a kill would) when the `after + 1`-th epoch of this process,
    counted over every Trainer, begins. Returns the list of epoch numbers trained, which the
    caller may clear to see what a resumed run trains."""
    original, epochs, fired = Trainer.train_epoch, [], []

    def train_epoch(self, *args, **kwargs):
        if len(epochs) == after and not fired:
            fired.append(True)
            raise Interrupted
        epochs.append(kwargs["epoch"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    return epochs


def assert_same_fit(trainer: Trainer, fit: FitResult, other: Trainer, other_fit: FitResult) -> None:
    """Bit-for-bit the same weights, history, selection, tracked snapshots and stage reports."""
    ours, theirs = trainer.model.state_dict(), other.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert fit.history == other_fit.history
    assert (fit.best_epoch, fit.epochs_run, fit.best_valid) == (
        other_fit.best_epoch, other_fit.epochs_run, other_fit.best_valid)
    assert fit.stage_reports == other_fit.stage_reports
    assert {m: s.epoch for m, s in trainer.best_by_metric.items()} == {
        m: s.epoch for m, s in other.best_by_metric.items()}


def assert_resumed_fit_is_the_straight_fit(
    make_trainer: Callable[[], Trainer], data: MultimodalDataset, seed: int, state_file: Path, epochs: int
) -> None:
    """A fit killed after `epochs` epochs and resumed from `state_file` ends exactly as one that ran
    straight through; `make_trainer` builds the same fresh trainer each call."""
    straight = make_trainer()
    straight_fit = straight.fit(data.train, data.valid, seed=seed)
    fit_until_interrupted(make_trainer(), data, seed, state_file, epochs)
    resumed = make_trainer()
    resumed_fit = resumed.fit(data.train, data.valid, seed=seed, state_file=state_file)
    assert_same_fit(straight, straight_fit, resumed, resumed_fit)
