"""The check's verdicts from observations (pure): each failure names its fix."""

from __future__ import annotations

from typing import Any

import pytest

from agent.check.evaluate import (
    ModemSeen,
    ProbeSeen,
    emergency_item,
    failover_item,
    modems_item,
    primary_item,
    quotas_item,
)
from agent.check.observe import observe_status
from agent.config import Config, parse_config

HOME, ROAM, SOS = "8944500102030405067", "8931440000012345678", "8988247000001234567"


def config(**usage: Any) -> Config:
    data: dict[str, Any] = {
        "device_id": "d",
        "state_dir": "/tmp/esa-check",
        "modems": [{"id": "m0", "port": "/dev/ttyUSB2"}, {"id": "m1", "port": "/dev/ttyUSB5"}],
        "layers": [
            {"name": "home", "modem": "m0", "profile": HOME, "role": "primary"},
            {"name": "roam", "modem": "m1", "profile": ROAM, "role": "failover"},
            {"name": "sos", "modem": "m1", "profile": SOS, "role": "emergency"},
        ],
    }
    if usage:
        data["usage"] = usage
    return parse_config(data, "<config>")


def healthy() -> dict[str, ModemSeen]:
    return {
        "m0": ModemSeen(
            id="m0",
            port="/dev/ttyUSB2",
            sim_state="ready",
            eid="89049",
            profiles={HOME: "enabled"},
            registration="home",
        ),
        "m1": ModemSeen(
            id="m1",
            port="/dev/ttyUSB5",
            sim_state="ready",
            eid="89050",
            profiles={ROAM: "enabled", SOS: "disabled"},
            registration="roaming",
        ),
    }


PASSING = {"home": ProbeSeen(passing=True, detail="http ok")}


def test_everything_in_order_passes() -> None:
    cfg, seen = config(quotas=dict.fromkeys((HOME, ROAM, SOS), "1 GB")), healthy()
    verdicts = [
        modems_item(cfg, seen),
        primary_item(cfg, seen, PASSING),
        failover_item(cfg, seen),
        emergency_item(cfg, seen),
        quotas_item(cfg),
    ]
    assert [v.status for v in verdicts] == ["pass"] * 5
    assert all(v.fix is None for v in verdicts)


@pytest.mark.parametrize(
    ("change", "detail", "fix"),
    [
        ({"profiles": {HOME: "disabled"}}, "is disabled on m0", f"profile enable {HOME}"),
        ({"profiles": {}}, "is not installed on m0", "install the primary profile"),
        ({"registration": "searching"}, "searching", "coverage"),
    ],
)
def test_primary_failures(change: dict[str, Any], detail: str, fix: str) -> None:
    seen = healthy()
    for key, value in change.items():
        setattr(seen["m0"], key, value)
    verdict = primary_item(config(), seen, PASSING)
    assert verdict.status == "fail"
    assert detail in verdict.detail
    assert fix in (verdict.fix or "")


def test_primary_probes_failing_and_unknown() -> None:
    failing = primary_item(
        config(), healthy(), {"home": ProbeSeen(passing=False, detail="dns: timeout")}
    )
    assert failing.status == "fail"
    assert "dns: timeout" in failing.detail
    unknown = primary_item(config(), healthy(), {})
    assert unknown.status == "pass"
    assert "no probes configured" in unknown.detail


def test_unreadable_modem_fails_modems_and_skips_what_depends_on_it() -> None:
    seen = healthy()
    seen["m0"] = ModemSeen(id="m0", port="/dev/ttyUSB2", error="no such file or directory")
    assert modems_item(config(), seen).status == "fail"
    assert primary_item(config(), seen, PASSING).status == "skip"
    seen = healthy()
    seen["m1"].euicc_error = "ApduError 6A82"
    verdict = modems_item(config(), seen)
    assert verdict.status == "fail"
    assert "isdr_aid" in (verdict.fix or "")
    assert failover_item(config(), seen).status == "fail"


def test_failover_missing_and_emergency_enabled() -> None:
    seen = healthy()
    seen["m1"].profiles = {SOS: "enabled"}
    failover = failover_item(config(), seen)
    assert failover.status == "fail"
    assert f"profile {ROAM} is not installed on m1" in failover.detail
    emergency = emergency_item(config(), seen)
    assert emergency.status == "fail"
    assert "enabled, not dormant" in emergency.detail


def test_quotas_count_pools() -> None:
    pooled = config(
        quotas={HOME: "5 GB"},
        pools=[{"name": "eu", "members": [ROAM, SOS], "quota_bytes": "20 GB"}],
    )
    assert quotas_item(pooled).status == "pass"
    missing = quotas_item(config(quotas={HOME: "5 GB"}))
    assert missing.status == "fail"
    assert ROAM in missing.detail
    assert f'"{ROAM}" = "10 GB"' in (missing.fix or "")


def test_daemon_status_maps_to_the_same_observations() -> None:
    status = {
        "device_id": "d",
        "layers": [
            {"name": "home", "health": "up", "reason": "probes_ok"},
            {"name": "roam", "health": "down", "reason": "no_data"},
        ],
        "modems": [
            {
                "id": "m0",
                "port": "/dev/ttyUSB2",
                "online": True,
                "eid": "89049",
                "info": {"sim": {"state": "ready"}, "registration": {"state": "home"}},
                "profiles": [{"iccid": HOME, "state": "enabled"}],
            },
            {"id": "m1", "port": "/dev/ttyUSB5", "online": False, "last_error": "port closed"},
        ],
    }
    seen, probes = observe_status(config(), status)
    assert seen["m0"].profiles == {HOME: "enabled"}
    assert seen["m0"].registration == "home"
    assert seen["m1"].error == "offline (port closed)"
    assert probes["home"].passing is True
    assert probes["roam"].passing is False
    assert primary_item(config(), seen, probes).status == "pass"
    assert modems_item(config(), seen).status == "fail"
