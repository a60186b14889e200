"""Running MMSA's own training loop (a trainer's `do_train`) beside msakit's, for the parity checks
of what the loop does: optimiser groups, clipping by value, gradient accumulation.

MMSA's `do_train` trains until early stopping on its validation score and reads its batches from
`dataloader["train"]` once per epoch. Here it gets, per epoch, the batches msakit's loop draws for
that epoch (`EpochBatches`), a validation score that improves for the first epochs and then stops
(so it trains exactly the requested number of epochs), and its own model wrapped as MMSA's AMIO
wraps it (`model.Model`). msakit's side is its own loop (`run_msakit_loop`). The gradients each
optimiser step reads are recorded on both sides (`recording_steps`) and compared, with the weights
after training, in one report row (`loop_row`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from msakit_parity import max_abs, parameter_count
from torch import nn

from msakit.data.schema import Split
from msakit.models.base import MSAModel
from msakit.training.settings import TrainConfig
from msakit.training.trainer import OPTIMIZER_CLASSES, Trainer, build_optimizer, build_scheduler


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


def float64_split(labels: np.ndarray, text_bert: np.ndarray, lengths: tuple[int, int],
                  widths: tuple[int, int], generator: torch.Generator,
                  text: np.ndarray | None = None) -> Split:
    """A loop row's training split of unpadded clips "0", "1", ...: `labels`, the BERT token ids
    `text_bert` and the text features `text`, audio then vision of `lengths` frames and `widths`
    features drawn from `generator` in float64."""
    samples = len(labels)
    (audio_len, vision_len), (audio_dim, vision_dim) = lengths, widths
    return Split(
        ids=np.array([str(i) for i in range(samples)]), labels=labels, text=text, text_bert=text_bert,
        audio=torch.randn(samples, audio_len, audio_dim, generator=generator, dtype=torch.float64).numpy(),
        vision=torch.randn(samples, vision_len, vision_dim, generator=generator, dtype=torch.float64).numpy(),
        audio_lengths=np.full(samples, audio_len), vision_lengths=np.full(samples, vision_len))


def run_msakit_loop(model: MSAModel, config: TrainConfig, split: Split, total_steps: int, seed: int,
                    sgd: bool = False) -> tuple[list[dict], torch.optim.Optimizer]:
    """msakit's loop over `split` for `config.epochs` epochs as `Trainer.fit` runs each one (the
    model's epoch hooks around `Trainer.train_epoch`), without validation, in the batch orders a
    generator seeded `seed` draws. The optimiser is `build_optimizer`'s (AdamW or Adam, the config's
    `optimizer`) or, with `sgd`, plain SGD over its groups and rates; the schedule
    `build_scheduler`'s over `total_steps`. Returns the gradients each step read (`recording_steps`)
    and the optimiser."""
    trainer = Trainer(model, config, "mosi", progress=False)
    generator = torch.Generator().manual_seed(seed)
    steps: list[dict] = []
    # recording first: the scheduler binds the optimiser's step as it is when the scheduler is built
    with recording_steps(torch.optim.SGD if sgd else OPTIMIZER_CLASSES[config.optimizer], model, steps):
        optimizer = build_optimizer(model, config)
        if sgd:
            optimizer = torch.optim.SGD([{k: g[k] for k in ("params", "lr", "weight_decay")}
                                         for g in optimizer.param_groups])
        scheduler = build_scheduler(optimizer, config, total_steps)
        for epoch in range(1, config.epochs + 1):
            model.on_train_epoch_start(epoch, lambda: trainer._plain_batches(split))
            trainer.train_epoch(split, optimizer, scheduler, generator, epoch=epoch)
            model.on_train_epoch_end(epoch, lambda: trainer._plain_batches(split))
    return steps, optimizer


def loop_row(label: str, official: nn.Module, ours: nn.Module, official_name: dict[str, str],
             their_steps: list[dict], my_steps: list[dict], clip: float | None = None,
             differences: dict[str, float] | None = None) -> dict:
    """The report row of two trained loops: `differences` (measured by the caller) and the largest
    weight difference after training, the gradients of every step (`step_differences`), and, with
    `clip`, how many gradient elements msakit's steps read at the clip value. Raises when the two
    loops stepped different numbers of times."""
    if len(their_steps) != len(my_steps):
        raise RuntimeError(f"MMSA stepped {len(their_steps)} times, msakit {len(my_steps)}")
    theirs = dict(official.named_parameters())
    row: dict = {"dataset": label,
                 "parameters": {"official": parameter_count(official), "msakit": parameter_count(ours)}}
    if clip is not None:
        clipped = sum(int((g.abs() >= clip).sum()) for step in my_steps for g in step.values()
                      if g is not None)
        row["clipped_gradient_elements"] = f"{clipped} over {len(my_steps)} steps"
    row["max_abs_diff"] = {**(differences or {}), "weights after training": max(
        max_abs(p, theirs[official_name[n]]) for n, p in ours.named_parameters())}
    row["gradients"] = step_differences(their_steps, my_steps, official_name)
    row["steps"] = len(my_steps)
    return row
