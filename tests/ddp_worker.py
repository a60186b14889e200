"""What each of two ranks does when tests/test_distributed.py launches this file with torchrun.

`python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT DATA`: two
optimiser steps of MulT on 2 ranks, `msakit train` for 2 epochs, the same training interrupted
after its first epoch and resumed, and `msakit evaluate` (refused); rank 0 writes what the
tests check into OUT.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from msakit.cli import cli
from msakit.data import synthetic_dataset
from msakit.data.schema import MultimodalDataset
from msakit.models.base import MSAModel
from msakit.models.registry import create_model
from msakit.training import distributed
from msakit.training.settings import TrainConfig
from msakit.training.trainer import Trainer, seed_everything
from resume_check import Interrupted, interrupt_training

# MulT normalises each sample on its own (LayerNorm) and, without dropout, draws no random
# numbers: 2 ranks with half a batch each must take the step 1 process takes with the whole
MULT_WITHOUT_DROPOUT = {
    "text_source": "features", "embed_dim": 8, "num_heads": 2, "layers": 1, "memory_layers": 1,
    **{key: 0.0 for key in ("attn_dropout", "attn_dropout_audio", "attn_dropout_vision", "relu_dropout",
                            "res_dropout", "embed_dropout", "output_dropout", "text_dropout")},
}
# 8 samples in batches of 7: a batch shared 4 + 3, then one of 1 sample that a rank sits out
STEP_SAMPLES, STEP_BATCH = 8, 7
SMALL_MULT = ["model.embed_dim=8", "model.num_heads=2", "model.layers=1", "model.memory_layers=1",
              "training.state_every=1"]
TRAIN = ["--epochs", "2", "--no-progress", *(arg for setting in SMALL_MULT for arg in ("--set", setting))]


def step_data() -> MultimodalDataset:
    return synthetic_dataset(n_train=STEP_SAMPLES, n_valid=2, n_test=2, text_len=6, audio_len=8,
                             audio_dim=5, vision_len=7, vision_dim=4, text_dim=16, seed=0)


def step_model(data: MultimodalDataset) -> MSAModel:
    seed_everything(0)
    return create_model("mult", MULT_WITHOUT_DROPOUT, data.dims)


def two_steps(data: MultimodalDataset) -> dict[str, torch.Tensor]:
    """MulT's weights after one epoch of `data.train` in batches of STEP_BATCH (on as many
    processes as the open process group has), with gradient clipping, by plain gradient descent:
    AdamW divides each gradient by its own magnitude, so the rounding noise of gradients that are
    zero in exact arithmetic (attention key biases) would become steps of the learning rate's size."""
    model = step_model(data)
    config = TrainConfig(batch_size=STEP_BATCH, grad_clip=0.5, device="cpu")
    trainer = Trainer(model, config, data.metric_family, progress=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    trainer.train_epoch(data.train, optimizer, scheduler, torch.Generator().manual_seed(0), epoch=1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(out: Path, data: str) -> None:
    train = ["train", "mult", "--dataset", data, *TRAIN]
    with distributed.session(torch.device("cpu")):
        weights = two_steps(step_data())
    if distributed.is_main():
        torch.save(weights, out / "two-steps.pt")
    result = CliRunner().invoke(cli, [*train, "--output", str(out / "straight")])
    assert result.exit_code == 0, result.output
    with pytest.MonkeyPatch.context() as patch:
        interrupt_training(patch, after=1)
        result = CliRunner().invoke(cli, [*train, "--output", str(out / "resumed")])
    assert isinstance(result.exception, Interrupted), result.output
    if distributed.is_main():
        shutil.copy(out / "resumed" / "seed-1111.state.pt", out / "state-of-2-ranks.pt")
    result = CliRunner().invoke(cli, [*train, "--output", str(out / "resumed"), "--resume"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["evaluate", str(out / "straight" / "seed-1111.pt"), "--dataset", data])
    if distributed.is_main():
        (out / "evaluate.txt").write_text(f"{result.exit_code}\n{result.output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
