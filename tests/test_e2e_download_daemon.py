"""Profile download through the daemon: the real daemon process, the emulator with the test PKI,
the test SM-DP+ over HTTPS, a real Mosquitto. Through the control socket (the CLI's `--socket`
form), through MQTT (token, allow-list, progress events), only on a working layer, cancelled on
both sides when the link drops, and store and forward of a layer's missing profile."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.daemon.control import ControlError, control_call
from agent.demo.mosquitto import Watcher
from agent.demo.stack import DEMO_ICCIDS, DEMO_SCENARIO, DemoStack, mosquitto_available
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto (apt install mosquitto)"),
]

PRIMARY, ROAM, EMERGENCY = DEMO_ICCIDS
NEW = "8988247000009876543"
STEP_S = 60.0
CLI_TIMEOUT_S = 120.0

StackFactory = Callable[..., Awaitable[DemoStack]]


@pytest.fixture
async def smdp(test_pki: TestPki) -> AsyncIterator[SmdpServer]:
    server = SmdpServer(SmdpCore(pki=test_pki, address=test_pki.smdp_host))
    await server.start()
    server.core.address = f"{test_pki.smdp_host}:{server.port}"
    server.core.offer(Offer(matching_id="TRIP-1", iccid=NEW, name="Travel", provider="RoamCo"))
    yield server
    await server.stop()


def code_for(smdp: SmdpServer, matching_id: str = "TRIP-1") -> str:
    return f"LPA:1${smdp.core.address}${matching_id}"


@pytest.fixture
async def make_stack(
    tmp_path: Path, test_pki: TestPki, smdp: SmdpServer, request: pytest.FixtureRequest
) -> AsyncIterator[StackFactory]:
    """A DemoStack whose emulated eUICCs can download (test PKI) and whose daemon trusts the
    test CI and reaches the test SM-DP+ on loopback ([rsp])."""
    stacks: list[DemoStack] = []
    assert test_pki.directory is not None

    async def make(
        tune: Callable[[dict[str, Any]], None] | None = None,
        scenario: Path = DEMO_SCENARIO,
        wait_primary: bool = True,
        iccids: tuple[str, ...] = DEMO_ICCIDS,
    ) -> DemoStack:
        def configure(cfg: dict[str, Any]) -> None:
            assert test_pki.directory is not None
            cfg["rsp"] = {
                "ci_certs": [str(test_pki.directory / "ci.pem")],
                "resolve": [f"{smdp.core.address}:127.0.0.1"],
            }
            if tune is not None:
                tune(cfg)

        stack = DemoStack(
            tmp_path / f"stack{len(stacks)}",
            broker="mosquitto",
            scenario=scenario,
            iccids=iccids,
            emulator_args=("--pki", str(test_pki.directory)),
            tune=configure,
        )
        stacks.append(stack)
        await stack.start()
        if wait_primary:
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
                x for x in lines if '"level": "debug"' not in x and "probe_result" not in x
            ]
            sys.stderr.write(f"--- {stack.daemon_log} (last 80 of {len(lines)})\n")
            sys.stderr.write("\n".join(interesting[-80:]) + "\n")


async def daemon(stack: DemoStack, cmd: str, **args: Any) -> Any:
    return await control_call(stack.socket, cmd, args, timeout=STEP_S)


async def card(stack: DemoStack, modem: str = "m1") -> tuple[list[str], list[str | None]]:
    """(ICCIDs on the modem's card, operations of its pending notifications), via the daemon."""
    profiles = await daemon(stack, "profile_list", modem=modem)
    notes = await daemon(stack, "notification_list", modem=modem)
    return (
        [p["iccid"] for p in profiles["profiles"]],
        [n["profile_management_operation"] for n in notes["notifications"]],
    )


async def cli(*args: str, env_dir: Path) -> tuple[int, dict[str, Any], str]:
    status, out, err = await cli_text(*args, env_dir=env_dir)
    return status, json.loads(out or "{}"), err


async def cli_text(*args: str, env_dir: Path) -> tuple[int, str, str]:
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"XDG_RUNTIME_DIR": str(env_dir), "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Caller:
    """Another device sending MQTT v5 requests with a response topic and correlation data."""

    def __init__(self, stack: DemoStack) -> None:
        self.stack = stack
        self.reply = f"replies/{uuid.uuid4().hex[:8]}"

    async def request(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        assert self.stack.address is not None
        corr = uuid.uuid4().bytes
        fallback = f"{self.stack.topic}/cmd/+/response"
        async with (
            Watcher(self.stack.address, self.reply, fallback) as w,
            aiomqtt.Client(
                self.stack.address.host,
                self.stack.address.port,
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client,
        ):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = self.reply
            props.CorrelationData = corr
            await client.publish(
                f"{self.stack.topic}/cmd/{name}", json.dumps(body).encode(), qos=1, properties=props
            )
            index = 0
            async with asyncio.timeout(CLI_TIMEOUT_S):
                while True:
                    _, raw, _, p = await w.message_at(index)
                    index += 1
                    if getattr(p, "CorrelationData", None) == corr:
                        found: dict[str, Any] = json.loads(raw)
                        return found


def events(stack: DemoStack, type_: str, since: int = 0) -> list[dict[str, Any]]:
    assert stack.watcher is not None
    out = []
    for topic, payload, _, _ in stack.watcher.messages[since:]:
        if topic == f"{stack.topic}/events":
            event = json.loads(payload)
            if event.get("type") == type_:
                out.append(event["data"])
    return out


def layer(status: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(x for x in status["layers"] if x["name"] == name)
    return found


# ---- on request ---------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["generic", "sierra", "fibocom", "simcom", "quectel", "dell"])
async def test_download_through_the_socket(
    vendor: str, make_stack: StackFactory, smdp: SmdpServer, tmp_path: Path
) -> None:
    # The downloading modem (m1) takes each vendor personality in turn; m0 carries the link.
    text = DEMO_SCENARIO.read_text()
    assert 'vendor = "sierra"' in text
    scenario = tmp_path / f"demo-{vendor}.toml"
    scenario.write_text(text.replace('vendor = "sierra"', f'vendor = "{vendor}"', 1))
    stack = await make_stack(scenario=scenario)
    info = await daemon(stack, "modem_info", modem="m1")
    assert vendor in info["identity"]["manufacturer"].lower(), info["identity"]
    status, result, err = await cli(
        "profile",
        "download",
        "--socket",
        stack.socket,
        "--modem",
        "m1",
        "--code",
        code_for(smdp),
        "--json",
        env_dir=tmp_path,
    )
    assert status == 0, err
    assert (result["iccid"], result["modem"], result["layer"]) == (NEW, "m1", "primary")
    assert (result["profile_name"], result["service_provider_name"]) == ("Travel", "RoamCo")
    assert result["state"] == "disabled"
    assert result["notification_sent"] is True
    iccids, pending = await card(stack)
    assert iccids == [ROAM, EMERGENCY, NEW]
    assert pending == []
    assert smdp.core.offers["TRIP-1"].state == "installed"
    # The daemon's own view and MQTT follow.
    await stack.wait_json(
        "profiles/m1", lambda p: NEW in [x["iccid"] for x in p["profiles"]], STEP_S
    )
    # The matching ID is a bearer token: the daemon's log shows it masked.
    assert "TRIP-1" not in stack.daemon_log.read_text(errors="replace")


async def test_progress_lines_over_the_socket(make_stack: StackFactory, smdp: SmdpServer) -> None:
    stack = await make_stack()
    smdp.core.offers["TRIP-1"].size = 60_000
    seen: list[dict[str, Any]] = []
    result = await control_call(
        stack.socket,
        "profile_download",
        {"code": code_for(smdp), "modem": "m1"},
        timeout=STEP_S,
        on_progress=seen.append,  # type: ignore[arg-type]
    )
    assert isinstance(result, dict)
    assert result["iccid"] == NEW
    phases = [p["phase"] for p in seen]
    assert phases[0] == "authenticate"
    assert {"prepare", "download", "install", "notify", "done"} <= set(phases)
    install = [p for p in seen if p["phase"] == "install"]
    assert install[-1]["bytes"] == install[-1]["total"] == result["bpp_bytes"]


async def test_download_over_mqtt_with_progress_events(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack()
    caller = Caller(stack)
    body = {"modem": "m1", "code": code_for(smdp), "request_id": "dl-42"}
    denied = await caller.request("profile_download", body)
    assert denied["error"]["code"] == "unauthorized", "a token is required"
    assert smdp.core.calls == []

    mark = stack.mark()
    answer = await caller.request("profile_download", {**body, "token": stack.command_token})
    assert answer["ok"] is True, answer
    assert answer["request_id"] == "dl-42"
    assert answer["result"]["iccid"] == NEW
    # Events and the response travel separately: wait for the last event to arrive.
    await stack.wait_json(
        "events",
        lambda e: e.get("type") == "download_progress" and e["data"]["phase"] == "done",
        STEP_S,
        mark,
    )
    progress = events(stack, "download_progress", mark)
    assert progress, "no download_progress event"
    assert {p["request_id"] for p in progress} == {"dl-42"}
    assert next(p["phase"] for p in progress) == "authenticate"
    assert progress[-1]["phase"] == "done"
    assert all(set(p) >= {"phase", "bytes", "total", "modem"} for p in progress)
    # Throttled: a phase change, or 10 % of the package / 1 s, never one per segment.
    install = [p for p in progress if p["phase"] == "install"]
    assert len(install) <= 12
    assert await card(stack) == ([ROAM, EMERGENCY, NEW], [])
    assert "TRIP-1" not in stack.daemon_log.read_text(errors="replace"), "the code was logged"


async def test_mqtt_download_is_off_unless_allowed(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    def only_status(cfg: dict[str, Any]) -> None:
        cfg["mqtt"]["commands"]["allowed"] = ["status", "switch_layer"]

    stack = await make_stack(tune=only_status)
    answer = await Caller(stack).request(
        "profile_download", {"modem": "m1", "code": code_for(smdp), "token": stack.command_token}
    )
    assert answer["ok"] is False
    assert answer["error"]["code"] == "command_not_allowed"
    assert smdp.core.calls == []


async def test_refused_without_a_working_layer(make_stack: StackFactory, smdp: SmdpServer) -> None:
    stack = await make_stack()
    mark = stack.mark()
    # Every layer's link dies: nothing can carry ES9+ traffic.
    await stack.control("link", modem="m0", state="down")
    await stack.control("link", modem="m1", state="down")
    await stack.wait_json(
        "layers",
        lambda s: all(x.get("health") not in ("up", "degraded") for x in s["layers"]),
        STEP_S,
        mark,
    )
    with pytest.raises(ControlError) as refused:
        await daemon(stack, "profile_download", code=code_for(smdp), modem="m1")
    assert refused.value.message.startswith("no_working_link: ")
    assert smdp.core.calls == [], "nothing may reach the SM-DP+"
    assert (await card(stack))[0] == [ROAM, EMERGENCY]


async def test_link_drop_cancels_on_both_sides(make_stack: StackFactory, smdp: SmdpServer) -> None:
    stack = await make_stack()
    # The package takes long to come: the card holds its session meanwhile.
    smdp.core.delays["getBoundProfilePackage"] = 45.0
    called = smdp.core.called.setdefault("getBoundProfilePackage", asyncio.Event())
    download = asyncio.create_task(
        daemon(stack, "profile_download", code=code_for(smdp), modem="m1")
    )
    async with asyncio.timeout(STEP_S):
        await called.wait()
    await stack.control("link", modem="m0", state="down")  # the primary, carrying the download
    with pytest.raises(ControlError) as lost:
        await download
    assert lost.value.message.startswith("link_lost: "), lost.value.message
    assert "session cancelled on the eUICC and the SM-DP+" in lost.value.message
    assert len(smdp.core.cancelled) == 1, "the SM-DP+ saw cancelSession"
    iccids, pending = await card(stack)
    assert iccids == [ROAM, EMERGENCY], "a half-installed profile was left"
    assert pending == []
    assert smdp.core.offers["TRIP-1"].state != "installed"


async def test_smdp_failures_through_the_daemon_leave_the_card_clean(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack()
    cases = {
        "WRONG-CC": (
            Offer(matching_id="WRONG-CC", iccid="8988247000001111111", confirmation_code="2468"),
            "subject 8.2.7, reason 3.8",
        ),
        "EXPIRED": (
            Offer(matching_id="EXPIRED", iccid="8988247000002222222", expired=True),
            "subject 8.8.5, reason 4.10",
        ),
        "USED": (
            Offer(matching_id="USED", iccid="8988247000003333333", state="downloaded"),
            "already downloaded",
        ),
        "BROKEN": (
            Offer(matching_id="BROKEN", iccid="8988247000004444444", server_error=True),
            "HTTP 500",
        ),
    }
    for matching_id, (offer, expected) in cases.items():
        smdp.core.offer(offer)
        cancelled_before = len(smdp.core.cancelled)
        args: dict[str, Any] = {"code": code_for(smdp, matching_id), "modem": "m1"}
        if offer.confirmation_code:
            args["confirmation_code"] = "1357"
        with pytest.raises(ControlError) as failed:
            await daemon(stack, "profile_download", **args)
        assert expected in failed.value.message, (matching_id, failed.value.message)
        iccids, pending = await card(stack)
        assert iccids == [ROAM, EMERGENCY], f"{matching_id} left a profile behind"
        assert pending == []
        if matching_id == "WRONG-CC":
            # The card held a session: cancelled on the card and on the SM-DP+.
            assert len(smdp.core.cancelled) == cancelled_before + 1
    # Still usable afterwards: the daemon kept running and downloads the good one.
    ok = await daemon(stack, "profile_download", code=code_for(smdp), modem="m1")
    assert ok["iccid"] == NEW


# ---- store and forward ----------------------------------------------------------------------


def scenario_without_emergency(tmp_path: Path) -> Path:
    """The demo scenario with m1's emergency profile not bought yet."""
    text = DEMO_SCENARIO.read_text()
    head, _, _ = text.partition(f'[[modem.profiles]]\niccid = "{EMERGENCY}"')
    path = tmp_path / "no-emergency.toml"
    path.write_text(head)
    return path


async def test_store_and_forward_downloads_the_missing_emergency_profile(
    make_stack: StackFactory, smdp: SmdpServer, tmp_path: Path
) -> None:
    offer = smdp.core.offer(
        Offer(matching_id="EMERG-7", iccid=EMERGENCY, name="Emergency", provider="Backup")
    )
    offer.server_error = True  # the first attempt fails: status and check say why
    code_file = tmp_path / "emergency.code"
    code_file.write_text(code_for(smdp, "EMERG-7") + "\n")
    code_file.chmod(0o600)

    def with_code(cfg: dict[str, Any]) -> None:
        cfg["layers"][-1]["activation_code_file"] = str(code_file)

    stack = await make_stack(tune=with_code, scenario=scenario_without_emergency(tmp_path))

    async def emergency_state() -> dict[str, Any]:
        return layer(await daemon(stack, "status"), "emergency")

    async with asyncio.timeout(STEP_S):
        while "download failed" not in (await emergency_state())["profile_reason"]:  # noqa: ASYNC110 - the state lives in another process
            await asyncio.sleep(0.2)
    before = await emergency_state()
    assert before["profile_state"] == "missing"
    assert "HTTP 500" in before["profile_reason"]
    assert "EMERG-7" not in json.dumps(before)
    assert stack.config_path.exists()
    status, report, _err = await cli(
        "check",
        "--config",
        str(stack.config_path),
        "--socket",
        stack.socket,
        "--json",
        env_dir=tmp_path,
    )
    _, text, _ = await cli_text("status", "--socket", stack.socket, env_dir=tmp_path)
    assert f"{EMERGENCY} (missing: download failed" in text
    downloads = next(i for i in report["items"] if i["id"] == "downloads")
    assert downloads["status"] == "fail"
    assert "missing" in downloads["detail"]
    assert "HTTP 500" in downloads["detail"]
    assert status != 0

    mark = stack.mark()
    offer.server_error = False  # the retry (on the backoff) succeeds
    installed = await stack.wait_json(
        "events", lambda e: e.get("type") == "layer_profile_installed", STEP_S, mark
    )
    assert installed["data"] == {"layer": "emergency", "modem": "m1", "iccid": EMERGENCY}
    after = await emergency_state()
    assert after["profile_state"] == "installed"
    iccids, _pending = await card(stack)
    assert EMERGENCY in iccids
    profiles = await daemon(stack, "profile_list", modem="m1")
    states = {p["iccid"]: p["state"] for p in profiles["profiles"]}
    assert states[EMERGENCY] == "disabled", "the emergency profile stays dormant"
    assert states[ROAM] == "enabled"
    st = await daemon(stack, "status")
    assert st["active_layer"] == "primary"
    # One failed attempt, retried on the backoff (seconds apart), never in a hot loop.
    assert 2 <= smdp.core.calls.count("initiateAuthentication") <= 4
    assert offer.state == "installed"
    assert "EMERG-7" not in stack.daemon_log.read_text(errors="replace")


async def test_download_and_enable(make_stack: StackFactory, smdp: SmdpServer) -> None:
    def m1_without_layers(cfg: dict[str, Any]) -> None:
        cfg["layers"] = [x for x in cfg["layers"] if x["modem"] != "m1"]

    stack = await make_stack(tune=m1_without_layers)
    result = await daemon(stack, "profile_download", code=code_for(smdp), modem="m1", enable=True)
    assert (result["iccid"], result["enable_outcome"], result["state"]) == (
        NEW,
        "switched",
        "enabled",
    )
    profiles = await daemon(stack, "profile_list", modem="m1")
    assert {p["iccid"]: p["state"] for p in profiles["profiles"]}[NEW] == "enabled"


async def test_enable_is_refused_when_it_would_disable_a_layers_profile(
    make_stack: StackFactory, smdp: SmdpServer
) -> None:
    stack = await make_stack()
    with pytest.raises(ControlError) as refused:
        await daemon(stack, "profile_download", code=code_for(smdp), modem="m1", enable=True)
    assert refused.value.message.startswith("not_allowed: ")
    assert smdp.core.calls == []


async def test_cli_progress_bar_through_the_socket(
    make_stack: StackFactory, smdp: SmdpServer, tmp_path: Path
) -> None:
    """On a terminal the `--socket` form draws the daemon's progress lines as a bar."""
    stack = await make_stack()
    smdp.core.offers["TRIP-1"].size = 60_000
    master, slave = pty.openpty()
    code = "import sys; from agent.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "profile",
        "download",
        "--socket",
        stack.socket,
        "--modem",
        "m1",
        "--code",
        code_for(smdp),
        stdout=asyncio.subprocess.PIPE,
        stderr=slave,
        env={"XDG_RUNTIME_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "100"},
    )
    os.close(slave)
    drawn = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = asyncio.get_running_loop().run_in_executor(None, drain)
    out, _ = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    await asyncio.wait_for(reader, CLI_TIMEOUT_S)
    os.close(master)
    assert proc.returncode == 0
    assert f"{NEW} installed on m1" in out.decode()
    screen = drawn.decode(errors="replace")
    assert "install" in screen, screen[-2000:]
    assert "kB" in screen, "the bar shows the package bytes"


def scenario_with_an_empty_card(tmp_path: Path) -> Path:
    """The demo's m0, and an m1 whose eUICC holds no profile at all (bought without one)."""
    text = DEMO_SCENARIO.read_text()
    m1 = text.index('id = "m1"')
    head, tail = text[:m1], text[m1:]
    tail = tail.replace('id = "m1"', 'id = "m1"\nprofiles = []', 1)
    tail = tail[: tail.index("[[modem.profiles]]")]
    path = tmp_path / "empty-m1.toml"
    path.write_text(head + tail)
    return path


async def test_store_and_forward_onto_an_empty_card(
    make_stack: StackFactory, smdp: SmdpServer, tmp_path: Path
) -> None:
    def with_code(cfg: dict[str, Any]) -> None:
        cfg["layers"][1]["activation_code"] = code_for(smdp)

    stack = await make_stack(
        tune=with_code, scenario=scenario_with_an_empty_card(tmp_path), iccids=(PRIMARY, NEW)
    )
    assert (await card(stack))[0] in ([], [NEW])
    async with asyncio.timeout(STEP_S):
        while layer(await daemon(stack, "status"), "failover")["profile_state"] != "installed":  # noqa: ASYNC110 - the state lives in another process
            await asyncio.sleep(0.2)
    profiles = await daemon(stack, "profile_list", modem="m1")
    assert [(p["iccid"], p["state"]) for p in profiles["profiles"]] == [(NEW, "disabled")]
