"""The daemon sends every pending eUICC notification to its SM-DP+ on its own.

The real daemon process, the emulator (two modems, eUICCs with the test PKI, so notifications
are signed), the test SM-DP+ over HTTPS with that PKI, and a real Mosquitto for the events.
Everything waits on conditions: MQTT events, the SM-DP+'s records, the daemon's status.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.control import control_call
from agent.demo.stack import DEMO_ICCIDS, DEMO_SCENARIO, DemoStack, mosquitto_available
from agent.euicc.lpa import Lpa
from agent.euicc.transport import AtApduTransport
from agent.modem.driver import open_modem
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS
SPARE = "8988247000009999990"  # on m1, owned by no layer: the profile commands may change it
STEP_S = 60.0

StackFactory = Callable[..., Awaitable[DemoStack]]


async def until(check: Callable[[], Awaitable[bool]], timeout: float = STEP_S) -> None:
    """Wait for a condition on another process's state, with a deadline."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in other processes
            await asyncio.sleep(0.1)


def scenario(tmp_path: Path, address: str, spare_address: str | None = None) -> Path:
    """The demo's two modems, every profile's notifications addressed to the test SM-DP+, and
    a spare profile on the dongle (its notifications to spare_address when given)."""
    lines = []
    for line in DEMO_SCENARIO.read_text().splitlines():
        lines.append(line)
        if line.startswith("mcc_mnc"):
            lines.append(f'notification_address = "{address}"')
    lines += [
        "",
        "[[modem.profiles]]",
        f'iccid = "{SPARE}"',
        'name = "Spare"',
        'provider = "Spare Telecom"',
        'operator_name = "Spare Telecom"',
        'mcc_mnc = "20810"',
        f'notification_address = "{spare_address or address}"',
    ]
    path = tmp_path / "scenario.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
async def smdp(test_pki: TestPki) -> AsyncIterator[SmdpServer]:
    server = SmdpServer(SmdpCore(pki=test_pki, address=test_pki.smdp_host))
    await server.start()
    server.core.address = f"{test_pki.smdp_host}:{server.port}"
    yield server
    await server.stop()


@pytest.fixture
async def make_stack(
    tmp_path: Path, test_pki: TestPki, smdp: SmdpServer, request: pytest.FixtureRequest
) -> AsyncIterator[StackFactory]:
    stacks: list[DemoStack] = []
    assert test_pki.directory is not None
    pki_dir = test_pki.directory

    async def make(
        retry_initial: float = 1.0, retry_max: float = 2.0, spare_smdp: SmdpServer | None = None
    ) -> DemoStack:
        address = smdp.core.address

        def tune(cfg: dict[str, Any]) -> None:
            cfg["rsp"] = {
                "ci_certs": [str(pki_dir / "ci.pem")],
                "resolve": [f"{address}:127.0.0.1"]
                + ([f"{spare_smdp.core.address}:127.0.0.1"] if spare_smdp else []),
                "notification_retry_initial": retry_initial,
                "notification_retry_max": retry_max,
            }

        stack = DemoStack(
            tmp_path / f"stack{len(stacks)}",
            broker="mosquitto",
            scenario=scenario(tmp_path, address, spare_smdp.core.address if spare_smdp else None),
            emulator_args=("--pki", str(pki_dir)),
            tune=tune,
        )
        stacks.append(stack)
        await stack.start()
        await stack.wait_json("state", lambda s: s.get("active_layer") == "primary", STEP_S)
        return stack

    yield make
    for stack in stacks:
        await stack.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for stack in stacks:
            lines = stack.daemon_log.read_text(errors="replace").splitlines()
            interesting = [
                line
                for line in lines
                if '"level": "debug"' not in line and "probe_result" not in line
            ]
            sys.stderr.write(f"--- {stack.daemon_log} (last 80 of {len(lines)})\n")
            sys.stderr.write("\n".join(interesting[-80:]) + "\n")


async def daemon(stack: DemoStack, cmd: str, **args: Any) -> Any:
    return await control_call(stack.socket, cmd, args, timeout=STEP_S)


async def on_card(stack: DemoStack, modem: str = "m1") -> list[tuple[int, str]]:
    """(seq, operation) of each notification on a modem's eUICC, as the daemon reads it."""
    result = await daemon(stack, "notification_list", modem=modem)
    return [(n["seq_number"], n["profile_management_operation"]) for n in result["notifications"]]


def received(smdp: SmdpServer) -> list[tuple[str | None, str | None]]:
    """(operation, iccid) of each notification the SM-DP+ accepted, in order."""
    return [(n.get("operation"), n.get("iccid")) for n in smdp.core.notifications]


async def event(stack: DemoStack, kind: str, since: int, **match: Any) -> dict[str, Any]:
    """The first `kind` event after mark `since` whose data has the given values."""
    found = await stack.wait_json(
        "events",
        lambda e: e.get("type") == kind and all(e["data"].get(k) == v for k, v in match.items()),
        STEP_S,
        since,
    )
    data: dict[str, Any] = found["data"]
    return data


async def test_enable_disable_delete_are_delivered_and_removed(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack()
    mark = stack.mark()
    report = await daemon(stack, "profile_enable", modem="m1", iccid=SPARE, force=True)
    assert report["outcome"] == "switched"
    await daemon(stack, "profile_disable", modem="m1", iccid=SPARE)
    await daemon(stack, "profile_delete", modem="m1", iccid=SPARE)
    report = await daemon(stack, "profile_enable", modem="m1", iccid=ROAM, force=True)
    assert report["outcome"] == "switched"

    expected = [
        ("disable", ROAM),
        ("enable", SPARE),
        ("disable", SPARE),
        ("delete", SPARE),
        ("enable", ROAM),
    ]

    async def all_delivered() -> bool:
        return received(smdp) == expected and await on_card(stack) == []

    await until(all_delivered)
    assert all(n["verified"] for n in smdp.core.notifications), "signed by the test eUICC"
    deleted = await event(stack, "notification_sent", mark, operation="delete")
    assert (deleted["modem"], deleted["iccid"], deleted["removed"]) == ("m1", SPARE, True)
    assert "error" not in deleted
    assert deleted["address"] == smdp.core.address
    assert deleted["layer"] == "primary", "sent over the working layer"
    status = await daemon(stack, "status")
    assert status["notifications"]["enabled"] is True
    assert status["notifications"]["modems"]["m1"]["pending"] == 0
    assert status["notifications"]["sent"] == len(expected)


async def test_unreachable_smdp_keeps_them_until_the_next_good_link(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    # A long backoff: only a new working link can bring the retry forward.
    stack = await make_stack(retry_initial=600.0, retry_max=3600.0)
    port = smdp.port
    await smdp.stop()
    mark = stack.mark()
    await daemon(stack, "profile_delete", modem="m1", iccid=SPARE)
    failed = await event(stack, "notification_failed", mark, operation="delete")
    assert "cannot connect" in failed["error"]
    assert failed["next_retry_s"] > 60
    assert (await on_card(stack))[-1][1] == "delete", "an unsent delete stays on the card"
    status = await daemon(stack, "status")
    assert status["notifications"]["pending"] == 1
    assert status["notifications"]["next_retry_s"] > 60

    # The SM-DP+ is back; then the primary link drops and the failover layer takes over.
    smdp.port = port
    await smdp.start()
    mark = stack.mark()
    await stack.control("link", modem="m0", state="down")
    await stack.wait_transition(lambda d: d["to_layer"] == "failover", STEP_S, mark)
    sent = await event(stack, "notification_sent", mark, operation="delete")
    assert (sent["iccid"], sent["removed"], sent["layer"]) == (SPARE, True, "failover")
    assert received(smdp) == [("delete", SPARE)]
    assert await on_card(stack) == []


async def test_a_refused_notification_is_not_removed(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack(retry_initial=1.0, retry_max=2.0)
    smdp.core.refuse_notifications = ("8.1", "6.1")
    mark = stack.mark()
    await daemon(stack, "profile_delete", modem="m1", iccid=SPARE)
    failed = await event(stack, "notification_failed", mark, operation="delete")
    assert "subject 8.1, reason 6.1" in failed["error"]
    # Refused again on each retry, and never removed meanwhile.
    await until(lambda: _at_least(smdp.core.refused, 2))
    assert [op for _seq, op in await on_card(stack)] == ["delete"]
    assert smdp.core.notifications == []

    mark = stack.mark()
    smdp.core.refuse_notifications = None
    sent = await event(stack, "notification_sent", mark, operation="delete")
    assert sent["removed"] is True
    assert received(smdp) == [("delete", SPARE)]
    assert await on_card(stack) == []


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_a_delete_notification_survives_sigkill_and_restart(
    make_stack: StackFactory, smdp: SmdpServer, tmp_path: Path
) -> None:
    stack = await make_stack(retry_initial=600.0, retry_max=3600.0)
    smdp.core.refuse_notifications = ("8.1", "6.1")  # the SM-DP+ has a bad day
    mark = stack.mark()
    await daemon(stack, "profile_delete", modem="m1", iccid=SPARE)
    await event(stack, "notification_failed", mark, operation="delete")
    await stack.stop_daemon(signal.SIGKILL)

    # The daemon is gone, the emulator still runs: the card keeps the delete notification.
    assert stack.emulator is not None
    port = stack.emulator.info["modems"][1]["port"]
    async with open_modem(port) as modem:
        lpa = Lpa(AtApduTransport(modem.channel, modem.port, state_dir=tmp_path))
        async with lpa:
            left = await lpa.list_notifications()
    assert [(n.profile_management_operation, n.iccid) for n in left] == [("delete", SPARE)]

    smdp.core.refuse_notifications = None
    mark = stack.mark()
    stack.start_daemon()
    sent = await event(stack, "notification_sent", mark, operation="delete")
    assert (sent["iccid"], sent["removed"]) == (SPARE, True)
    assert received(smdp) == [("delete", SPARE)]
    assert await on_card(stack) == []


async def test_a_slow_smdp_holds_back_no_other(
    make_stack: StackFactory, smdp: SmdpServer, test_pki: TestPki
) -> None:
    slow = SmdpServer(SmdpCore(pki=test_pki, address=test_pki.smdp_host))
    await slow.start()
    try:
        slow.core.address = f"{test_pki.smdp_host}:{slow.port}"
        slow.core.delays["handleNotification"] = 600.0  # answers long after the test is over
        stack = await make_stack(spare_smdp=slow)
        mark = stack.mark()
        # Disables ROAM (its SM-DP+ answers) and enables SPARE (its SM-DP+ hangs).
        report = await daemon(stack, "profile_enable", modem="m1", iccid=SPARE, force=True)
        assert report["outcome"] == "switched"
        sent = await event(stack, "notification_sent", mark, operation="disable")
        assert (sent["iccid"], sent["removed"]) == (ROAM, True)
        assert received(smdp) == [("disable", ROAM)]
        assert [op for _seq, op in await on_card(stack)] == ["enable"]
        assert slow.core.called["handleNotification"].is_set(), "tried, and still waiting"
    finally:
        await slow.stop()


def test_notifications_need_ci_roots(tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError

    base = {"device_id": "d1", "state_dir": str(tmp_path)}
    assert parse_config(base).rsp.notifications_on is False, "off without CI roots"
    with pytest.raises(ConfigError, match=r"rsp\.notifications"):
        parse_config({**base, "rsp": {"notifications": True}})
    (tmp_path / "ci.pem").write_text("")
    on = parse_config({**base, "rsp": {"ci_certs": [str(tmp_path / "ci.pem")]}})
    assert on.rsp.notifications_on is True, "on by default with CI roots"
    off = {"ci_certs": [str(tmp_path / "ci.pem")], "notifications": False}
    assert parse_config({**base, "rsp": off}).rsp.notifications_on is False
    with pytest.raises(ConfigError, match="notification_retry_max"):
        parse_config(
            {**base, "rsp": {"notification_retry_initial": 60, "notification_retry_max": 5}}
        )


async def test_notification_process_by_hand_goes_through_the_daemon(
    make_stack: StackFactory, smdp: SmdpServer, tmp_path: Path
) -> None:
    stack = await make_stack(retry_initial=600.0, retry_max=3600.0)
    port = smdp.port
    await smdp.stop()
    mark = stack.mark()
    await daemon(stack, "profile_delete", modem="m1", iccid=SPARE)
    await event(stack, "notification_failed", mark, operation="delete")
    smdp.port = port
    await smdp.start()
    assert stack.config is not None
    m1_port = stack.config.modems[1].port
    assert m1_port is not None
    shown = await cli(tmp_path, "status", "--socket", stack.socket)
    assert "notifications: 1 pending, next retry in" in shown
    out = await cli(
        tmp_path, "notification", "process", "--all", "--port", m1_port, "--socket", stack.socket
    )
    result = json.loads(await cli(tmp_path, "status", "--json", "--socket", stack.socket))
    assert result["notifications"]["pending"] == 0, out
    assert received(smdp) == [("delete", SPARE)]
    assert await on_card(stack) == []
    processed = json.loads(
        await cli(
            tmp_path,
            "notification",
            "process",
            "--all",
            "--port",
            m1_port,
            "--socket",
            stack.socket,
            "--json",
        )
    )
    assert processed == {"notifications": []}, "nothing left to send"


async def cli(tmp_path: Path, *args: str) -> str:
    """`esim-agent ARGS` in a subprocess; its stdout (exit status 0 asserted)."""
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"XDG_RUNTIME_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), STEP_S)
    assert proc.returncode == 0, (args, out.decode(), err.decode())
    return out.decode()


async def test_the_policys_own_switches_are_delivered(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack()
    # The emergency layer wakes (the dongle switches to its dormant profile), then sleeps again.
    result = await daemon(stack, "switch_layer", layer="emergency")
    assert result["transition"]["outcome"] == "switched"
    mark = stack.mark()
    await daemon(stack, "switch_layer", layer=None)
    await stack.wait_json("events", lambda e: e.get("type") == "emergency_disabled", STEP_S, mark)
    expected = [
        ("disable", ROAM),
        ("enable", EMERGENCY),
        ("disable", EMERGENCY),
        ("enable", ROAM),
    ]

    async def all_delivered() -> bool:
        return received(smdp) == expected and await on_card(stack) == []

    await until(all_delivered)


async def test_an_install_notification_left_by_a_download_is_delivered(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack(retry_initial=1.0, retry_max=2.0)
    new = "8988247000007777770"
    smdp.core.offer(Offer(matching_id="TRIP-9", iccid=new, name="Trip"))
    smdp.core.refuse_notifications = ("8.1", "6.1")  # the download's own try is refused
    mark = stack.mark()
    result = await daemon(
        stack, "profile_download", modem="m1", code=f"LPA:1${smdp.core.address}$TRIP-9"
    )
    assert (result["iccid"], result["notification_sent"]) == (new, False)
    failed = await event(stack, "notification_failed", mark, operation="install")
    assert failed["iccid"] == new
    assert [op for _seq, op in await on_card(stack)] == ["install"]

    smdp.core.refuse_notifications = None
    sent = await event(stack, "notification_sent", mark, operation="install")
    assert (sent["iccid"], sent["removed"]) == (new, True)
    installs = [n for n in smdp.core.notifications if n.get("kind") == "install"]
    assert [(n["success"], n["verified"]) for n in installs] == [(True, True)]
    assert smdp.core.offers["TRIP-9"].state == "installed"
    assert await on_card(stack) == []
