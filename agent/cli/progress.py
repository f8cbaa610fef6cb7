"""Progress for long operations, on a terminal only (rich); silent when stderr is not a tty, so
scripts and --json output see nothing extra."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # rich loads only when a terminal is watching
    from rich.console import Console
    from rich.status import Status as RichStatus


class Status(Protocol):
    """What a caller may do with a running spinner."""

    def update(self, text: str) -> None:
        """Replace the spinner's text."""
        ...

    def step(self, text: str) -> None:
        """A step that stays on screen above the spinner (phases of a switch), and the new text."""
        ...


class _Quiet:
    def update(self, text: str) -> None:
        pass

    def step(self, text: str) -> None:
        pass


class _Rich:
    def __init__(self, console: Console, status: RichStatus) -> None:
        self._console = console
        self._status = status

    def update(self, text: str) -> None:
        self._status.update(text)

    def step(self, text: str) -> None:
        self._console.print(f"  {text}", highlight=False)
        self._status.update(text)


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
        yield _Rich(console, status)
