"""The one exception type for bad user input, and the key check every settings table shares.

The CLI prints a MsakitError's message on one line and exits with 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


class MsakitError(Exception):
    """A problem with what the user gave (a file, a key, a value): never a bug in msakit itself."""


def reject_unknown_keys(keys: Iterable[str], settings: type, what: str) -> None:
    """MsakitError naming the keys that are not fields of the dataclass `settings`, and the real ones."""
    known = {f.name for f in dataclasses.fields(settings)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise MsakitError(
            f"unknown {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )


def one_line(exc: BaseException) -> str:
    """An exception as one line: msakit's own errors as their message, others with their type."""
    if isinstance(exc, MsakitError):
        return " ".join(str(exc).split())
    return " ".join(f"{type(exc).__name__}: {exc}".split())
