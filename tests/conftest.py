"""Fixtures shared by the whole suite."""

from __future__ import annotations

import pytest

from msakit.data import MultimodalDataset, synthetic_dataset


@pytest.fixture(scope="session")
def tiny_dataset() -> MultimodalDataset:
    """A small unaligned synthetic dataset (48/16/24 clips, short sequences, 32-d text features).

    Shared by many tests: do not modify its arrays in place.
    """
    return synthetic_dataset(
        n_train=48, n_valid=16, n_test=24, text_len=16, audio_len=40, audio_dim=5,
        vision_len=30, vision_dim=20, text_dim=32, seed=0,
    )
