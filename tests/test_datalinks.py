"""DataLinks without interfaces: the daemon's behaviour stays what it was before the data path
(no netlink, no data task, probes unbound), and which layer a modem serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.daemon.datalinks import DataLinks
from agent.daemon.supervisor import Supervisor

ICCIDS = ("8944500102030405067", "8931440000012345678", "8988247000001234567")


def config(tmp_path: Path, interface: str) -> Any:
    return parse_config(
        {
            "device_id": "dl",
            "state_dir": str(tmp_path),
            "modems": [
                {"id": "m0", "port": "/dev/null", "interface": interface},
                {"id": "m1", "port": "/dev/null", "interface": interface},
            ],
            "layers": [
                {"name": "primary", "modem": "m0", "profile": ICCIDS[0], "role": "primary"},
                {"name": "failover", "modem": "m1", "profile": ICCIDS[1], "role": "failover"},
                {"name": "emergency", "modem": "m1", "profile": ICCIDS[2], "role": "emergency"},
            ],
        }
    )


@dataclass
class FakeModem:
    channel: Any
    vendor: Any


@dataclass
class FakeSession:
    id: str
    online: bool
    port: str | None
    modem: FakeModem | None
    enabled_iccid: str | None


async def test_without_interfaces_no_netlink_no_data_task_and_probes_unbound(
    tmp_path: Path,
) -> None:
    for interface in ("none", "auto"):  # "auto" on a port sysfs does not know finds nothing
        supervisor = Supervisor()
        links = await DataLinks.open(config(tmp_path, interface), supervisor)
        try:
            assert links.datapath.routes is None
            session = FakeSession("m0", True, "/dev/pts/99", FakeModem(object(), object()), None)
            await links.follow(session)
            assert supervisor.records == {}
            assert links.interface("m0") is None
            assert links.binding("primary").bound is False
            status = links.layer_status("primary")
            assert (status["interface"], status["metric"], status["default"]) == (
                None,
                None,
                False,
            )

            async def check() -> bool:
                return True

            # Without a data task the switch's verify step is the plain check.
            assert links.switch_probe("m0", ICCIDS[0], check) is check
        finally:
            await links.close()


async def test_a_modem_serves_the_layer_whose_profile_is_enabled(tmp_path: Path) -> None:
    links = await DataLinks.open(config(tmp_path, "none"), Supervisor())
    try:

        def served(modem: str, iccid: str | None) -> str | None:
            layer = links.serving(modem, iccid)
            return layer.name if layer else None

        assert served("m1", ICCIDS[1]) == "failover"
        assert served("m1", ICCIDS[2]) == "emergency"
        # Profiles not read yet, or one no layer names: the modem's home layer, not emergency.
        assert served("m1", None) == "failover"
        assert served("m1", "8900000000000000000") == "failover"
        assert served("m0", None) == "primary"
    finally:
        await links.close()
