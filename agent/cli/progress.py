"""Progress for long operations, on a terminal only (rich); silent when stderr is not a tty, so
scripts and --json output see nothing extra."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol


class Status(Protocol):
    """What a caller may do with a running spinner."""

    def update(self, text: str) -> None:
        """Replace the spinner's text."""
        ...


class _Quiet:
    def update(self, text: str) -> None:
        pass


class _Rich:
    def __init__(self, status: object) -> None:
        self._status = status

    def update(self, text: str) -> None:
        self._status.update(text)  # type: ignore[attr-defined]


def interactive() -> bool:
    """Whether a person is watching stderr."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def spinner(text: str) -> Iterator[Status]:
    """A spinner with text on stderr while the block runs; nothing at all when not a tty."""
    if not interactive():
        yield _Quiet()
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status(text) as status:
        yield _Rich(status)
