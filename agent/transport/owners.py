"""Who else has a serial port open, and which control socket a process listens on (procfs).

Used to tell a person *who* holds a port (the daemon, a terminal, ModemManager) and, when it
is the esim-agent daemon, where to reach it.
"""

from __future__ import annotations

import os
from pathlib import Path


def port_holders(port: str) -> dict[int, str]:
    """pid -> process name of every process with port open (any of its names resolved)."""
    try:
        target = os.stat(port)
    except OSError:
        return {}
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino, st.st_rdev) == (target.st_dev, target.st_ino, target.st_rdev):
                found[int(entry)] = _process_name(int(entry))
                break
    index = _pty_index(target.st_rdev)
    if index is not None:
        # The process driving the pty's master side is the device end (the emulator), not a
        # competitor for the port.
        found = {pid: name for pid, name in found.items() if not _holds_pty_master(pid, index)}
    return found


def _pty_index(rdev: int) -> int | None:
    """N of /dev/pts/N (Unix98 pty slaves: majors 136-143), None for other devices."""
    major = os.major(rdev)
    if 136 <= major <= 143:
        return (major - 136) * 256 + os.minor(rdev)
    return None


def _holds_pty_master(pid: int, index: int) -> bool:
    """Whether pid has the master side of /dev/pts/<index> open (fdinfo's tty-index)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") not in ("/dev/ptmx", "/dev/pts/ptmx"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="utf-8") as fh:
                if f"tty-index:\t{index}\n" in fh.read():
                    return True
        except OSError:
            continue
    return False


def socket_owners(path: str) -> set[int]:
    """pids that hold the listening Unix socket bound at path (the daemon behind a control socket)."""
    inodes: set[str] = set()
    try:
        with open("/proc/net/unix", encoding="utf-8") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path:
                    inodes.add(fields[6])
    except OSError:
        return set()
    owners: set[int] = set()
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            links = {
                os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")
            }
        except OSError:
            continue
        if links & wanted:
            owners.add(int(entry))
    return owners


def listening_sockets(pid: int) -> list[str]:
    """Paths of the Unix sockets pid has bound (e.g. a daemon's control socket)."""
    paths: dict[str, str] = {}
    try:
        with open("/proc/net/unix", encoding="utf-8") as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[7].startswith("/"):
                    paths[fields[6]] = fields[7]
    except OSError:
        return []
    found: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and (path := paths.get(link[8:-1])) is not None:
            found.append(path)
    return sorted(set(found))


def is_esim_agent_daemon(pid: int) -> bool:
    """Whether pid runs `esim-agent run` (or `python -m agent run`)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [a.decode(errors="replace") for a in argv if a]
    names = {os.path.basename(w) for w in words[:3]}
    return "run" in words and ("esim-agent" in names or "agent" in words)


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
    except OSError:
        return "?"
