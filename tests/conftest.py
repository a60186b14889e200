"""Fixtures shared by the whole suite."""

from __future__ import annotations

import numpy as np
import pytest

from model_inputs import N, contract_split
from msakit.data import MultimodalDataset, make_batch, synthetic_dataset
from msakit.data.schema import Batch, FeatureDims, Split
from tiny_bert import make_tiny_bert


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """msakit's caches (pickle fingerprints) in a folder of the test session, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def tiny_dataset() -> MultimodalDataset:
    """A small unaligned synthetic dataset (48/16/24 clips, short sequences, 32-d text features).

    Shared by many tests: do not modify its arrays in place.
    """
    return synthetic_dataset(
        n_train=48, n_valid=16, n_test=24, text_len=16, audio_len=40, audio_dim=5,
        vision_len=30, vision_dim=20, text_dim=32, seed=0,
    )


@pytest.fixture(scope="module")
def split() -> Split:
    """The hand-made 6-clip split of `model_inputs` (variable lengths, token ids and features)."""
    return contract_split()


@pytest.fixture(scope="module")
def dims(split: Split) -> FeatureDims:
    return MultimodalDataset("tiny", "synthetic", split, split, split).dims


@pytest.fixture(scope="module")
def batch(split: Split) -> Batch:
    return make_batch(split, np.arange(N))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A randomly initialised 2-layer BERT folder with the bert-base-uncased vocabulary."""
    return str(make_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))
