"""TensorBoard scalars of a training (`training.log: tensorboard`): per epoch, the training loss,
every validation metric and each parameter group's learning rate, under the stage's name.

Written with tensorboardX (the event files TensorBoard reads) into the run folder's
`tensorboard/seed-<seed>/`; under torchrun only rank 0 writes. A step is an epoch counted over all
stages. A resumed run starts its writer with `purge_step` at the first epoch it trains, so the
epochs a killed run logged after its last training state are replaced, not doubled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from msakit.errors import MsakitError
from msakit.training import distributed
from msakit.training.trainer import EpochRecord


class TensorBoardLog:
    """An `on_epoch` observer writing one step per epoch."""

    def __init__(self, folder: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise MsakitError("training.log=tensorboard needs tensorboardX: pip install 'msakit[study]' "
                              "(or pip install tensorboardX)") from None
        self.folder = folder
        self.writer_class = SummaryWriter
        self.writer: Any = None

    def __call__(self, record: EpochRecord, step: int, rates: list[float]) -> None:
        if not distributed.is_main():
            return
        if self.writer is None:  # opened at the first epoch this process trains
            # tensorboardX names a file by the second and the host only: a run resumed within the
            # second its killed run opened would overwrite that run's file without the suffix
            self.writer = self.writer_class(str(self.folder), purge_step=step,
                                            filename_suffix=f".from-epoch-{step:06d}")
        self.writer.add_scalar(f"{record.stage}/train_loss", record.train_loss, step)
        for metric, value in record.valid.items():
            self.writer.add_scalar(f"{record.stage}/valid_{metric}", value, step)
        for index, rate in enumerate(rates):
            self.writer.add_scalar(f"{record.stage}/lr_group{index}", rate, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
