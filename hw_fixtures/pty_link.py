"""The emulated modem's serial port: a pseudo-terminal that can be unplugged and replugged."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import pty
import tty
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

MAX_PENDING = 256 * 1024


class PtyLink:
    """A pty whose master side the emulator drives; a stable symlink follows the slave path."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_data: Callable[[bytes], None],
        symlink: str | None = None,
    ) -> None:
        self._loop = loop
        self._on_data = on_data
        self.symlink = symlink
        self.port: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._pending = bytearray()
        self._writer_armed = False
        self.dropped = 0

    @property
    def plugged(self) -> bool:
        """True while the pty exists."""
        return self._master is not None

    def open(self) -> str:
        """Create a new pty (raw mode), start reading it and point the symlink at it."""
        if self._master is not None:
            raise RuntimeError("already open")
        master, slave = pty.openpty()
        # raw: the line discipline must neither echo nor translate CR, the modem does that
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.port = os.ttyname(slave)
        self._loop.add_reader(master, self._readable)
        if self.symlink:
            tmp = f"{self.symlink}.tmp{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(self.port, tmp)
            os.replace(tmp, self.symlink)
        log.info("emu_pty_open", port=self.port, link=self.symlink)
        return self.port

    def close(self) -> None:
        """Close the pty as an unplugged USB device vanishes: clients see EOF/EIO."""
        master, slave = self._master, self._slave
        self._master = self._slave = None
        self._pending.clear()
        if master is not None:
            self._loop.remove_reader(master)
            if self._writer_armed:
                self._loop.remove_writer(master)
                self._writer_armed = False
            os.close(master)
        if slave is not None:
            os.close(slave)
        if self.symlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.symlink)
        log.info("emu_pty_closed", port=self.port)

    def write(self, data: bytes) -> None:
        """Queue bytes toward the client; silently dropped while unplugged."""
        if self._master is None:
            self.dropped += len(data)
            return
        if len(self._pending) + len(data) > MAX_PENDING:
            # nobody reads the port: behave like a full UART FIFO and lose bytes
            self.dropped += len(data)
            return
        self._pending.extend(data)
        self._flush()

    def _flush(self) -> None:
        master = self._master
        if master is None:
            return
        while self._pending:
            try:
                n = os.write(master, self._pending)
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("emu_pty_write_failed", port=self.port, error=str(exc))
                self._pending.clear()
                break
            del self._pending[:n]
        if self._pending and not self._writer_armed:
            self._loop.add_writer(master, self._flush)
            self._writer_armed = True
        elif not self._pending and self._writer_armed:
            self._loop.remove_writer(master)
            self._writer_armed = False

    def _readable(self) -> None:
        master = self._master
        if master is None:
            return
        try:
            data = os.read(master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            # EIO on the master only happens with no slave fd open; ours stays open
            if exc.errno != errno.EIO:
                log.warning("emu_pty_read_failed", port=self.port, error=str(exc))
            return
        if data:
            self._on_data(data)
