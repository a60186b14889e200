"""Nearest neighbours by cosine similarity over a whole training split, one block of queries at a time.

A dense N x N similarity matrix for MOSEI's 16k training clips takes 1 GB in float32, and ranking
every row of it (what DashFusion's official code does, with Python loops over N^2 pairs) costs far
more. Here the queries are handled `block_size` rows at a time and only the top k of each row is
kept, so the largest temporary is a few block_size x N tensors, whatever N is.

`cosine_topk` is the plain search; `label_neighbours` is the label-aware one that supervised
contrastive methods need: per sample, the most similar samples with the same label bucket
(positives), the most similar with another bucket (hard negatives) and the least similar with
another bucket (easy negatives). Both return sample positions (row numbers of `keys`), -1 where
fewer than k candidates exist.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BLOCK = 1024


def similarity_blocks(
    queries: torch.Tensor, keys: torch.Tensor, block_size: int = DEFAULT_BLOCK
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, cosine similarities (len(rows), N_keys)) for consecutive blocks of queries.

    A zero vector has similarity 0 with everything (rather than NaN).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, not {block_size}")
    keys = F.normalize(keys.float(), dim=-1)
    queries = F.normalize(queries.float(), dim=-1)
    for start in range(0, queries.shape[0], block_size):
        rows = slice(start, min(start + block_size, queries.shape[0]))
        yield rows, queries[rows] @ keys.T


def masked_topk(
    scores: torch.Tensor, allowed: torch.Tensor, k: int, largest: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row of `scores` (R, N) among those where `allowed` (R, N) is True.

    Returns (indices, values), each (R, k), best first; -1 (and NaN) where a row has fewer than k
    allowed columns.
    """
    count = min(k, scores.shape[1])
    fill = float("-inf") if largest else float("inf")
    values, indices = scores.masked_fill(~allowed, fill).topk(count, dim=1, largest=largest)
    found = allowed.gather(1, indices)
    indices = indices.masked_fill(~found, -1)
    values = values.masked_fill(~found, float("nan"))
    if count < k:
        indices = F.pad(indices, (0, k - count), value=-1)
        values = F.pad(values, (0, k - count), value=float("nan"))
    return indices, values


def _not_self(rows: slice, n_keys: int, device: torch.device) -> torch.Tensor:
    """(len(rows), n_keys) True except where the key is the query itself (queries are the keys)."""
    query_ids = torch.arange(rows.start, rows.stop, device=device).unsqueeze(1)
    return query_ids != torch.arange(n_keys, device=device).unsqueeze(0)


def cosine_topk(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    exclude_self: bool = False,
    block_size: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k keys most (or least) cosine-similar to each query: (indices, similarities), (Q, k).

    `exclude_self`: the queries are the keys themselves and a sample is not its own neighbour.
    """
    indices, values = [], []
    for rows, scores in similarity_blocks(queries, keys, block_size):
        allowed = (
            _not_self(rows, keys.shape[0], scores.device) if exclude_self
            else torch.ones_like(scores, dtype=torch.bool)
        )
        i, v = masked_topk(scores, allowed, k, largest)
        indices.append(i)
        values.append(v)
    return torch.cat(indices), torch.cat(values)


@dataclass
class LabelNeighbours:
    """Per sample, k sample positions of each kind (best first, -1 = not enough candidates)."""

    positives: torch.Tensor  # (N, k) most similar, same label bucket, never the sample itself
    hard_negatives: torch.Tensor  # (N, k) most similar, another bucket
    easy_negatives: torch.Tensor  # (N, k) least similar, another bucket

    def __len__(self) -> int:
        return int(self.positives.shape[0])


def label_buckets(labels: torch.Tensor, width: float = 1.0) -> torch.Tensor:
    """Integer bucket of each regression label: round(label / width), halves to even."""
    return torch.round(labels.float() / width).long()


def label_neighbours(
    features: torch.Tensor, buckets: torch.Tensor, k: int, block_size: int = DEFAULT_BLOCK
) -> LabelNeighbours:
    """Label-aware neighbours of every row of `features` (N, D) among the rows themselves.

    `buckets` (N,) holds each sample's label bucket (see `label_buckets`). Each block of
    similarities is computed once and serves all three lists.
    """
    buckets = buckets.to(features.device)
    lists: dict[str, list[torch.Tensor]] = {"positives": [], "hard": [], "easy": []}
    for rows, scores in similarity_blocks(features, features, block_size):
        same = buckets[rows].unsqueeze(1) == buckets.unsqueeze(0)
        not_self = _not_self(rows, features.shape[0], scores.device)
        lists["positives"].append(masked_topk(scores, same & not_self, k)[0])
        lists["hard"].append(masked_topk(scores, ~same, k)[0])
        lists["easy"].append(masked_topk(scores, ~same, k, largest=False)[0])
    return LabelNeighbours(
        positives=torch.cat(lists["positives"]),
        hard_negatives=torch.cat(lists["hard"]),
        easy_negatives=torch.cat(lists["easy"]),
    )
