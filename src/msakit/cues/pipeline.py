"""A dataset's samples -> a backend -> the cue file, resumably, with a report of what it cost.

`generate_cues` asks the backend only for samples the cue file does not already hold from the same
backend, model and prompt version, appends each record as it arrives, and counts what was
requested, written, failed and skipped, and the tokens (and money, given prices) the replies used.
Labels reach the backend for training samples only. `run_cues` is the same from names and options
(what `msakit cues` calls).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msakit.choices import CUE_BACKENDS
from msakit.cues.backend import CueBackend, CueFailure, CueSample
from msakit.cues.cache import CueFileWriter, read_cue_records
from msakit.cues.offline import OfflineBackend
from msakit.data.catalog import load_dataset
from msakit.data.schema import SPLITS, MultimodalDataset
from msakit.errors import MsakitError
from msakit.features.dataset import index_media
from msakit.fileio import check_output


@dataclass
class CueRunReport:
    """What one run did. `cost` is None unless both prices (per million tokens) were given."""

    output: str
    backend: str
    model: str
    prompt_version: str
    samples: int  # samples of the chosen splits (after the limit)
    requested: int
    written: int
    skipped: int  # already in the cue file from the same backend, model and prompt version
    with_media: int  # requested samples for which a media file was found
    prompt_tokens: int = 0
    completion_tokens: int = 0
    price_input: float | None = None
    price_output: float | None = None
    seconds: float = 0.0
    failures: list[CueFailure] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def cost(self) -> float | None:
        if self.price_input is None or self.price_output is None:
            return None
        return (self.prompt_tokens * self.price_input + self.completion_tokens * self.price_output) / 1e6

    def to_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in (
            "output", "backend", "model", "prompt_version", "samples", "requested", "written", "failed",
            "skipped", "with_media", "prompt_tokens", "completion_tokens", "price_input", "price_output",
            "cost", "seconds")}
        values["failures"] = [{"id": f.id, "split": f.split, "reason": f.reason} for f in self.failures]
        return values


def _media_keys(sample_id: str) -> tuple[str, ...]:
    """File names (relative, without suffix) a clip's media may have, as `msakit extract` finds them."""
    video, _, clip = sample_id.partition("$_$")
    return (sample_id, f"{video}/{clip}", f"{video}_{clip}") if clip else (sample_id,)


def _samples(dataset: MultimodalDataset, splits: Sequence[str], limit: int | None,
             media: dict[str, Path]) -> list[CueSample]:
    samples = []
    for name in splits:
        split = dataset.split(name)
        for i in range(len(split) if limit is None else min(limit, len(split))):
            sample_id = str(split.ids[i])
            transcript = None if split.raw_text is None else str(split.raw_text[i])
            path = next((media[key] for key in _media_keys(sample_id) if key in media), None)
            samples.append(CueSample(sample_id, name, i, transcript,
                                     float(split.labels[i]) if name == "train" else None,
                                     dataset.family, path))
    return samples


def _progress(total: int, enabled: bool) -> tuple[Callable[[], None], Callable[[], None]]:
    if not enabled or total == 0:
        return (lambda: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("cues"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True))
    task = bar.add_task("cues", total=total)
    bar.start()
    return (lambda: bar.advance(task)), bar.stop


def generate_cues(
    dataset: MultimodalDataset,
    backend: CueBackend,
    output: str | os.PathLike[str],
    *,
    splits: Sequence[str] = SPLITS,
    limit: int | None = None,
    media: str | os.PathLike[str] | None = None,
    price_input: float | None = None,
    price_output: float | None = None,
    progress: bool = False,
) -> CueRunReport:
    """Write the cues of the first `limit` (default: all) samples of each of `splits` to `output`.

    `media` is a folder of the clips' raw files (found by id as `msakit extract` finds them), for
    backends that read media. Prices are per million prompt / completion tokens.
    """
    start = time.perf_counter()
    for name in splits:
        dataset.split(name)
    if limit is not None and limit < 1:
        raise MsakitError(f"limit should be at least 1, got {limit}")
    for flag, price in (("input", price_input), ("output", price_output)):
        if price is not None and not price >= 0:
            raise MsakitError(f"price {flag} should be a number >= 0 (per million tokens), got {price}")
    index: dict[str, Path] = {}
    if media is not None:
        if not backend.reads_media:
            raise MsakitError(f"the {backend.name} backend does not read media files (--media {media}); "
                              "it describes the dataset's features")
        index = index_media(Path(media).expanduser())
    output = Path(output).expanduser()
    existing = read_cue_records(output)
    samples = _samples(dataset, list(dict.fromkeys(splits)), limit, index)

    def done(sample: CueSample) -> bool:
        record = existing.get(sample.id)
        return record is not None and (record["backend"], record["model"], record["prompt_version"]) == (
            backend.name, backend.model, backend.prompt_version)

    todo = [s for s in samples if not done(s)]
    report = CueRunReport(str(output), backend.name, backend.model, backend.prompt_version,
                          samples=len(samples), requested=len(todo), written=0,
                          skipped=len(samples) - len(todo),
                          with_media=sum(s.media is not None for s in todo),
                          price_input=price_input, price_output=price_output)
    advance, stop = _progress(len(todo), progress)
    try:
        with CueFileWriter(output) as writer:
            for result in backend.describe(todo):
                if result.usage is not None:
                    report.prompt_tokens += result.usage["prompt_tokens"]
                    report.completion_tokens += result.usage["completion_tokens"]
                if isinstance(result, CueFailure):
                    report.failures.append(result)
                else:
                    writer.write(result)
                    report.written += 1
                advance()
    finally:
        stop()
        report.seconds = time.perf_counter() - start
    return report


def make_backend(
    name: str,
    dataset: MultimodalDataset,
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    **openai_options: Any,
) -> CueBackend:
    """The backend called `name` ("offline" or "openai"); the other arguments configure "openai"."""
    if name == "offline":
        given = [f"{what} {value!r}" for what, value in (("base URL", base_url), ("model", model),
                                                          ("API key variable", api_key_env)) if value]
        if given or api_key:
            raise MsakitError(f"the offline backend takes no {', '.join(given) or 'API key'}: "
                              "only the openai backend does")
        return OfflineBackend(dataset)
    if name == "openai":
        # imported when asked for: httpx and the image codecs cost every other command start-up time
        from msakit.cues.openai_backend import OpenAIBackend, resolve_settings

        return OpenAIBackend(resolve_settings(base_url, model, api_key, api_key_env, **openai_options))
    raise MsakitError(f"unknown cue backend {name!r}; known: {', '.join(CUE_BACKENDS)}")


def run_cues(
    dataset: str,
    output: str | os.PathLike[str],
    *,
    backend: str = "offline",
    data_dir: str | None = None,
    aligned: bool = False,
    media: str | os.PathLike[str] | None = None,
    splits: Sequence[str] = SPLITS,
    limit: int | None = None,
    price_input: float | None = None,
    price_output: float | None = None,
    progress: bool = True,
    **backend_options: Any,
) -> CueRunReport:
    """`generate_cues` for a dataset name or path and a backend name; `backend_options` go to
    `make_backend` (base_url, model, api_key_env, concurrency, max_retries, ...)."""
    check_output(output, folder=False)
    data = load_dataset(dataset, data_dir=data_dir, aligned=aligned)
    chosen = make_backend(backend, data, **backend_options)
    return generate_cues(data, chosen, output, splits=splits, limit=limit, media=media,
                         price_input=price_input, price_output=price_output, progress=progress)
