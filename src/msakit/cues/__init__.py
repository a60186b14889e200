"""MMSLF's cues: per-sample text ("Visual cues: ...\nLanguage cues: ...") that a teacher model reads.

`generate_cues` writes them to a JSONL cue file with a backend: `OpenAIBackend` asks an MLLM behind
any OpenAI-compatible endpoint (frames, transcript, and the label of training clips, as the paper
does); `OfflineBackend` describes the clip's features in words without a network. `load_cue_texts`
reads a cue file back as id -> text; `attach_cues` gives a dataset's splits their cues as a side
input (`Split.side["cues"]`, which reaches the model in `Batch.side`) and says which backends
wrote them (`cue_sources`).
"""

from msakit.cues.backend import CueBackend, CueFailure, CueSample
from msakit.cues.cache import (
    CueRecord,
    attach_cues,
    cue_sources,
    load_cue_texts,
    read_cue_records,
    with_cues,
)
from msakit.cues.offline import OfflineBackend
from msakit.cues.pipeline import CueRunReport, generate_cues, make_backend, run_cues

__all__ = [
    "CueBackend", "CueFailure", "CueRecord", "CueRunReport", "CueSample", "OfflineBackend",
    "attach_cues", "cue_sources", "generate_cues", "load_cue_texts", "make_backend",
    "read_cue_records", "run_cues", "with_cues",
]
