"""Running MMSA's own training loop (a trainer's `do_train`) beside msakit's, for the parity checks
of what the loop does: optimiser groups, clipping by value, gradient accumulation.

MMSA's `do_train` trains until early stopping on its validation score and reads its batches from
`dataloader["train"]` once per epoch. Here it gets, per epoch, the batches msakit's loop draws for
that epoch (`EpochBatches`), a validation score that improves for the first epochs and then stops
(so it trains exactly the requested number of epochs), and its own model wrapped as MMSA's AMIO
wraps it (`model.Model`). The gradients each optimiser step reads are recorded on both sides
(`recording_steps`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn


class AMIO(nn.Module):
    """MMSA's wrapper as its trainers see it: the model as `.Model`, called through."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.Model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.Model(*args, **kwargs)


class EpochBatches:
    """`dataloader["train"]`: each iteration yields the next epoch's list of batches."""

    def __init__(self, epochs: list[list[dict]]) -> None:
        self.epochs = list(epochs)
        self.next = 0

    def __len__(self) -> int:
        return len(self.epochs[min(self.next, len(self.epochs) - 1)])

    def __iter__(self) -> Iterator[dict]:
        batches = self.epochs[self.next]
        self.next += 1
        return iter(batches)


@contextmanager
def recording_steps(optimizer_class: type[torch.optim.Optimizer], model: nn.Module,
                    steps: list) -> Iterator[None]:
    """While open, every `optimizer_class.step` first keeps each gradient of `model` (by parameter
    name; None where a parameter has none) as the step reads it."""
    original = optimizer_class.step

    def record(self, *args, **kwargs):
        steps.append({n: None if p.grad is None else p.grad.detach().clone()
                      for n, p in model.named_parameters()})
        return original(self, *args, **kwargs)

    optimizer_class.step = record
    try:
        yield
    finally:
        optimizer_class.step = original


def run_do_train(trainer: Any, model: nn.Module, epochs: list[list[dict]], trained: int) -> None:
    """MMSA's `trainer.do_train(AMIO(model), ...)` for `trained` epochs over `epochs` (the batches of
    each pass over the training data do_train makes, in order). Its validation is replaced by a
    score that improves until epoch `trained - 1` and not after, with early_stop 1: do_train then
    returns after epoch `trained`. Its metric table is a stub (the parity compares no metric)."""
    with tempfile.TemporaryDirectory() as folder:
        trainer.args.KeyEval, trainer.args.early_stop = "Loss", 1
        for key, value in (("model_name", "parity"), ("cur_seed", 0)):  # read by its log lines
            vars(trainer.args).setdefault(key, value)
        trainer.args.model_save_path = Path(folder) / "model.pth"
        trainer.metrics = lambda pred, true: {}
        scores = iter([1.0 / (k + 1) for k in range(trained - 1)] + [1e9] * 100)
        trainer.do_test = lambda *args, **kwargs: {"Loss": next(scores)}
        trainer.do_train(AMIO(model), {"train": EpochBatches(epochs), "valid": None})


def without_dropout(model: nn.Module) -> None:
    """Every dropout of `model` off in training mode too: nn.Dropout layers at p = 0 and attention
    dropout at 0 (the two loops draw their masks in different orders)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0


def step_differences(theirs: list[dict], mine: list[dict], official_name: dict[str, str]) -> dict[str, float]:
    """The largest gradient difference over all steps relative to the largest official gradient of
    that step, as `gradient_difference` reports it."""
    worst = {"max_abs_diff": 0.0, "largest_gradient": 0.0, "relative": 0.0}
    for their_step, my_step in zip(theirs, mine, strict=True):
        scale = max(float(g.abs().max()) for g in their_step.values() if g is not None)
        diff = 0.0
        for name, grad in my_step.items():
            ref = their_step[official_name[name]]
            if grad is None and ref is None:  # trained by neither (e.g. BERT's pooler)
                continue
            grad = torch.zeros_like(ref) if grad is None else grad
            ref = torch.zeros_like(grad) if ref is None else ref
            diff = max(diff, float((grad.double() - ref.double()).abs().max()))
        if diff / scale >= worst["relative"]:
            worst = {"max_abs_diff": diff, "largest_gradient": scale, "relative": diff / scale}
    return worst
