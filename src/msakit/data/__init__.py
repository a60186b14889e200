"""Datasets in memory: schema, batching and every source (MMSA pickles, synthetic, label.csv)."""

from msakit.data.batching import iterate_batches, make_batch
from msakit.data.catalog import list_datasets, load_dataset
from msakit.data.labelcsv import load_label_csv
from msakit.data.mmsa import load_mmsa, save_mmsa
from msakit.data.schema import Batch, FeatureDims, MultimodalDataset, Split
from msakit.data.synthetic import generate_synthetic, synthetic_dataset

__all__ = [
    "Batch",
    "FeatureDims",
    "MultimodalDataset",
    "Split",
    "generate_synthetic",
    "iterate_batches",
    "list_datasets",
    "load_dataset",
    "load_label_csv",
    "load_mmsa",
    "make_batch",
    "save_mmsa",
    "synthetic_dataset",
]
