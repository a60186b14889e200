"""Where a study's jobs and search trials run: Ray (a local instance msakit starts and stops, or an
existing cluster) or this process, one after another. Both take tasks and hand back each result,
or a one-line error, as it finishes: a failed task never stops the others."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Hashable
from typing import Any

from msakit.errors import MsakitError, one_line

TASK_RETRIES = 3  # attempts after a worker dies (Ray's system failures); a training resumes each time

Done = tuple[Hashable, Any, str | None]  # the task's key, its result (None on failure), the error


def _with_threads(threads: int, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a Ray worker, with as many torch threads as the task asked CPUs."""
    import torch

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.WARNING)
    return function(*args)


class LocalExecutor:
    """Tasks run in this process, in the order given, when their result is asked for."""

    def __init__(self) -> None:
        self._queue: list[tuple[Hashable, Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, key: Hashable, function: Callable[..., Any], *args: Any) -> None:
        self._queue.append((key, function, args))

    @property
    def pending(self) -> int:
        return len(self._queue)

    def next_done(self) -> Done:
        key, function, args = self._queue.pop(0)
        try:
            return key, function(*args), None
        except MsakitError as exc:
            return key, None, one_line(exc)

    def close(self) -> None:
        self._queue.clear()


class RayExecutor:
    """Tasks as Ray tasks, each asking `cpus` and `gpus`, retried when their worker dies."""

    def __init__(self, address: str | None, cpus: float, gpus: float) -> None:
        try:
            import ray
        except ImportError:
            raise MsakitError("running a study on Ray needs ray: pip install 'msakit[study]' "
                              "(or --executor local)") from None
        self.ray = ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no telemetry from an offline machine
        self.started = not ray.is_initialized()
        if self.started:
            try:
                if address is None:  # "local": a new instance, never a cluster some `ray start` left
                    ray.init(address="local", include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
                else:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise MsakitError(f"--address {address}: cannot join the Ray cluster ({one_line(exc)})"
                                  ) from None
        self.task = ray.remote(_with_threads).options(num_cpus=cpus, num_gpus=gpus, max_retries=TASK_RETRIES,
                                                      retry_exceptions=False)
        self.threads = max(1, int(cpus))
        self._refs: dict[Any, Hashable] = {}

    def submit(self, key: Hashable, function: Callable[..., Any], *args: Any) -> None:
        self._refs[self.task.remote(self.threads, function, *args)] = key

    @property
    def pending(self) -> int:
        return len(self._refs)

    def next_done(self) -> Done:
        ray = self.ray
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        key = self._refs.pop(ready[0])
        try:
            return key, ray.get(ready[0]), None
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            return key, None, one_line(cause)
        except ray.exceptions.RayError as exc:  # the worker died more often than it was retried
            return key, None, one_line(exc)

    def close(self) -> None:
        for ref in self._refs:
            self.ray.cancel(ref, force=True)
        self._refs.clear()
        if self.started:
            self.ray.shutdown()


def make_executor(kind: str, address: str | None, cpus: float, gpus: float) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(address, cpus, gpus)
    raise MsakitError(f"--executor {kind!r}: use ray or local")
