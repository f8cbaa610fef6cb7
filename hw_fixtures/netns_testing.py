"""Network-namespace plumbing for tests: unique esa- namespaces, cleanup, running inside one.

Every namespace a test run or an emulator creates is named `esa-<pid>-<tag>-<what>`, where
<pid> is the creating process: `sweep_stale()` removes those whose process is gone (an
emulator killed with SIGKILL, a test run that crashed), never another live run's.
All netlink work goes through pyroute2; nothing shells out to `ip`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from hw_fixtures.testing import EmulatorHandle, start_emulator

PREFIX = "esa-"
_OWNED = re.compile(r"^esa-(\d+)-")


def is_root() -> bool:
    """Whether namespaces and veth pairs can be made here."""
    return os.geteuid() == 0


def unique_name(what: str = "t") -> str:
    """A fresh esa-<pid>-<tag>-<what> name owned by this process."""
    return f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-{what}"


def list_netns() -> list[str]:
    """Named namespaces (/var/run/netns)."""
    return sorted(netns.listnetns())


def create_netns(name: str) -> str:
    """Create a namespace with its loopback up; returns the name."""
    if not name.startswith(PREFIX):
        raise ValueError(f"test namespaces are named {PREFIX}...; got {name!r}")
    netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    return name


def remove_netns(name: str) -> bool:
    """Remove a namespace if it exists (its interfaces go with it); True if it was there."""
    if name not in netns.listnetns():
        return False
    with contextlib.suppress(OSError):
        netns.remove(name)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Remove esa- namespaces whose creating process is dead; returns their names."""
    removed = []
    for name in list_netns():
        match = _OWNED.match(name)
        if match and not _alive(int(match.group(1))) and remove_netns(name):
            removed.append(name)
    return removed


@contextlib.contextmanager
def temp_netns(what: str = "t") -> Iterator[str]:
    """A namespace for the block, removed afterwards even when the block fails."""
    name = create_netns(unique_name(what))
    try:
        yield name
    finally:
        remove_netns(name)


@contextlib.contextmanager
def inside(name: str) -> Iterator[None]:
    """Run the block with this thread in namespace `name`; sockets made there stay there."""
    netns.pushns(name)
    try:
        yield
    finally:
        netns.popns()


def netns_command(name: str, argv: list[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `name` (python -m hw_fixtures.netns_exec)."""
    return [sys.executable, "-m", "hw_fixtures.netns_exec", name, "--", *argv]


def run_in_netns(
    name: str, argv: list[str], timeout: float = 30.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace and wait for it (text output captured)."""
    return subprocess.run(
        netns_command(name, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def links(name: str) -> list[str]:
    """Interface names inside a namespace."""
    with IPRoute(netns=name) as ipr:
        return [str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()]


def link_info(name: str, ifname: str) -> dict[str, Any]:
    """State, carrier and IPv4 addresses of one interface inside a namespace."""
    with IPRoute(netns=name) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no {ifname} in {name}")
        link = ipr.get_links(found[0])[0]
        addrs = [
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=found[0], family=socket.AF_INET)
        ]
        return {
            "index": found[0],
            "state": link.get_attr("IFLA_OPERSTATE"),
            "carrier": link.get_attr("IFLA_CARRIER"),
            "addresses": addrs,
        }


def configure_interface(
    name: str, ifname: str, address: str, prefixlen: int, gateway: str | None = None
) -> None:
    """Put an address (and a default route via gateway) on an interface, as an agent would."""
    with IPRoute(netns=name) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        try:
            ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.link("set", index=index, state="up")
        if gateway is not None:
            ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=index)


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll predicate() until truthy; TimeoutError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def start_netns_emulator(agent_netns: str, *args: str) -> EmulatorHandle:
    """An emulator in netns mode whose modem interfaces land in agent_netns."""
    return start_emulator("--net", "netns", "--agent-netns", agent_netns, *args)


def cleanup_emulator(handle: EmulatorHandle) -> list[str]:
    """Stop an emulator and remove whatever namespaces it left (also after a SIGKILL)."""
    handle.stop()
    left = []
    for modem in handle.modems:
        name = modem.get("netns")
        if name and remove_netns(str(name)):
            left.append(str(name))
    return left
