"""What each of two ranks does when tests/test_distributed.py launches this file with torchrun.

`python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT DATA`: two
optimiser steps of MulT on 2 ranks; `msakit train` of MulT and DashFusion for 2 epochs, and the
same trainings interrupted after their first epoch and resumed; `msakit evaluate` (refused).
Rank 0 writes what the tests check into OUT.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from msakit.cli import cli
from msakit.data import synthetic_dataset
from msakit.data.schema import MultimodalDataset
from msakit.models.base import MSAModel
from msakit.models.registry import create_model
from msakit.training import distributed
from msakit.training.config import TINY, model_yaml
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
# trained by `msakit train` for 2 epochs, straight and interrupted after the first: DashFusion
# draws its neighbours at random and rebuilds its bank every other epoch, so the resumed epoch
# needs both the bank of the training state and each rank's random streams
TRAINED = {"mult": [], "dashfusion": ["model.refresh_every=2"]}


def settings(model: str) -> list[str]:
    """The `--set` values of `model`'s tiny settings, a training state every epoch and TRAINED's."""
    tiny = model_yaml(model)[TINY]
    return [*(f"{section}.{key}={value}" for section in ("model", "training")
              for key, value in tiny[section].items() if key != "epochs"),
            "training.state_every=1", *TRAINED[model]]


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


def train(model: str, data: str, output: Path, *options: str) -> Result:
    args = ["train", model, "--dataset", data, "--epochs", "2", "--no-progress", "--output", str(output)]
    return CliRunner().invoke(cli, [*args, *(a for s in settings(model) for a in ("--set", s)), *options])


def main(out: Path, data: str) -> None:
    with distributed.session(torch.device("cpu")):
        weights = two_steps(step_data())
    if distributed.is_main():
        torch.save(weights, out / "two-steps.pt")
    for model in TRAINED:
        result = train(model, data, out / model / "straight")
        assert result.exit_code == 0, result.output
        with pytest.MonkeyPatch.context() as patch:
            interrupt_training(patch, after=1)
            result = train(model, data, out / model / "resumed")
        assert isinstance(result.exception, Interrupted), result.output
        if distributed.is_main():
            shutil.copy(out / model / "resumed" / "seed-1111.state.pt", out / model / "state-of-2-ranks.pt")
        result = train(model, data, out / model / "resumed", "--resume")
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["evaluate", str(out / "mult" / "straight" / "seed-1111.pt"),
                                      "--dataset", data])
    if distributed.is_main():
        (out / "evaluate.txt").write_text(f"{result.exit_code}\n{result.output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
