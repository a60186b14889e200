"""Extraction in worker processes, shared by `msakit extract` and batch `msakit predict`.

Each worker builds its extractors once and runs single-threaded (the processes are the
parallelism). A clip that fails is reported through `done` and the others go on; a clip that kills
its worker (a crash in a native decoder or model) takes its neighbours' clips with it, so those are
retried one by one to find the culprit.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
from collections.abc import Callable, Collection, Sequence
from typing import Any

from msakit.data.schema import MODALITIES
from msakit.errors import one_line
from msakit.features.config import FeatureConfig
from msakit.features.pipeline import FeaturePipeline

Job = tuple[str, str | None]  # a media file and its given transcript
Done = Callable[[int, bool, Any], None]  # the job's index, ok, its features or a one-line reason

_PIPELINE: FeaturePipeline | None = None


def _start_worker(config: dict[str, Any], reads: tuple[str, ...]) -> None:
    global _PIPELINE
    import torch

    torch.set_num_threads(1)
    _PIPELINE = FeaturePipeline(FeatureConfig.from_dict(config), reads)


def _extract_in_worker(media: str, text: str | None) -> tuple[bool, Any]:
    return _extract(_PIPELINE, media, text)


def _extract(pipeline: FeaturePipeline, media: str, text: str | None) -> tuple[bool, Any]:
    try:
        return True, pipeline.extract(media, text or None)
    except Exception as exc:  # any failure of one clip is reported, never fatal to the run
        return False, one_line(exc)


def _run_in_pool(initargs: tuple[Any, ...], jobs: dict[int, Job], workers: int, done: Done) -> list[int]:
    """Runs `jobs` in `workers` processes; returns the jobs lost to a dead worker process."""
    context = multiprocessing.get_context("spawn")  # fork would copy threads of torch/FFmpeg
    lost: list[int] = []
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                     initargs=initargs) as pool:
        pending = {pool.submit(_extract_in_worker, *job): index for index, job in jobs.items()}
        try:
            for future in futures.as_completed(pending):
                try:
                    ok, value = future.result()
                except futures.process.BrokenProcessPool:
                    lost.append(pending[future])
                    continue
                done(pending[future], ok, value)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return lost


def extract_all(config: FeatureConfig, jobs: Sequence[Job], workers: int, done: Done,
                reads: Collection[str] = MODALITIES, pipeline: FeaturePipeline | None = None) -> None:
    """Extracts every job, calling `done` as each finishes. `workers` 0 runs in this process, with
    `pipeline` when one is given (else a single-threaded one, as in a worker)."""
    initargs = (config.to_dict(), tuple(reads))
    if workers <= 0:
        if pipeline is None:
            _start_worker(*initargs)
            pipeline = _PIPELINE
        for index, job in enumerate(jobs):
            done(index, *_extract(pipeline, *job))
        return
    lost = _run_in_pool(initargs, dict(enumerate(jobs)), min(workers, len(jobs)), done)
    for index in lost:
        if _run_in_pool(initargs, {index: jobs[index]}, 1, done):
            done(index, False, "the worker process died while extracting this clip "
                               "(a crash in a native decoder or model)")


def progress_bar(total: int, label: str, note: str = "", enabled: bool = True
                 ) -> tuple[Callable[[], None], Callable[[], None]]:
    """`advance` and `stop` of a progress bar on stderr (both do nothing when disabled)."""
    if not enabled or total == 0:
        return (lambda: None), (lambda: None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn(note), console=Console(stderr=True))
    task = bar.add_task(label, total=total)
    bar.start()
    return (lambda: bar.advance(task)), bar.stop
