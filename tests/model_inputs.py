"""Tiny hand-made model inputs shared by the model tests: 6 clips with variable-length text,
audio and vision, ways to perturb what the masks hide, and MMSLF's cue file."""

from __future__ import annotations

import json

import numpy as np
import torch

from msakit.data.schema import Batch, Split

N, TEXT_LEN, AUDIO_LEN, VISION_LEN = 6, 8, 10, 7
TEXT_DIM, AUDIO_DIM, VISION_DIM = 12, 5, 4


def contract_split(seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    text_lengths = np.array([8, 5, 3, 6, 8, 2])
    text = rng.normal(size=(N, TEXT_LEN, TEXT_DIM)).astype(np.float32)
    text_bert = np.zeros((N, 3, TEXT_LEN), dtype=np.int64)
    for i, length in enumerate(text_lengths):
        text[i, length:] = 0.0
        text_bert[i, 0, :length] = rng.integers(1000, 5000, size=length)
        text_bert[i, 0, 0], text_bert[i, 0, length - 1] = 101, 102  # [CLS] ... [SEP]
        text_bert[i, 1, :length] = 1
    return Split(
        ids=np.array([f"video{i}$_${i}" for i in range(N)]),
        labels=rng.uniform(-3, 3, size=N).astype(np.float32),
        text=text,
        text_bert=text_bert,
        audio=rng.normal(size=(N, AUDIO_LEN, AUDIO_DIM)).astype(np.float32),
        vision=rng.normal(size=(N, VISION_LEN, VISION_DIM)).astype(np.float32),
        audio_lengths=np.array([10, 4, 1, 7, 10, 2]),
        vision_lengths=np.array([7, 3, 5, 1, 2, 7]),
    )


def pad_noise(batch: Batch, seed: int = 1) -> Batch:
    """The same batch with large random values (and infinities) in every padded frame."""
    generator = torch.Generator().manual_seed(seed)
    changes = {}
    for name in ("audio", "vision"):
        x, mask = getattr(batch, name), getattr(batch, f"{name}_mask")
        noise = 100 * torch.randn(x.shape, generator=generator)
        noise[..., 0] = float("inf")
        changes[name] = torch.where(mask.unsqueeze(-1), x, noise)
    return batch.with_updates(**changes)


def padded_longer(batch: Batch) -> Batch:
    """The same batch padded to longer sequences (random values in the new, masked steps)."""
    longer = {}
    for modality, extra in (("text", 3), ("audio", 5), ("vision", 4)):
        x, mask = getattr(batch, modality), getattr(batch, f"{modality}_mask")
        longer[modality] = torch.cat([x, torch.randn(len(batch), extra, x.shape[-1])], dim=1)
        longer[f"{modality}_mask"] = torch.cat(
            [mask, torch.zeros(len(batch), extra, dtype=torch.bool)], dim=1
        )
    return batch.with_updates(**longer)


def without(batch: Batch, modality: str, rows: list[int]) -> Batch:
    """`batch` with the mask of `modality` all False for the given samples."""
    mask = getattr(batch, f"{modality}_mask").clone()
    mask[rows] = False
    return batch.with_updates(**{f"{modality}_mask": mask})


def write_cues(path, splits: dict[str, Split], backend: str = "test") -> str:
    """A cue file in `msakit cues`' format: the label is shown for training samples only."""
    with open(path, "w") as f:
        for name, split in splits.items():
            for sample_id, label in zip(split.ids, split.labels, strict=True):
                shown = f" Label: {'positive' if label > 0 else 'negative'}." if name == "train" else ""
                text = f"Visual cues: a steady gaze. Language cues: plain words.{shown}"
                f.write(json.dumps({"id": str(sample_id), "split": name, "backend": backend,
                                    "model": "none", "prompt_version": "1", "visual_cues": "",
                                    "language_cues": "", "text": text}) + "\n")
    return str(path)
