"""Turn a `Split` into `Batch`es by indexing its shared arrays: one gather per key and batch.

Valid and test splits are iterated in file order (MMSA shuffles them; we never do), the train split
in an order drawn from the caller's generator so that a run is reproducible for a fixed seed. Both
can be shared out between processes (training under torchrun): evaluation by contiguous
parts of the split, training batch by batch (`training_shards`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from msakit.data.schema import Batch, Split


def _frame_mask(lengths: np.ndarray | None, n: int, max_len: int) -> torch.Tensor:
    if lengths is None:
        return torch.ones(n, max_len, dtype=torch.bool)
    positions = torch.arange(max_len).unsqueeze(0)
    return positions < torch.as_tensor(lengths, dtype=torch.long).clamp(min=1).unsqueeze(1)


def make_batch(split: Split, index: np.ndarray) -> Batch:
    """Gather the samples at `index` (positions in `split`) into one `Batch`."""
    index = np.ascontiguousarray(index, dtype=np.int64)
    n = len(index)
    present = [split.text is not None or split.text_bert is not None,
               split.audio is not None, split.vision is not None]
    batch = Batch(
        labels=torch.from_numpy(split.labels[index].astype(np.float32)),
        index=torch.from_numpy(index),
        ids=[str(i) for i in split.ids[index]],
        presence=torch.tensor(present, dtype=torch.bool).expand(n, 3).clone()
        if split.presence is None else torch.from_numpy(split.presence[index] & np.array(present)),
        unimodal_labels={
            k: torch.from_numpy(v[index].astype(np.float32)) for k, v in split.unimodal_labels.items()
        },
    )
    if split.side:
        batch.side = {name: values[index].tolist() for name, values in split.side.items()}
    if split.domains is not None:
        batch.domains = torch.from_numpy(split.domains[index].astype(np.int64))
    if split.text_bert is not None:
        ids = torch.from_numpy(split.text_bert[index].astype(np.int64))
        batch.text_ids = ids
        batch.text_mask = ids[:, 1] > 0
    if split.text is not None:
        batch.text = torch.from_numpy(split.text[index])
        if batch.text_mask is None:
            # without token ids the only evidence of padding is an all-zero feature vector
            batch.text_mask = batch.text.abs().sum(-1) > 0
    if split.audio is not None:
        batch.audio = torch.from_numpy(split.audio[index])
        lengths = None if split.audio_lengths is None else split.audio_lengths[index]
        batch.audio_mask = _frame_mask(lengths, n, split.audio.shape[1])
    if split.vision is not None:
        batch.vision = torch.from_numpy(split.vision[index])
        lengths = None if split.vision_lengths is None else split.vision_lengths[index]
        batch.vision_mask = _frame_mask(lengths, n, split.vision.shape[1])
    return batch


def iterate_batches(
    split: Split,
    batch_size: int,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    part: tuple[int, int] = (0, 1),
) -> Iterator[Batch]:
    """Yield batches covering `split` once; shuffled only when asked (training). With `part`
    (rank, world), only the rank-th of `world` contiguous, near-equal parts of the order is
    covered (one process's share of an evaluation)."""
    n = len(split)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    rank, world = part
    order = np.array_split(order, world)[rank]
    for start in range(0, len(order), batch_size):
        yield make_batch(split, order[start:start + batch_size])


def training_shards(
    split: Split, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
) -> Iterator[tuple[Batch, float]]:
    """One epoch's training batches in an order drawn from `generator`, as one of `world`
    processes sees them (`shard` = (rank, world)), with the share of the whole batch each holds.

    Every process draws the same order and cuts it into the same batches of `batch_size` (those a
    single process trains on); each batch is split into `world` contiguous, near-equal parts and
    this rank gets its own, so the processes together train on exactly the single process's
    batches. A rank left without samples (a last batch smaller than `world`) gets the batch's
    first sample with share 0: it still takes part in the step, and its loss counts for nothing.
    """
    rank, world = shard
    order = torch.randperm(len(split), generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        whole = order[start:start + batch_size]
        own = np.array_split(whole, world)[rank]
        if len(own):
            yield make_batch(split, own), len(own) / len(whole)
        else:
            yield make_batch(split, whole[:1]), 0.0
