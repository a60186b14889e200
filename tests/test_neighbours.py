"""Blocked neighbour search (models/layers/neighbours.py) against a dense brute-force reference."""

from __future__ import annotations

import pytest
import torch

from msakit.models.layers.neighbours import (
    cosine_topk,
    label_buckets,
    label_neighbours,
    masked_topk,
    similarity_blocks,
)


def _dense_cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x.unsqueeze(1), y.unsqueeze(0), dim=-1)


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_blocks_cover_every_row_with_the_dense_similarities(block):
    torch.manual_seed(0)
    q, k = torch.randn(23, 5), torch.randn(11, 5)
    rows = torch.cat([scores for _, scores in similarity_blocks(q, k, block)])
    torch.testing.assert_close(rows, _dense_cosine(q, k))


def test_masked_topk_pads_rows_with_too_few_candidates():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.6, 0.8]])
    allowed = torch.tensor([[True, True, False, True], [False, False, True, False]])
    indices, values = masked_topk(scores, allowed, 3)
    assert indices.tolist() == [[1, 3, 0], [2, -1, -1]]
    assert values[1, 1:].isnan().all()
    least, _ = masked_topk(scores, allowed, 2, largest=False)
    assert least.tolist() == [[0, 3], [2, -1]]
    assert masked_topk(scores, allowed, 6)[0].shape == (2, 6)


@pytest.mark.parametrize("block", [4, 64])
def test_cosine_topk_matches_a_dense_sort(block):
    torch.manual_seed(1)
    x = torch.randn(30, 8)
    indices, values = cosine_topk(x, x, 5, exclude_self=True, block_size=block)
    dense = _dense_cosine(x, x).fill_diagonal_(float("-inf"))
    expected_values, expected = dense.topk(5, dim=1)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(values, expected_values)
    assert not (indices == torch.arange(30).unsqueeze(1)).any()
    far, _ = cosine_topk(x, x, 2, largest=False, block_size=block)
    assert torch.equal(far, _dense_cosine(x, x).topk(2, dim=1, largest=False).indices)


def test_label_buckets_round_half_to_even():
    labels = torch.tensor([-3.0, -1.4, -0.6, -0.5, 0.0, 0.5, 1.5, 2.6])
    assert label_buckets(labels).tolist() == [-3, -1, -1, 0, 0, 0, 2, 3]
    assert label_buckets(torch.tensor([0.25, -0.35]), width=0.5).tolist() == [0, -1]


@pytest.mark.parametrize("block", [3, 100])
def test_label_neighbours_are_the_right_samples(block):
    """Positives: the most similar samples of the same bucket (never the sample itself); hard
    negatives: the most similar of another bucket; easy negatives: the least similar of another."""
    torch.manual_seed(2)
    n, k = 40, 4
    features = torch.randn(n, 6)
    buckets = torch.randint(-2, 3, (n,))
    index = label_neighbours(features, buckets, k, block_size=block)
    assert len(index) == n
    dense = _dense_cosine(features, features)
    same = buckets.unsqueeze(1) == buckets.unsqueeze(0)
    for i in range(n):
        order = dense[i].argsort(descending=True).tolist()
        same_ids = [j for j in order if same[i, j] and j != i]
        other_ids = [j for j in order if not same[i, j]]
        expected_pos = (same_ids + [-1] * k)[:k]
        assert index.positives[i].tolist() == expected_pos
        assert index.hard_negatives[i].tolist() == other_ids[:k]
        assert index.easy_negatives[i].tolist() == other_ids[::-1][:k]
        found = index.positives[i][index.positives[i] >= 0]
        assert (buckets[found] == buckets[i]).all()
        assert (buckets[index.hard_negatives[i]] != buckets[i]).all()


def test_a_sample_alone_in_its_bucket_gets_no_positive():
    features = torch.randn(5, 3)
    index = label_neighbours(features, torch.tensor([0, 0, 0, 0, 1]), 2)
    assert index.positives[4].tolist() == [-1, -1]
    assert index.hard_negatives[4].tolist() != [-1, -1]
    assert sorted(index.positives[0].tolist()) != [-1, -1]
