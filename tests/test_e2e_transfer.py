"""`esim-agent profile transfer` between two real daemons on one real Mosquitto (the shipped ACL,
a user per device), each with its own emulated modem, and the test SM-DP+ over HTTPS.

The source's plan (OLD) was downloaded from the SM-DP+ and runs; the operator issued a new
activation code (MOVE-1) for the target. The target must install, enable and verify it before
the source lets go of OLD; a failing target leaves the source as it was; a source killed at
either side of the target's verification finishes the transfer after its restart.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import config_to_toml, default_demo_config, parse_config
from agent.daemon.control import control_call
from agent.demo.mosquitto import Watcher
from agent.demo.stack import mosquitto_available
from agent.euicc import es10, tlv
from agent.euicc.activation import parse_activation_code
from agent.euicc.download import Downloader
from agent.euicc.es9 import Es9Client, Resolve
from agent.euicc.lpa import Lpa
from agent.euicc.transport import AtApduTransport
from agent.modem.driver import open_modem
from hw_fixtures.pki import TestPki
from hw_fixtures.smdp import Offer, SmdpCore, SmdpServer
from hw_fixtures.testing import EmulatorHandle, start_emulator
from tests.mosquitto_lab import ConfiguredMosquitto, password_file

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not mosquitto_available(), reason="needs mosquitto"),
    pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd"),
]

ROOT = Path(__file__).resolve().parent.parent
ACL = ROOT / "config" / "mosquitto" / "acl"
OLD = "8988247000009876543"  # the plan that moves, downloaded onto the source earlier
NEW = "8988247000001234567"  # the operator's new profile for the target
HOME_S = "8944476500001224158"
HOME_T = "8944476500001224166"
TOKEN = "the-group-shares-this-token"
USERS = {"source": "pw-source", "target": "pw-target", "viewer": "pw-viewer", "home": "pw-home"}
STEP_S = 90.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float = STEP_S) -> None:
    """Wait for a condition in another process (no event to wait on), with a deadline."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in another process
            await asyncio.sleep(0.2)


class Device:
    """One device: its emulated modem, its config and `esim-agent run` as a process."""

    def __init__(self, name: str, workdir: Path, emulator: EmulatorHandle) -> None:
        self.name = name
        self.workdir = workdir
        self.emulator = emulator
        self.config_path = workdir / "esim-agent.toml"
        self.socket = str(workdir / "state" / "control.sock")
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(
        self, broker: ConfiguredMosquitto, iccids: list[str], pki: TestPki, smdp: SmdpServer
    ) -> None:
        assert pki.directory is not None
        cfg = default_demo_config(
            self.emulator.info,
            broker.port,
            self.workdir / "state",
            iccids,
            device_id=self.name,
            command_token=TOKEN,
        )
        data = tomllib.loads(config_to_toml(cfg))
        data["mqtt"]["discovery"] = False
        data["mqtt"]["username"] = self.name
        data["mqtt"]["password"] = USERS[self.name]
        data["rsp"] = {
            "ci_certs": [str(pki.directory / "ci.pem")],
            "resolve": [f"{smdp.core.address}:127.0.0.1"],
        }
        self.config_path.write_text(config_to_toml(parse_config(data, str(self.config_path))))

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), 20)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    async def call(self, cmd: str, **args: Any) -> Any:
        return await control_call(self.socket, cmd, args, timeout=30)

    async def ready(self, layer: str) -> None:
        async def up() -> bool:
            try:
                st = await self.call("status")
            except Exception:
                return False
            if not st["modems"]:
                return False  # the socket answers before the sessions exist
            modem = st["modems"][0]
            return bool(modem["online"] and modem["profiles"] and st["active_layer"] == layer)

        await until(up)

    async def profiles(self) -> dict[str, str]:
        """ICCID -> state, read from the card again."""
        answer = await self.call("profile_list")
        return {p["iccid"]: p["state"] for p in answer["profiles"]}

    async def pending(self) -> list[tuple[str | None, str | None]]:
        """(operation, ICCID) of every notification waiting on the card."""
        answer = await self.call("notification_list")
        return [(n["profile_management_operation"], n["iccid"]) for n in answer["notifications"]]

    def running_iccid(self) -> str | None:
        """What the emulated modem runs, from the emulator (independent of the daemon)."""
        iccid = self.emulator.status()["iccid"]
        return str(iccid) if iccid else None

    def journal(self) -> list[dict[str, Any]]:
        directory = self.workdir / "state" / "transfers"
        return [json.loads(p.read_text()) for p in sorted(directory.glob("out-*.json"))]

    def log_tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        keep = [x for x in lines if '"debug"' not in x and "probe_result" not in x]
        return "\n".join(keep[-60:])


def emulator(pki: TestPki, profile: str) -> EmulatorHandle:
    assert pki.directory is not None
    return start_emulator(
        "--fast",
        "--log-level",
        "warning",
        "--pki",
        str(pki.directory),
        "--eid",
        pki.eid,
        "--profile",
        profile,
    )


async def preinstall_old(port: str, pki: TestPki, smdp: SmdpServer, state: Path) -> None:
    """The source's plan: downloaded from the SM-DP+ (so its notifications go there), enabled."""
    assert pki.directory is not None
    code = parse_activation_code(f"LPA:1${smdp.core.address}$SRC-1")
    es9 = Es9Client(
        code.smdp_address,
        [pki.directory / "ci.pem"],
        resolve=[Resolve.parse(f"{smdp.core.address}:127.0.0.1")],
    )
    async with open_modem(port) as modem:
        lpa = Lpa(AtApduTransport(modem.channel, modem.port, state_dir=state))
        async with lpa:
            await Downloader(lpa, es9, code).run()
            await lpa.enable_profile(OLD, refresh=True)


def received(smdp: SmdpServer) -> list[tuple[str | None, str | None]]:
    """(operation, ICCID) of every non-install notification the SM-DP+ accepted."""
    out = []
    for record in smdp.core.notifications:
        if record.get("kind") != "other":
            continue
        wrapped = tlv.encode(0xBF2B, tlv.encode(0xA0, bytes.fromhex(record["raw"])))
        for item in es10.decode_retrieve_notifications(wrapped):
            meta = item.metadata
            out.append((meta.profile_management_operation, meta.iccid))
    return out


def changes_of(iccid: str, notes: list[tuple[str | None, str | None]]) -> list[str | None]:
    """The disable and delete notifications for iccid among notes."""
    return [op for op, who in notes if who == iccid and op in ("disable", "delete")]


def events(watcher: Watcher, device: str, since: int = 0) -> list[dict[str, Any]]:
    out = []
    for topic, payload, _, _ in watcher.messages[since:]:
        if topic == f"esim-agent/{device}/events":
            event = json.loads(payload)
            if str(event.get("type", "")).startswith("transfer"):
                out.append(event)
    return out


class Lab:
    def __init__(
        self,
        source: Device,
        target: Device,
        smdp: SmdpServer,
        watcher: Watcher,
        broker: ConfiguredMosquitto,
    ) -> None:
        self.broker = broker
        self.source = source
        self.target = target
        self.smdp = smdp
        self.watcher = watcher

    def cli(self, *extra: str, code: str = "MOVE-1") -> subprocess.Popen[bytes]:
        """`esim-agent profile transfer` against the source's daemon, as a user runs it."""
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "profile",
                "transfer",
                "--socket",
                self.source.socket,
                "--from-iccid",
                OLD,
                "--to",
                "target",
                "--code",
                f"LPA:1${self.smdp.core.address}${code}",
                "--json",
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    async def wait_event(self, device: str, name: str, since: int = 0) -> dict[str, Any]:
        async def seen() -> bool:
            return any(e["type"] == name for e in events(self.watcher, device, since))

        await until(seen)
        return next(e for e in events(self.watcher, device, since) if e["type"] == name)


async def finish(proc: subprocess.Popen[bytes]) -> tuple[int, dict[str, Any], str]:
    out, err = await asyncio.wait_for(asyncio.to_thread(proc.communicate), 300)
    return proc.returncode, json.loads(out or b"{}"), err.decode()


@pytest.fixture
async def lab(
    tmp_path: Path, test_pki: TestPki, request: pytest.FixtureRequest
) -> AsyncIterator[Lab]:
    smdp = SmdpServer(SmdpCore(pki=test_pki, address=test_pki.smdp_host))
    await smdp.start()
    smdp.core.address = f"{test_pki.smdp_host}:{smdp.port}"
    smdp.core.offer(Offer(matching_id="SRC-1", iccid=OLD, name="Travel", provider="RoamCo"))
    smdp.core.offer(Offer(matching_id="MOVE-1", iccid=NEW, name="Travel", provider="RoamCo"))
    pw = password_file(tmp_path / "passwd", USERS)
    acl = tmp_path / "acl"
    acl.write_text(ACL.read_text())  # the shipped file, verbatim
    broker = ConfiguredMosquitto(
        tmp_path / "broker", ["allow_anonymous false", f"password_file {pw}", f"acl_file {acl}"]
    )
    (tmp_path / "broker").mkdir()
    devices: list[Device] = []
    try:
        await asyncio.to_thread(broker.start)
        src_emu = await asyncio.to_thread(emulator, test_pki, f"{HOME_S}:Home:enabled")
        devices.append(Device("source", tmp_path / "source", src_emu))
        tgt_emu = await asyncio.to_thread(emulator, test_pki, f"{HOME_T}:Home:enabled")
        devices.append(Device("target", tmp_path / "target", tgt_emu))
        source, target = devices
        for d in devices:
            (d.workdir / "state").mkdir(parents=True)
        await preinstall_old(src_emu.port, test_pki, smdp, tmp_path)
        # The source runs the plan that moves (primary) and has its own profile as failover;
        # the target names the new profile as a layer so its policy keeps it once it runs.
        source.configure(broker, [OLD, HOME_S], test_pki, smdp)
        target.configure(broker, [HOME_T, NEW], test_pki, smdp)
        async with Watcher(
            broker, "esim-agent/+/events", username="viewer", password="pw-viewer"
        ) as w:
            for d in devices:
                d.start()
            await source.ready("primary")
            await target.ready("primary")
            yield Lab(source, target, smdp, w, broker)
            report = getattr(request.node, "rep_call", None)
            if report is not None and report.failed:
                for d in devices:
                    sys.stderr.write(f"--- {d.name} daemon log\n{d.log_tail()}\n")
    finally:
        for d in devices:
            await d.stop()
            await asyncio.to_thread(d.emulator.stop)
        await asyncio.to_thread(broker.close)
        await smdp.stop()


async def test_transfer_moves_the_profile_and_the_source_lets_go_only_after_verification(
    lab: Lab,
) -> None:
    status, result, err = await finish(lab.cli())
    assert status == 0, err
    assert result["step"] == "done"
    assert result["target_iccid"] == NEW
    assert "code" not in result, "the activation code is not echoed"
    # The target runs the new profile (the emulator says so, not only its daemon).
    assert lab.target.running_iccid() == NEW
    assert (await lab.target.profiles())[NEW] == "enabled"
    # The source let go: OLD is gone, its own profile runs.
    profiles = await lab.source.profiles()
    assert OLD not in profiles
    assert profiles[HOME_S] == "enabled"
    assert lab.source.running_iccid() == HOME_S
    # The SM-DP+ was told: OLD's disable and delete notifications arrived, none is left pending.
    assert result["notification"] == "sent"
    assert ("delete", OLD) in received(lab.smdp)
    assert [n for n in await lab.source.pending() if n[1] == OLD] == []
    # Every step is an event, in order, on the source's events topic; the target's own too.
    names = [e["type"] for e in events(lab.watcher, "source")]
    expected = [
        "transfer_started",
        "transfer_target_verified",
        "transfer_source_disabled",
        "transfer_source_deleted",
        "transfer_done",
    ]
    assert [n for n in names if n in expected] == expected
    target_names = [e["type"] for e in events(lab.watcher, "target")]
    assert target_names == ["transfer_in_started", "transfer_in_installed", "transfer_in_verified"]
    (record,) = lab.source.journal()
    assert record["step"] == "done"
    assert record["code"] == "", "a finished transfer keeps no activation code"


async def test_a_failing_target_leaves_the_source_untouched(lab: Lab) -> None:
    lab.smdp.core.offers["MOVE-1"].confirmation_code = "2468"
    status, result, _err = await finish(lab.cli("--confirmation-code", "1357"))
    assert status == 1
    assert result["step"] == "failed"
    assert "8.2.7" in result["error"], result["error"]  # the SM-DP+'s refusal, named
    # Nothing changed on the source: OLD still listed, enabled and running; no disable or
    # delete notification for it, on the card or at the SM-DP+ (the courier may deliver the
    # older install and enable ones meanwhile).
    assert (await lab.source.profiles())[OLD] == "enabled"
    assert lab.source.running_iccid() == OLD
    assert changes_of(OLD, await lab.source.pending() + received(lab.smdp)) == []
    # The target is clean too: no new profile, its own still runs.
    assert NEW not in await lab.target.profiles()
    assert lab.target.running_iccid() == HOME_T
    names = [e["type"] for e in events(lab.watcher, "source")]
    assert names == ["transfer_started", "transfer_failed"]


async def test_source_killed_after_the_target_verified_finishes_after_restart(lab: Lab) -> None:
    # A slow re-attach on the source, so the kill lands inside its own side of the transfer.
    await asyncio.to_thread(lab.source.emulator.control, "set_delays", modem="m0", reattach=3.0)
    cli = lab.cli()
    await lab.wait_event("source", "transfer_target_verified")
    await lab.source.stop(signal.SIGKILL)
    await finish(cli)  # the CLI loses its daemon; what matters is what the restart does
    (record,) = lab.source.journal()
    assert record["step"] in ("target_verified", "source_disabled", "source_deleted")
    mark = len(lab.watcher.messages)
    lab.source.start()
    done = await lab.wait_event("source", "transfer_done", mark)
    assert done["data"]["target_iccid"] == NEW
    names = [e["type"] for e in events(lab.watcher, "source", mark)]
    assert names[0] == "transfer_resumed"
    assert OLD not in await lab.source.profiles()
    assert ("delete", OLD) in received(lab.smdp)
    assert lab.target.running_iccid() == NEW


async def test_source_killed_before_the_target_verified_resumes_without_touching_its_profile(
    lab: Lab,
) -> None:
    # A slow SM-DP+, so the target is still downloading when the source dies.
    lab.smdp.core.delays["getBoundProfilePackage"] = 3.0
    cli = lab.cli()
    await lab.wait_event("target", "transfer_in_started")
    await lab.source.stop(signal.SIGKILL)
    await finish(cli)
    (record,) = lab.source.journal()
    assert record["step"] == "asking"
    # The target goes on; the dead source's card is as it was.
    await lab.wait_event("target", "transfer_in_verified")
    assert lab.source.running_iccid() == OLD
    mark = len(lab.watcher.messages)
    lab.source.start()
    await lab.wait_event("source", "transfer_done", mark)
    names = [e["type"] for e in events(lab.watcher, "source", mark)]
    assert names.index("transfer_resumed") < names.index("transfer_target_verified")
    assert names.index("transfer_target_verified") < names.index("transfer_source_disabled")
    assert OLD not in await lab.source.profiles()
    # Asked again after the restart, the target answered for the same work: one download.
    assert len(lab.smdp.core.device_tacs) == 2, "SRC-1 on the source, MOVE-1 once on the target"
    assert [e["type"] for e in events(lab.watcher, "target")].count("transfer_in_started") == 1


async def test_source_killed_before_a_failing_target_answered_rolls_back_after_restart(
    lab: Lab,
) -> None:
    offer = lab.smdp.core.offers["MOVE-1"]
    offer.confirmation_code = "2468"
    lab.smdp.core.delays["getBoundProfilePackage"] = 3.0
    cli = lab.cli("--confirmation-code", "1357")
    await lab.wait_event("target", "transfer_in_started")
    await lab.source.stop(signal.SIGKILL)
    await finish(cli)
    await lab.wait_event("target", "transfer_in_failed")
    mark = len(lab.watcher.messages)
    lab.source.start()
    failed = await lab.wait_event("source", "transfer_failed", mark)
    assert failed["data"]["source_untouched"] is True
    assert "8.2.7" in failed["data"]["error"]
    (record,) = lab.source.journal()
    assert record["step"] == "failed"
    assert (await lab.source.profiles())[OLD] == "enabled"
    assert lab.source.running_iccid() == OLD
    assert changes_of(OLD, await lab.source.pending() + received(lab.smdp)) == []


async def test_a_controller_starts_the_transfer_over_mqtt(lab: Lab) -> None:
    """`cmd/profile_transfer` on the source, from the `home` controller of the shipped ACL."""
    body = {
        "token": TOKEN,
        "request_id": "move-1",
        "from_iccid": OLD,
        "to": "target",
        "code": f"LPA:1${lab.smdp.core.address}$MOVE-1",
    }
    answers = "esim-agent/source/cmd/profile_transfer/response"
    async with Watcher(lab.broker, answers, username="home", password="pw-home") as home:
        await home.client.publish(
            "esim-agent/source/cmd/profile_transfer", json.dumps(body).encode(), qos=1
        )
        answer = await home.wait_json(answers, lambda a: a.get("request_id") == "move-1", STEP_S)
    assert answer["ok"] is True, answer
    assert answer["result"]["step"] == "done"
    assert lab.target.running_iccid() == NEW
    assert OLD not in await lab.source.profiles()


async def test_wrong_requests_are_refused_before_anything_runs(lab: Lab) -> None:
    async def refused(**body: Any) -> str:
        args = {"from_iccid": OLD, "to": "target", "code": "LPA:1$smdp.example.com$X", **body}
        with pytest.raises(Exception) as info:  # noqa: PT011 - ControlError carries the code
            await lab.source.call("profile_transfer", **args)
        return str(info.value)

    assert "the target is this device" in await refused(to="source")
    assert "invalid_payload" in await refused(to="a/b")
    assert "iccid_not_found" in await refused(from_iccid=NEW)
    assert "invalid_payload" in await refused(code="not an activation code")
    assert lab.source.journal() == []
    assert (await lab.source.profiles())[OLD] == "enabled"


async def test_target_killed_after_installing_verifies_after_restart_without_a_second_download(
    lab: Lab,
) -> None:
    # A slow re-attach on the target, so the kill lands inside its switch to the new profile.
    await asyncio.to_thread(lab.target.emulator.control, "set_delays", modem="m0", reattach=3.0)
    cli = lab.cli()
    await lab.wait_event("target", "transfer_in_installed")
    await lab.target.stop(signal.SIGKILL)
    # The source hears the target's Last Will, keeps asking, and touches nothing meanwhile.
    assert (await lab.source.profiles())[OLD] == "enabled"
    mark = len(lab.watcher.messages)
    lab.target.start()
    status, result, err = await finish(cli)
    assert status == 0, err
    assert result["step"] == "done"
    assert lab.target.running_iccid() == NEW
    assert OLD not in await lab.source.profiles()
    # The restarted target took up its journaled step: verified without downloading again.
    after = [e["type"] for e in events(lab.watcher, "target", mark)]
    assert after == ["transfer_in_verified"]
    assert len(lab.smdp.core.device_tacs) == 2, "SRC-1 on the source, MOVE-1 once on the target"
