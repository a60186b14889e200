"""Raw media -> features: audio, transcript, text, acoustic and face extractors behind one interface.

`load_feature_config` reads `default.yaml` (plus a user's YAML and `--set` overrides);
`FeaturePipeline` runs the extractors on one file; `build_dataset` turns a folder of clips and a
label.csv into an MMSA-layout pickle (`msakit.inference` scores new files with a checkpoint trained
on one). The extractors' libraries come with the optional `extract` extra
(`pip install 'msakit[extract]'`) and are imported only when used.
"""

from msakit.features.config import FeatureConfig, load_feature_config
from msakit.features.dataset import build_dataset, read_labels
from msakit.features.pipeline import FeaturePipeline, feature_names

__all__ = [
    "FeatureConfig", "FeaturePipeline", "build_dataset", "feature_names", "load_feature_config",
    "read_labels",
]
