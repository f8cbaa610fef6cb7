"""What a config needs from the machine before the daemon can run on it.

`esim-agent run --check`, the start and every SIGHUP ask the same questions, so a config that
cannot work is refused with one line (and at start a documented exit status) instead of a
traceback halfway through.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from agent.errors import AgentError

#: sysexits.h statuses of `esim-agent run` (docs/systemd.md lists them).
EX_OK = 0
EX_RUNTIME = 1
EX_CANTCREAT = 73  # state_dir missing and not creatable, or not writable
EX_TEMPFAIL = 75  # another daemon answers on the control socket
EX_NOPERM = 77  # a configured modem port exists but cannot be opened
EX_CONFIG = 78  # the config file itself is wrong


class PreflightError(AgentError):
    """The machine cannot run this config; exit_status is the one `esim-agent run` exits with."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists():
            return parent
    return Path("/")


def state_dir_problem(state_dir: str, *, create: bool) -> str | None:
    """Why state_dir cannot hold the daemon's files, or None. create=True makes it if missing
    (as systemd's StateDirectory= would) and proves it writable with a real file."""
    path = Path(state_dir)
    if path.exists() and not path.is_dir():
        return f"state_dir {state_dir} is not a directory"
    if not create:
        base = _nearest_existing(path)
        if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
            what = "is not writable" if base == path else f"is missing and {base} is not writable"
            return f"state_dir {state_dir} {what}"
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return f"state_dir {state_dir} is not usable: {reason}"
    return None


#: Write failures of the medium itself, not of the config: a read-only or full filesystem.
MEDIA_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO})


def state_dir_media_failure(state_dir: str) -> str | None:
    """Why an existing state_dir's medium refuses writes (read-only, full, I/O error), or None.

    The daemon runs on through these: usage is bookkeeping and failover must never depend on
    it (usage is kept in memory until the disk takes writes again). A state_dir that is
    missing and cannot be created, or that the service user may not write, is a config
    mistake instead, and `run` exits 73 for it.
    """
    path = Path(state_dir)
    if not path.is_dir():
        return None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-") as fh:
            fh.write(b"\0")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno in MEDIA_ERRNOS:
            return f"state_dir {state_dir} refuses writes: {exc.strerror or type(exc).__name__}"
    return None


def control_socket_problem(socket_path: str, *, create: bool) -> str | None:
    """Why the control socket cannot be bound there, or None. create=True makes a missing
    directory (as systemd's RuntimeDirectory= would) with mode 0750."""
    if len(os.fsencode(socket_path)) > 107:
        return f"control socket path {socket_path} is longer than a Unix socket allows"
    parent = Path(socket_path).parent
    if parent.exists() and not parent.is_dir():
        return f"control socket directory {parent} is not a directory"
    if not parent.exists():
        if not create:
            base = _nearest_existing(parent)
            if base.is_dir() and os.access(base, os.W_OK | os.X_OK):
                return None
            return f"control socket directory {parent} is missing and {base} is not writable"
        try:
            parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            return f"control socket directory {parent} cannot be created: {reason}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"control socket directory {parent} is not writable"
    return None


def port_problem(port: str) -> str | None:
    """Why an existing port cannot be opened (not a device, no permission), or None.

    A missing port is no problem here: modems come and go, and an absent one must not stop
    the others. The port is not opened: on real modems opening it toggles DTR.
    """
    path = Path(port)
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"modem port {port} cannot be opened: {exc.strerror or type(exc).__name__}"
    if not stat.S_ISCHR(st.st_mode):
        return f"modem port {port} is not a serial device"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"modem port {port} cannot be opened: permission denied"
    return None
