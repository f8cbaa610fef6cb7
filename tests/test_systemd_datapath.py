"""The shipped unit grants the data path what it needs (docs/systemd.md) and no more."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "esim-agent.service"
MAX_EXPOSURE = 2.0


def service_settings() -> dict[str, list[str]]:
    """[Service] key -> every value in order (systemd keys repeat; configparser cannot)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def words(service: dict[str, list[str]], key: str) -> set[str]:
    """The space-separated items of every line of `key` (the last empty assignment resets)."""
    items: set[str] = set()
    for value in service.get(key, []):
        items = set() if not value else items | set(value.split())
    return items


def test_net_admin_and_net_raw_are_ambient_and_nothing_else() -> None:
    service = service_settings()
    wanted = {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert words(service, "AmbientCapabilities") == wanted
    assert words(service, "CapabilityBoundingSet") == wanted
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["User"] == ["esim-agent"]


def test_netlink_and_packet_sockets_are_allowed() -> None:
    families = words(service_settings(), "RestrictAddressFamilies")
    assert {"AF_NETLINK", "AF_PACKET", "AF_INET", "AF_INET6", "AF_UNIX"} == families


def test_each_added_permission_is_explained() -> None:
    doc = (ROOT / "docs" / "systemd.md").read_text()
    for item in ("CAP_NET_ADMIN", "CAP_NET_RAW", "AF_PACKET", "AF_NETLINK"):
        assert re.search(rf"^\| `[^`]*{item}[^`]*`", doc, re.MULTILINE), item


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_exposure_stays_at_most_two() -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    assert found is not None, done.stdout + done.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE
