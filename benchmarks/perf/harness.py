"""What the perf benchmarks share: stand-in data with a dataset's shapes, a model's trainer at a
precision, one timed training step or evaluation, and the machine's name.

A model is built as a run builds it (its YAML section for the dataset family, `--set` overrides, its
training noise, MMSLF's cues written by the offline backend for the stand-in data), so that a timed
step is the step `msakit train` takes.
"""

from __future__ import annotations

import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from msakit.cues import OfflineBackend, attach_cues, generate_cues
from msakit.data.schema import MultimodalDataset, Split
from msakit.data.synthetic import synthetic_dataset
from msakit.missing import build_noise
from msakit.models import create_model
from msakit.models.layers.text import special_token_ids
from msakit.models.registry import build_config
from msakit.training.config import resolve_config, training_config
from msakit.training.trainer import Trainer, build_optimizer, build_scheduler, seed_everything

__all__ = ["SHAPES", "Step", "first_rows", "machine", "needs_cues", "stand_in_data", "timed", "with_cues"]

SHAPES = {
    "mosi": {"audio_len": 375, "audio_dim": 5, "vision_len": 500, "vision_dim": 20},
    "mosei": {"audio_len": 500, "audio_dim": 74, "vision_len": 500, "vision_dim": 35},
}


def stand_in_data(shape: dict[str, int], n_train: int, n_test: int, seed: int = 0) -> MultimodalDataset:
    """Synthetic clips with `shape`'s sequence lengths and feature widths (and token ids)."""
    return synthetic_dataset(n_train=n_train, n_valid=8, n_test=n_test, seed=seed, **shape)


def needs_cues(model_name: str, family: str) -> bool:
    return hasattr(build_config(model_name, resolve_config(model_name, family)["model"]), "cues")


def with_cues(data: MultimodalDataset, folder: Path | None = None) -> tuple[MultimodalDataset, str]:
    """`data` with offline-backend cues attached, as a run gives them to MMSLF, and the
    `model.cues=...` override that names their file."""
    cues = Path(folder or tempfile.mkdtemp()) / "cues.jsonl"
    generate_cues(data, OfflineBackend(data), cues)
    return attach_cues(data, cues)[0], f"model.cues={cues}"


class Step:
    """A model's trainer on `device` at `precision` (None: its configuration's own), with its
    optimizer, schedule and shuffling stream: `train(split)` is one pass of training over `split`,
    `evaluate(split)` one of prediction. `model_settings` is the model's resolved YAML section."""

    def __init__(self, model_name: str, family: str, data: MultimodalDataset, device: str,
                 precision: str | None, stage: str | None = None, overrides: Sequence[str] = ()) -> None:
        precision_override = [] if precision is None else [f"training.precision={precision}"]
        config = resolve_config(model_name, family, [
            f"training.device={device}", *precision_override, *overrides])
        settings = training_config(config["training"])
        seed_everything(0)
        model = create_model(model_name, config["model"], data.dims)
        if stage is not None:
            model.set_stage(stage)
        # the model's own training noise, so that e.g. LNLN pays for its clean-input targets
        noise = build_noise(settings.noise, settings.noise_rate, 0, **special_token_ids(model.config))
        self.settings = settings
        self.model_settings = config["model"]
        self.trainer = Trainer(model, settings, data.metric_family, train_transform=noise, progress=False)
        self.optimizer = build_optimizer(self.trainer.model, settings)
        self.scheduler = build_scheduler(self.optimizer, settings, total_steps=10**6)
        self.generator = torch.Generator().manual_seed(0)
        self.parameters = sum(p.numel() for p in model.parameters())

    def train(self, split: Split, epoch: int = 2) -> None:
        self.trainer.train_epoch(split, self.optimizer, self.scheduler, self.generator, epoch=epoch)

    def evaluate(self, split: Split) -> None:
        self.trainer.predict(split)


def timed(run: Callable[[], object], device: torch.device) -> float:
    """Seconds `run()` takes, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def first_rows(split: Split, count: int) -> Split:
    return split.subset(np.arange(min(count, len(split))))


def machine() -> dict[str, str]:
    """The device a benchmark ran on, named as its reader needs: the GPU, or the CPU model and
    whether it has bf16 instructions (without them bf16 is emulated and slower than fp32)."""
    info = {"torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        return {**info, "device": torch.cuda.get_device_name(0)}
    name, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return {**info, "device": f"{name} (CPU; bf16 instructions: {', '.join(bf16) or 'none'})"}
