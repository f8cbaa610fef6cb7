"""Async serial port over pyserial: exclusive open, non-blocking fd I/O, typed loss of the port."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
from collections.abc import Callable

import serial
import structlog

from agent.errors import PortBusyError, PortGoneError

log = structlog.get_logger(__name__)

READ_CHUNK = 4096
WRITE_TIMEOUT_S = 5.0


class SerialPort:
    """One open serial port; bytes go to `on_data`, the loss of the port to `on_lost` (once)."""

    def __init__(self, path: str, handle: serial.Serial) -> None:
        self.path = path
        self._handle = handle
        self._fd = handle.fileno()
        self._loop = asyncio.get_running_loop()
        self._on_data: Callable[[bytes], None] = lambda _b: None
        self._on_lost: Callable[[PortGoneError], None] = lambda _e: None
        self._closed = False
        self._lost: PortGoneError | None = None

    @classmethod
    async def open(cls, path: str, *, baudrate: int = 115200) -> SerialPort:
        """Open path exclusively (flock), 8N1, no flow control; PortBusyError if another owner holds it."""
        try:
            handle = serial.Serial(
                path, baudrate=baudrate, timeout=0, write_timeout=0, exclusive=True
            )
        except serial.SerialException as exc:
            text = str(exc)
            if "lock" in text.lower() or "resource temporarily unavailable" in text.lower():
                raise PortBusyError(path, "port is in use by another process") from exc
            raise PortGoneError(path, _short_reason(exc)) from exc
        except OSError as exc:  # pragma: no cover - pyserial wraps most, not all
            raise PortGoneError(path, _short_reason(exc)) from exc
        port = cls(path, handle)
        log.debug("serial_opened", port=path)
        return port

    @property
    def lost(self) -> PortGoneError | None:
        """The loss that closed the port, if it was lost rather than closed by us."""
        return self._lost

    def start(
        self, on_data: Callable[[bytes], None], on_lost: Callable[[PortGoneError], None]
    ) -> None:
        """Begin delivering bytes; call once."""
        self._on_data = on_data
        self._on_lost = on_lost
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(_short_reason(exc))
            return
        if not data:
            # With VMIN=0 an empty read also means "the bytes that woke us were flushed"
            # (a modem reset discards its output queue); only a hang-up means the port is gone.
            if _hung_up(self._fd):
                self._fail("port closed (device unplugged?)")
            return
        self._on_data(data)

    def read_pending(self) -> None:
        """Deliver now, synchronously, the bytes already waiting in the kernel buffer."""
        # A tty read with VMIN=0 returns b"" both for "nothing yet" and for hang-up: ask first.
        for _ in range(64):
            if self._closed or not select.select([self._fd], [], [], 0)[0]:
                return
            self._readable()

    def _fail(self, reason: str) -> None:
        if self._closed:
            return
        self._lost = PortGoneError(self.path, reason)
        # info, not warning: the loss reaches the caller as PortGoneError and is reported there once
        log.info("serial_lost", port=self.path, reason=reason)
        self._teardown()
        self._on_lost(self._lost)

    async def write(self, data: bytes, *, timeout: float = WRITE_TIMEOUT_S) -> None:
        """Write all of data, waiting for the fd to drain when the tty buffer is full."""
        if self._lost is not None:
            raise self._lost
        if self._closed:
            raise PortGoneError(self.path, "port is closed")
        view = memoryview(data)
        async with asyncio.timeout(timeout):
            while view:
                try:
                    n = os.write(self._fd, view)
                except BlockingIOError:
                    await self._wait_writable()
                    continue
                except OSError as exc:
                    self._fail(_short_reason(exc))
                    assert self._lost is not None
                    raise self._lost from exc
                view = view[n:]

    async def _wait_writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()

        def writable() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(self._fd, writable)
        try:
            await fut
        finally:
            self._loop.remove_writer(self._fd)

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fd)
        with contextlib.suppress(OSError, serial.SerialException):
            self._handle.close()

    def close(self) -> None:
        """Release the port and its lock."""
        self._teardown()
        log.debug("serial_closed", port=self.path)


def _hung_up(fd: int) -> bool:
    """Whether the other end of the tty is gone (POLLHUP/POLLERR), without waiting."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    try:
        events = poller.poll(0)
    except OSError:
        return True
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in events)


def _short_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        if exc.errno == errno.EIO:
            return "I/O error (device unplugged?)"
        if exc.errno == errno.ENOTTY:
            return "not a serial port"
        return os.strerror(exc.errno).lower()
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    # pyserial wraps termios failures as "Could not configure port: (25, '...')".
    if f"({errno.ENOTTY}," in text:
        return "not a serial port"
    return text
