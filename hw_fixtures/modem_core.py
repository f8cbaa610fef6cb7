"""Sans-IO emulated modem: bytes in through feed(), bytes out through a write callback.

Time only enters through the injected `schedule(delay, callback)`, so tests can drive it with an
asyncio loop or a fake clock.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import structlog

from hw_fixtures.addressing import ContextAddress, contrdp_line, loopback_context
from hw_fixtures.at_syntax import (
    Command,
    cesq_rsrp,
    cesq_rsrq,
    csq_index,
    format_iccid,
    frame_final,
    frame_info,
    is_hex,
    split_args,
    split_command_line,
)
from hw_fixtures.card_api import EmulatedCard, ProfileSpec
from hw_fixtures.personalities import QUECTEL_USBNET, Personality
from hw_fixtures.scenario import REG_STATES, ModemConfig, OperatorState, ScanEntry

log = structlog.get_logger(__name__)

STAT_CODES = {"not_registered": 0, "home": 1, "searching": 2, "denied": 3, "roaming": 5}
ACT_CODES = {"gsm": 0, "umts": 2, "lte": 7, "nr": 11, "endc": 13}
REG_COMMANDS = ("+CREG", "+CGREG", "+CEREG", "+C5GREG")
SCAN_STATUS = {"unknown": 0, "available": 1, "current": 2, "forbidden": 3}
FAULT_KINDS = ("hang", "slow", "garbage", "partial", "urc_interleave", "reset")
MAX_LINE = 4096
PDP_TYPES = ("IP", "IPV6", "IPV4V6", "PPP", "NON-IP")
# AT+GTUSBMODE numbers are module specific: 32 ECM / 33 RNDIS as Fibocom's FM150/FG621/L610
# manuals number them; 30, 40 and 41 are the emulator's own for its QMI, MBIM and NCM modes
FIBOCOM_USBMODE = {"qmi": 30, "ecm": 32, "rndis": 33, "mbim": 40, "ncm": 41}


class Cancellable(Protocol):
    """A pending timer (asyncio.TimerHandle fits)."""

    def cancel(self) -> None:
        """Stop the timer from firing."""


Schedule = Callable[[float, Callable[[], None]], Cancellable]


class CoreError(ValueError):
    """A control request the modem core cannot apply (bad state name, unknown fault...)."""


@dataclass
class Result:
    """What one command produced: info lines, a final code (OK, ERROR or CME number)."""

    lines: list[str] = field(default_factory=list)
    final: str | int = "OK"
    delay: float = 0.0
    after: Callable[[], None] | None = None


def _cme(code: int) -> Result:
    return Result(final=code)


@dataclass
class Faults:
    """Active injected faults."""

    hang: bool = False
    slow: float = 0.0
    urc_interleave: int = 0
    urc_text: str | None = None
    garbage_next: bytes | None = None
    #: command line (upper case) -> CME error code answered the next time it comes, once
    error_once: dict[str, int] = field(default_factory=dict)


class ModemCore:
    """One emulated modem's AT interpreter, radio state and fault injection."""

    def __init__(
        self,
        cfg: ModemConfig,
        personality: Personality,
        card: EmulatedCard | None,
        *,
        write: Callable[[bytes], None],
        schedule: Schedule,
        on_change: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.p = personality
        self.card = card
        self._write = write
        self._schedule = schedule
        self.on_change = on_change or (lambda: None)
        self._rng = rng or random.Random()
        self.delays = cfg.delays
        self.signal = cfg.signal
        self.network = cfg.network
        prof = self._profile()
        if cfg.operator is not None:
            self.operator = cfg.operator
        elif prof is not None:
            self.operator = OperatorState(prof.operator_name, prof.operator_name, prof.mcc_mnc)
        else:
            self.operator = OperatorState()
        self.operators: list[ScanEntry] = list(cfg.operators)
        self.sim_state = cfg.sim_state
        self.link = "up"
        self.faults = Faults()
        self.broken: set[str] = {p.iccid for p in cfg.profiles if p.broken}
        self.pdp: dict[int, tuple[str, str]] = {1: ("IP", cfg.apn)}
        self.pdp_active: set[int] = set()
        self.pdp_user_off: set[int] = set()
        # contexts the network deactivated: not re-activated automatically until asked
        self.pdp_net_off: set[int] = set()
        # contexts connected to the USB network function by the vendor's dial command
        self.dialed: set[int] = set()
        self.pdp_auth: dict[int, tuple[int, str, str]] = {}
        self.usbnet = cfg.usbnet or personality.usbnet
        self.usbnet_pending: str | None = None
        self.qnetdevctl: tuple[int, int, int] = (0, 1, 0)
        index = int(cfg.id[1:]) if cfg.id[1:].isdigit() else 0
        # cid -> what the network grants; the emulator swaps in the netns plan
        self.address_plan: Callable[[int], ContextAddress] = lambda cid: loopback_context(
            index, cid
        )
        self.cfun = 1
        self.attached = True
        self.pending_refresh = False
        self.cops_deregistered = False
        self.resetting = False
        self.sessions: dict[str, int] = {}
        self.history: deque[str] = deque(maxlen=100)
        self.commands_seen = 0
        self.rx_dropped = 0
        # data-volume counters as the device sees them: rx downlink, tx uplink
        self.bytes_rx = 0
        self.bytes_tx = 0
        self._buf = bytearray()
        self._queue: deque[str] = deque()
        self._busy = False
        self._timers: dict[str, Cancellable] = {}
        self._last_reg: tuple[int, int, int, int] | None = None
        self._executing = False
        self._held_urcs: list[str] = []
        self._defaults()
        self._state_changed()

    # ----------------------------------------------------------------- settings

    def _defaults(self) -> None:
        self.echo = True
        self.verbose = True
        self.cmee = 0
        self.reg_n = dict.fromkeys(REG_COMMANDS, 0)
        self.cops_format = 0
        self.charset = "IRA"
        self.cgerep = (0, 0)

    def _profile(self) -> ProfileSpec | None:
        if self.card is not None:
            return self.card.enabled_profile()
        return next((p for p in self.cfg.profiles if p.enabled), None)

    # ------------------------------------------------------------------- timers

    def _later(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel(name)

        def fire() -> None:
            self._timers.pop(name, None)
            fn()

        self._timers[name] = self._schedule(max(0.0, delay), fire)

    def _cancel(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    # ------------------------------------------------------------------- output

    def _emit(self, data: bytes) -> None:
        if self.faults.hang or self.resetting:
            return
        self._write(data)

    def emit_urc(self, line: str) -> None:
        """Send one unsolicited line (framed as ATV says); held back until a reply is out."""
        if self._executing:
            # a command's own side effects are reported after its final result, as modems do
            self._held_urcs.append(line)
            return
        self._emit(frame_info(line, self.verbose))

    def _flush_held_urcs(self) -> None:
        held, self._held_urcs = self._held_urcs, []
        for line in held:
            self.emit_urc(line)

    # -------------------------------------------------------------------- input

    def feed(self, data: bytes) -> None:
        """Bytes from the serial line: echoed at once, executed per complete line."""
        if self.faults.hang or self.resetting:
            self.rx_dropped += len(data)
            return
        pending_echo = bytearray()
        for i, b in enumerate(data):
            pending_echo.append(b)
            if b in (0x0D, 0x0A):
                if b == 0x0D and data[i + 1 : i + 2] == b"\n":
                    continue  # CRLF: the line ends at the LF, echoed whole before the reply
                if self._buf:
                    line = self._buf.decode("latin-1")
                    self._buf.clear()
                    # echo up to the terminator first, so the reply follows its own echo
                    self._echo(pending_echo)
                    pending_echo.clear()
                    self._on_line(line)
            elif b in (0x08, 0x7F):
                if self._buf:
                    self._buf.pop()
            else:
                self._buf.append(b)
                if len(self._buf) > MAX_LINE:
                    # real modems drop an overlong line rather than execute half of it
                    self._buf.clear()
        self._echo(pending_echo)

    def _echo(self, data: bytes | bytearray) -> None:
        if data and self.echo and not self.faults.hang and not self.resetting:
            self._emit(bytes(data))

    def _on_line(self, line: str) -> None:
        text = line.strip()
        if text[:2].upper() != "AT":
            return  # line noise without the AT prefix is ignored by V.250 modems
        self._queue.append(text)
        self._pump()

    def _pump(self) -> None:
        while not self._busy and self._queue and not self.resetting and not self.faults.hang:
            self._execute_line(self._queue.popleft())

    def _execute_line(self, line: str) -> None:
        self.history.append(line)
        self.commands_seen += 1
        log.debug("emu_command", modem=self.cfg.id, line=line)
        once = self.faults.error_once.pop(line.strip().upper(), None)
        if once is not None:
            self._respond([frame_final(once, self.verbose, self.cmee)], self.delays.response, None)
            return
        canned = self._canned(line)
        if canned is not None:
            self._respond([canned], self.delays.response, None)
            return
        cmds = split_command_line(line)
        result = Result()
        extra = 0.0
        after: list[Callable[[], None]] = []
        if cmds is None:
            result.final = "ERROR"
        self._executing = True
        try:
            results: list[Result] = []
            for cmd in cmds or []:
                results.append(self._dispatch(cmd))
                if results[-1].final != "OK":
                    break
        finally:
            self._executing = False
        for r in results:
            result.lines.extend(r.lines)
            extra += r.delay
            if r.after is not None:
                after.append(r.after)
            if r.final != "OK":
                result.final = r.final
                break
        # one information block: CRLF before the first line only, as most modems print it
        chunks = [
            frame_info(x, self.verbose) if i == 0 else frame_info(x, False)
            for i, x in enumerate(result.lines)
        ]
        chunks.append(frame_final(result.final, self.verbose, self.cmee))

        def run_after() -> None:
            for fn in after:
                fn()

        self._respond(chunks, self.delays.response + extra, run_after if after else None)

    def _canned(self, line: str) -> bytes | None:
        key = line.strip().upper()
        for cmd, text in self.cfg.replies.items():
            if cmd.strip().upper() == key:
                raw = text.replace("\r\n", "\n").replace("\n", "\r\n")
                return raw.encode("latin-1", "replace")
        return None

    def _respond(self, chunks: list[bytes], delay: float, after: Callable[[], None] | None) -> None:
        self._busy = True

        def finish() -> None:
            self._busy = False
            self._emit(b"".join(self._apply_response_faults(chunks)))
            self._flush_held_urcs()
            if after is not None:
                after()
            self._pump()

        total = delay + self.faults.slow
        if total > 0:
            self._later("response", total, finish)
        else:
            finish()

    def _apply_response_faults(self, chunks: list[bytes]) -> list[bytes]:
        out = list(chunks)
        if self.faults.urc_interleave > 0:
            self.faults.urc_interleave -= 1
            urc = self.faults.urc_text or f"+CEREG: {self.reg_stat()}"
            out.insert(1 if len(out) > 1 else 0, frame_info(urc, self.verbose))
        if self.faults.garbage_next is not None:
            out.insert(1 if len(out) > 1 else 0, self.faults.garbage_next)
            self.faults.garbage_next = None
        return out

    # ------------------------------------------------------------- registration

    def reg_stat(self) -> int:
        """The 27.007 <stat> the modem reports now."""
        if self.cfun != 1 or self.resetting or self.sim_state != "ready":
            return 0
        prof = self._profile()
        if prof is None or self.cops_deregistered:
            return 0
        if not self.attached:
            return 2
        return STAT_CODES[self.network.state]

    def registered(self) -> bool:
        """Home or roaming."""
        return self.reg_stat() in (1, 5)

    def data_path(self) -> str:
        """up, degraded or down: whether the loopback endpoints should answer."""
        if self.link == "down" or self.cfun != 1 or not self.registered():
            return "down"
        if not self.pdp_active:
            return "down"
        return self.link

    def dial_needed(self) -> bool:
        """Whether traffic needs the vendor's connect command in the current USB mode."""
        return self.p.data_dial is not None and self.usbnet in self.p.dial_modes

    def data_cid(self) -> int | None:
        """The context the USB network function carries now, None while nothing passes.

        Unlike data_path() this also asks for the vendor's connect where the USB mode needs
        it; it gates the real interface of netns mode (loopback mode keeps data_path()).
        """
        if self.data_path() == "down" or self.resetting:
            return None
        usable = self.dialed & self.pdp_active if self.dial_needed() else self.pdp_active
        return min(usable) if usable else None

    def drop_context(self, cid: int | None = None) -> list[int]:
        """The network deactivates a context (default: every active one); +CGEV follows."""
        cids = {cid} if cid is not None else set(self.pdp_active)
        if cid is not None and cid not in self.pdp_active:
            raise CoreError(f"context {cid} is not active")
        self.pdp_net_off |= cids
        self._set_active(self.pdp_active - cids, "NW")
        self._state_changed()
        return sorted(cids)

    def _act_code(self) -> int:
        return ACT_CODES.get(self.network.act, 7)

    def _reg_tuple(self) -> tuple[int, int, int, int]:
        stat = self.reg_stat()
        if stat not in (1, 5):
            return (stat, -1, -1, -1)
        return (stat, self.network.tac, self.network.cell_id, self._act_code())

    def _reg_line(self, cmd: str, n: int, solicited: bool) -> str:
        stat, tac, ci, act = self._reg_tuple()
        lac = self.network.lac if cmd in ("+CREG", "+CGREG") else tac
        head = f"{cmd}: {n},{stat}" if solicited else f"{cmd}: {stat}"
        if n >= 2 and stat in (1, 5):
            width = 4 if cmd in ("+CREG", "+CGREG") else 6 if cmd == "+C5GREG" else 4
            ci_width = 9 if cmd == "+C5GREG" else 8 if cmd == "+CEREG" else 4
            if cmd in ("+CREG", "+CGREG") and ci > 0xFFFF:
                ci_width = 8
            head += f',"{lac:0{width}X}","{ci:0{ci_width}X}",{act}'
        return head

    def _set_active(self, active: set[int], origin: str) -> None:
        """Change the active contexts; +CGEV reports each change (origin ME or NW)."""
        gained = sorted(active - self.pdp_active)
        lost = sorted(self.pdp_active - active)
        self.pdp_active = set(active)
        self.dialed &= self.pdp_active
        if self.cgerep[0] == 0:
            return  # AT+CGEREP=0: 27.007 lets the MT buffer or discard them; we discard
        for cid in lost:
            self.emit_urc(f"+CGEV: {origin} PDN DEACT {cid}")
        for cid in gained:
            self.emit_urc(f"+CGEV: ME PDN ACT {cid}")

    def _state_changed(self) -> None:
        if self.registered():
            active = set(self.pdp_active)
            if self.cfg.pdp_auto and 1 in self.pdp:
                active |= {1} - self.pdp_user_off - self.pdp_net_off
            self._set_active(active, "NW")
        else:
            self.pdp_net_off.clear()
            self._set_active(set(), "NW")
        now = self._reg_tuple()
        prev = self._last_reg
        self._last_reg = now
        if prev is not None and now != prev:
            for cmd in REG_COMMANDS:
                n = self.reg_n[cmd]
                if n == 1 and now[0] != prev[0]:
                    self.emit_urc(self._reg_line(cmd, 1, solicited=False))
                elif n >= 2:
                    self.emit_urc(self._reg_line(cmd, 2, solicited=False))
            log.info("emu_registration", modem=self.cfg.id, stat=now[0])
        self.on_change()

    def _can_attach(self) -> bool:
        prof = self._profile()
        return (
            self.cfun == 1
            and self.sim_state == "ready"
            and prof is not None
            and not self.pending_refresh
            and not self.cops_deregistered
            and prof.iccid not in self.broken
            and not prof.broken
        )

    def _schedule_attach(self) -> None:
        self._cancel("attach")
        if self._can_attach():
            self._later("attach", self.delays.reattach, self._attach)

    def _attach(self) -> None:
        if self._can_attach():
            self.attached = True
            self._state_changed()

    def _detach(self) -> None:
        self._cancel("attach")
        self.attached = False
        self._state_changed()

    def on_profile_change(self, profile: ProfileSpec | None) -> None:
        """Card event: the enabled profile changed; re-register later, after the reply is out."""
        if profile is not None and self.p.refresh != "auto":
            # Set now, not in the deferred part: the host's refresh (CFUN=0, read before the
            # deferred call runs on a busy machine) must clear it, never be overtaken by it.
            self.pending_refresh = True
        self._schedule(0.0, lambda: self._profile_switched(profile))

    def _profile_switched(self, profile: ProfileSpec | None) -> None:
        log.info("emu_profile_switch", modem=self.cfg.id, iccid=profile.iccid if profile else None)
        # the data context is torn down with the old profile, and the counter with it
        self.reset_counters()
        if profile is not None:
            self.operator = OperatorState(
                profile.operator_name, profile.operator_name, profile.mcc_mnc
            )
        self._detach()
        if profile is not None:
            # Attaches only once nothing is pending: at once for "auto", else after the refresh.
            self._schedule_attach()

    # -------------------------------------------------------------------- reset

    def start_reset(self) -> None:
        """Go silent for the reset delay, forget volatile settings, then re-announce."""
        for name in list(self._timers):
            self._cancel(name)
        self.resetting = True
        self._held_urcs.clear()
        self._buf.clear()
        self._queue.clear()
        self._busy = False
        self.faults = Faults()
        self._close_sessions()
        self.attached = False
        self.pdp_active.clear()
        self.pdp_user_off.clear()
        self.pdp_net_off.clear()
        self.dialed.clear()
        if self.usbnet_pending is not None:
            # a new USB composition takes effect when the modem re-enumerates
            self.usbnet, self.usbnet_pending = self.usbnet_pending, None
        self.cops_deregistered = False
        self.reset_counters()
        self._state_changed()
        self._later("reset", self.delays.reset, self._boot)

    def _close_sessions(self) -> None:
        if self.card is not None:
            for channel in self.sessions.values():
                with contextlib.suppress(KeyError):
                    self.card.close_channel(channel)
        self.sessions.clear()

    def _boot(self) -> None:
        self.resetting = False
        self._defaults()
        self.cfun = 1
        self.pending_refresh = False
        for urc in self.p.boot_urcs:
            if urc.startswith("+CPIN") and self.sim_state != "ready":
                continue
            self.emit_urc(urc)
        self._state_changed()
        self._schedule_attach()

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, cmd: Command) -> Result:
        name = cmd.name
        if cmd.kind == "test" and name != "+COPS" and self.p.rejects_test_commands:
            return Result(final="ERROR")
        handler = self._handlers().get(name)
        if handler is None:
            if name in self.p.iccid_commands and cmd.kind != "test":
                return self._iccid(self.p.iccid_commands[name])
            return _cme(100)
        if cmd.kind == "test" and name != "+COPS":
            return Result(lines=self._test_lines(name))
        return handler(cmd)

    def _handlers(self) -> dict[str, Callable[[Command], Result]]:
        table: dict[str, Callable[[Command], Result]] = {
            "E": self._at_e,
            "V": self._at_v,
            "Q": lambda c: Result(),
            "X": lambda c: Result(),
            "&W": lambda c: Result(),
            "&C": lambda c: Result(),
            "&D": lambda c: Result(),
            "Z": self._at_z,
            "&F": self._at_z,
            "I": self._at_i,
            "+GMI": self._ident("manufacturer"),
            "+CGMI": self._ident("manufacturer"),
            "+GMM": self._ident("model"),
            "+CGMM": self._ident("model"),
            "+GMR": self._ident("revision"),
            "+CGMR": self._ident("revision"),
            "+CGSN": self._ident("imei"),
            "+GSN": self._ident("imei"),
            "+CMEE": self._at_cmee,
            "+CPIN": self._at_cpin,
            "+CSQ": self._at_csq,
            "+CESQ": self._at_cesq,
            "+COPS": self._at_cops,
            "+CSCS": self._at_cscs,
            "+CGDCONT": self._at_cgdcont,
            "+CGACT": self._at_cgact,
            "+CGPADDR": self._at_cgpaddr,
            "+CGAUTH": self._at_cgauth,
            "+CGCONTRDP": self._at_cgcontrdp,
            "+CGEREP": self._at_cgerep,
            "+CFUN": self._at_cfun,
            "+CSIM": self._at_csim,
        }
        for reg in REG_COMMANDS:
            table[reg] = self._at_reg
        if self.p.ccho_form != "none":
            table["+CCHO"] = self._at_ccho
            table["+CGLA"] = self._at_cgla
            if self.p.has_cchc:
                table["+CCHC"] = self._at_cchc
        else:
            table["+CCHO"] = table["+CGLA"] = lambda c: _cme(3)
        ext = self.p.signal_extensions
        if "qcsq" in ext:
            table["+QCSQ"] = self._at_qcsq
        if "qeng" in ext:
            table["+QENG"] = self._at_qeng
        if "gstatus" in ext:
            table["!GSTATUS"] = self._at_gstatus
        if "cpsi" in ext:
            table["+CPSI"] = self._at_cpsi
        if "gtccinfo" in ext:
            table["+GTCCINFO"] = self._at_gtccinfo
        if self.p.data_counter == "qgdcnt":
            table["+QGDCNT"] = self._at_qgdcnt
        if self.p.usbnet_command == "qcfg":
            table["+QCFG"] = self._at_qcfg
        elif self.p.usbnet_command == "gtusbmode":
            table["+GTUSBMODE"] = self._at_gtusbmode
        dial = {
            "qnetdevctl": ("+QNETDEVCTL", self._at_qnetdevctl),
            "gtrndis": ("+GTRNDIS", self._at_gtrndis),
            "qcrmcall": ("$QCRMCALL", self._at_qcrmcall),
            "scact": ("!SCACT", self._at_scact),
        }.get(self.p.data_dial or "")
        if dial is not None:
            table[dial[0]] = dial[1]
        return table

    def _test_lines(self, name: str) -> list[str]:
        if name == "+CGDCONT":
            return [f'+CGDCONT: (1-15),"{t}",,,(0-2),(0-4)' for t in ("IP", "IPV6", "IPV4V6")]
        if name == "+CGCONTRDP":
            return [f"+CGCONTRDP: ({','.join(str(c) for c in sorted(self.pdp_active))})"]
        if name == "+CGPADDR":
            return [f"+CGPADDR: ({','.join(str(c) for c in sorted(self.pdp))})"]
        ranges = {
            "+CGACT": "+CGACT: (0,1)",
            "+CGAUTH": "+CGAUTH: (1-15),(0-2),,",
            "+CGEREP": "+CGEREP: (0-2),(0,1)",
            "+CREG": "+CREG: (0-2)",
            "+CGREG": "+CGREG: (0-2)",
            "+CEREG": "+CEREG: (0-2)",
            "+C5GREG": "+C5GREG: (0-2)",
            "+CMEE": "+CMEE: (0-2)",
            "+CFUN": "+CFUN: (0,1,4),(0-1)",
            "+CSQ": "+CSQ: (0-31,99),(0-7,99)",
            "+CSCS": '+CSCS: ("GSM","IRA","UCS2")',
            "+QGDCNT": "+QGDCNT: (0,1)",
        }
        return [ranges[name]] if name in ranges else []

    # ------------------------------------------------------------------ basics

    def _at_e(self, cmd: Command) -> Result:
        if cmd.args not in ("", "0", "1"):
            return Result(final="ERROR")
        self.echo = cmd.args == "1"
        return Result()

    def _at_v(self, cmd: Command) -> Result:
        if cmd.args not in ("", "0", "1"):
            return Result(final="ERROR")
        self.verbose = cmd.args == "1"
        return Result()

    def _at_z(self, cmd: Command) -> Result:
        self._defaults()
        return Result()

    def _identity(self) -> dict[str, str]:
        return {
            "manufacturer": self.cfg.manufacturer or self.p.manufacturer,
            "model": self.cfg.model or self.p.model,
            "revision": self.cfg.revision or self.p.revision,
            "imei": self.cfg.imei,
        }

    def _ident(self, key: str) -> Callable[[Command], Result]:
        def handler(cmd: Command) -> Result:
            if cmd.kind not in ("exec", "query"):
                return _cme(50)
            return Result(lines=[self._identity()[key]])

        return handler

    def _at_i(self, cmd: Command) -> Result:
        ident = self._identity()
        return Result(
            lines=[ident["manufacturer"], ident["model"], f"Revision: {ident['revision']}"]
        )

    def _at_cmee(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(lines=[f"+CMEE: {self.cmee}"])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 1 or args[0] not in ("0", "1", "2"):
            return _cme(50)
        self.cmee = int(args[0])
        return Result()

    def _at_cpin(self, cmd: Command) -> Result:
        if self.sim_state == "absent" or self._profile() is None:
            return _cme(10)
        if cmd.kind == "query":
            text = {"ready": "READY", "pin": "SIM PIN", "puk": "SIM PUK"}[self.sim_state]
            return Result(lines=[f"+CPIN: {text}"])
        if cmd.kind != "set":
            return _cme(50)
        args = split_args(cmd.args)
        if self.sim_state == "ready":
            return _cme(3)
        if self.sim_state == "pin" and args and args[0] == self.cfg.sim_pin:
            self.sim_state = "ready"
            self._later("cpin_ready", 0.0, self._unlocked)
            return Result()
        return _cme(16)

    def _unlocked(self) -> None:
        self.emit_urc("+CPIN: READY")
        self._state_changed()
        self._schedule_attach()

    def _iccid(self, prefix: str) -> Result:
        prof = self._profile()
        if self.sim_state == "absent" or prof is None:
            return _cme(10)
        form = self.cfg.iccid_form or self.p.iccid_form
        return Result(lines=[prefix + format_iccid(prof.iccid, form)])

    # ------------------------------------------------------------------ signal

    def _at_csq(self, cmd: Command) -> Result:
        if self.cfun != 1:
            return Result(lines=["+CSQ: 99,99"])
        s = self.signal
        return Result(lines=[f"+CSQ: {csq_index(s.rssi_dbm)},{99 if s.ber is None else s.ber}"])

    def _at_cesq(self, cmd: Command) -> Result:
        s = self.signal
        on = self.cfun == 1
        rsrq = cesq_rsrq(s.rsrq_db) if on else 255
        rsrp = cesq_rsrp(s.rsrp_dbm) if on else 255
        return Result(lines=[f"+CESQ: 99,99,255,255,{rsrq},{rsrp}"])

    def _at_qcsq(self, cmd: Command) -> Result:
        s = self.signal
        if not self.registered():
            return Result(lines=['+QCSQ: "NOSERVICE"'])
        sinr = 255 if s.sinr_db is None else (s.sinr_db + 20) * 5
        return Result(
            lines=[
                f'+QCSQ: "LTE",{s.rssi_dbm or -113},{s.rsrp_dbm or -140},{sinr},{s.rsrq_db or -20}'
            ]
        )

    def _at_qeng(self, cmd: Command) -> Result:
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or args[0].lower() != "servingcell":
            return _cme(50)
        if not self.registered():
            return Result(lines=['+QENG: "servingcell","SEARCH"'])
        s = self.signal
        mcc, mnc = self.operator.mcc_mnc[:3], self.operator.mcc_mnc[3:]
        return Result(
            lines=[
                f'+QENG: "servingcell","NOCONN","LTE","FDD",{mcc},{mnc},'
                f"{self.network.cell_id:X},311,1300,3,5,5,{self.network.tac:X},"
                f"{_q(s.rsrp_dbm)},{_q(s.rsrq_db)},{_q(s.rssi_dbm)},{_q(s.sinr_db)},-,-,48"
            ]
        )

    def _at_gstatus(self, cmd: Command) -> Result:
        s = self.signal
        reg = self.registered()
        return Result(
            lines=[
                "!GSTATUS: ",
                "Current Time:  1234\t\tTemperature: 41",
                f"Reset Counter: 1\t\tMode:        {'ONLINE' if self.cfun == 1 else 'LOW POWER'}",
                f"System mode:   {'LTE' if reg else 'No service'}\tPS state:    "
                f"{'Attached' if reg else 'Not attached'}",
                "LTE band:      B3\t\tLTE bw:      20 MHz",
                f"EMM state:     {'Registered' if reg else 'Deregistered'}\tNormal Service",
                "RRC state:     RRC Idle",
                "",
                f"PCC RxM RSSI:  {s.rssi_dbm}\t\tRSRP (dBm):  {s.rsrp_dbm}",
                f"Tx Power:      0\t\tTAC:         {self.network.tac:04X} ({self.network.tac})",
                f"RSRQ (dB):     {s.rsrq_db}\t\tCell ID:     {self.network.cell_id:08X} "
                f"({self.network.cell_id})",
                f"SINR (dB):     {s.sinr_db}",
            ]
        )

    def _at_cpsi(self, cmd: Command) -> Result:
        if not self.registered():
            return Result(lines=["+CPSI: NO SERVICE,Online"])
        s = self.signal
        mcc, mnc = self.operator.mcc_mnc[:3], self.operator.mcc_mnc[3:]

        def tenth(v: int | None) -> int:
            return 0 if v is None else v * 10

        return Result(
            lines=[
                f"+CPSI: LTE,Online,{mcc}-{mnc},0x{self.network.tac:04X},{self.network.cell_id},"
                f"311,EUTRAN-BAND3,1300,5,5,{tenth(s.rsrq_db)},{tenth(s.rsrp_dbm)},"
                f"{tenth(s.rssi_dbm)},{s.sinr_db or 0}"
            ]
        )

    def _at_gtccinfo(self, cmd: Command) -> Result:
        if not self.registered():
            return Result(lines=["+GTCCINFO: ", "0"])
        s = self.signal
        mcc, mnc = self.operator.mcc_mnc[:3], self.operator.mcc_mnc[3:]
        rsrp_idx = cesq_rsrp(s.rsrp_dbm)
        rsrq_idx = cesq_rsrq(s.rsrq_db)
        return Result(
            lines=[
                "+GTCCINFO: ",
                "LTE service cell:",
                f"1,4,{mcc},{mnc},{self.network.tac:X},{self.network.cell_id:X},1300,311,3,"
                f"100,{s.sinr_db or 0},{rsrp_idx},{rsrq_idx}",
            ]
        )

    # ---------------------------------------------------------- data counters

    def _at_qgdcnt(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            # Quectel reports bytes sent first, then bytes received
            return Result(lines=[f"+QGDCNT: {self.bytes_tx},{self.bytes_rx}"])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 1 or args[0] not in ("0", "1"):
            return _cme(50)
        if args[0] == "0":
            self.reset_counters()
        # "1" saves the counters to NV on real firmware; ours live as long as the process
        return Result()

    def reset_counters(self) -> None:
        """Zero the data-volume counters, as a reset, a profile switch or AT+QGDCNT=0 does."""
        self.bytes_rx = 0
        self.bytes_tx = 0

    def add_traffic(self, rx: int, tx: int) -> bool:
        """Count bytes through the data path; False (nothing counted) while the path is down."""
        if rx < 0 or tx < 0:
            raise CoreError("rx and tx must be non-negative byte counts")
        if self.data_path() == "down":
            return False
        self.bytes_rx += rx
        self.bytes_tx += tx
        return True

    # ------------------------------------------------------------ registration

    def _at_reg(self, cmd: Command) -> Result:
        name = cmd.name
        if cmd.kind == "query":
            return Result(lines=[self._reg_line(name, self.reg_n[name], solicited=True)])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 1 or not args[0].isdigit() or int(args[0]) > 5:
            return _cme(50)
        self.reg_n[name] = min(2, int(args[0]))
        return Result()

    def _operator_text(self, fmt: int) -> str:
        op = self.operator
        return {0: op.name, 1: op.short, 2: op.mcc_mnc}[fmt]

    def _at_cops(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            mode = 2 if self.cops_deregistered else 0
            if not self.registered():
                return Result(lines=[f"+COPS: {mode}"])
            fmt = self.cops_format
            line = f'+COPS: {mode},{fmt},"{self._operator_text(fmt)}",{self._act_code()}'
            return Result(lines=[line])
        if cmd.kind == "test":
            if self.cfun != 1:
                return _cme(30)
            return Result(lines=[self._scan_line()], delay=self.delays.cops_scan)
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or not args[0].isdigit():
            return _cme(50)
        mode = int(args[0])
        if mode == 3:
            if len(args) < 2 or args[1] not in ("0", "1", "2"):
                return _cme(50)
            self.cops_format = int(args[1])
            return Result()
        if mode == 2:
            self.cops_deregistered = True
            self._detach()
            return Result()
        if mode in (0, 1, 4):
            if len(args) >= 2 and args[1] in ("0", "1", "2"):
                self.cops_format = int(args[1])
            if self.cops_deregistered:
                self.cops_deregistered = False
                self._state_changed()
                self._schedule_attach()
            return Result()
        return _cme(50)

    def _scan_line(self) -> str:
        entries = list(self.operators)
        op = self.operator
        if self.registered() and not any(e.mcc_mnc == op.mcc_mnc for e in entries):
            entries.insert(0, ScanEntry(op.name, op.short, op.mcc_mnc, "current", self.network.act))
        items = []
        for e in entries:
            status = SCAN_STATUS.get(e.status, 0)
            if self.registered() and e.mcc_mnc == op.mcc_mnc:
                status = 2
            elif status == 2:
                status = 1
            items.append(
                f'({status},"{e.name}","{e.short}","{e.mcc_mnc}",{ACT_CODES.get(e.act, 7)})'
            )
        return "+COPS: " + ",".join(items) + ",,(0,1,2,3,4),(0,1,2)"

    def _at_cscs(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(lines=[f'+CSCS: "{self.charset}"'])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 1 or args[0].upper() not in ("GSM", "IRA", "UCS2"):
            return _cme(50)
        self.charset = args[0].upper()
        return Result()

    # --------------------------------------------------------------------- PDP

    def _at_cgdcont(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(
                lines=[
                    f'+CGDCONT: {cid},"{t}","{apn}","0.0.0.0",0,0'
                    for cid, (t, apn) in sorted(self.pdp.items())
                ]
            )
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or not args[0].isdigit():
            return _cme(50)
        cid = int(args[0])
        if not 1 <= cid <= 15:
            return _cme(50)
        if len(args) == 1:
            self.pdp.pop(cid, None)
            self.pdp_auth.pop(cid, None)
            self._set_active(self.pdp_active - {cid}, "ME")
            self._state_changed()
            return Result()
        pdp_type = (args[1] or "IP").upper()
        if pdp_type not in PDP_TYPES:
            return _cme(50)
        self.pdp[cid] = (pdp_type, args[2] if len(args) > 2 else "")
        return Result()

    def _cids(self, args: list[str]) -> list[int] | None:
        """Context ids named in args (all defined ones when none); None if one is unknown."""
        if any(not a.isdigit() for a in args):
            return None
        cids = [int(a) for a in args] or sorted(self.pdp)
        return None if any(c not in self.pdp for c in cids) else cids

    def _at_cgact(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(
                lines=[f"+CGACT: {cid},{int(cid in self.pdp_active)}" for cid in sorted(self.pdp)]
            )
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or args[0] not in ("0", "1"):
            return _cme(50)
        cids = self._cids(args[1:])
        if cids is None:
            return _cme(50)
        if args[0] == "1":
            return self._activate(set(cids))
        self.pdp_user_off |= set(cids)
        self._set_active(self.pdp_active - set(cids), "ME")
        self._state_changed()
        return Result()

    def _activate(self, cids: set[int]) -> Result:
        if not self.registered():
            return _cme(30)
        self.pdp_user_off -= cids
        self.pdp_net_off -= cids
        self._set_active(self.pdp_active | cids, "ME")
        self._state_changed()
        return Result()

    def _at_cgauth(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            lines = []
            for cid in sorted(self.pdp):
                prot, user, _ = self.pdp_auth.get(cid, (0, "", ""))
                # 27.007 §10.1.31: the read form never shows the password
                lines.append(f'+CGAUTH: {cid},{prot},"{user}"')
            return Result(lines=lines)
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or not args[0].isdigit() or not 1 <= int(args[0]) <= 15:
            return _cme(50)
        auth_prot = args[1] if len(args) > 1 and args[1] else "0"
        if auth_prot not in ("0", "1", "2", "3"):
            return _cme(50)
        user = args[2] if len(args) > 2 else ""
        password = args[3] if len(args) > 3 else ""
        self.pdp_auth[int(args[0])] = (int(auth_prot), user, password)
        return Result()

    def _at_cgcontrdp(self, cmd: Command) -> Result:
        args = split_args(cmd.args)
        if cmd.kind not in ("exec", "set") or len(args) > 1:
            return _cme(50)
        cids = self._cids(args)
        if cids is None:
            return _cme(50)
        lines = [
            contrdp_line(cid, self.pdp[cid][1], self.address_plan(cid), self.p.contrdp_form)
            for cid in cids
            if cid in self.pdp_active
        ]
        return Result(lines=lines)

    def _at_cgpaddr(self, cmd: Command) -> Result:
        args = split_args(cmd.args)
        cids = [int(a) for a in args if a.isdigit()] or sorted(self.pdp)
        lines = []
        for cid in cids:
            if cid in self.pdp_active:
                lines.append(f'+CGPADDR: {cid},"{self.address_plan(cid).address}"')
            elif cid in self.pdp:
                lines.append(f'+CGPADDR: {cid},"0.0.0.0"')
        return Result(lines=lines)

    def _at_cgerep(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(lines=[f"+CGEREP: {self.cgerep[0]},{self.cgerep[1]}"])
        args = split_args(cmd.args)
        if cmd.kind != "set" or not 1 <= len(args) <= 2 or args[0] not in ("0", "1", "2"):
            return _cme(50)
        bfr = args[1] if len(args) > 1 and args[1] else "0"
        if bfr not in ("0", "1"):
            return _cme(50)
        self.cgerep = (int(args[0]), int(bfr))
        return Result()

    # ------------------------------------------------- USB network function

    def _at_qcfg(self, cmd: Command) -> Result:
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or args[0].lower() != "usbnet" or len(args) > 2:
            return _cme(50)
        numbers = {v: k for k, v in QUECTEL_USBNET.items()}
        if len(args) == 1:
            shown = self.usbnet_pending or self.usbnet
            return Result(lines=[f'+QCFG: "usbnet",{QUECTEL_USBNET[shown]}'])
        if not args[1].isdigit() or int(args[1]) not in numbers:
            return _cme(50)
        # persisted, applied when the modem restarts (AT+CFUN=1,1), as Quectel documents
        self.usbnet_pending = numbers[int(args[1])]
        return Result()

    def _at_gtusbmode(self, cmd: Command) -> Result:
        numbers = {v: k for k, v in FIBOCOM_USBMODE.items()}
        if cmd.kind == "query":
            return Result(
                lines=[f"+GTUSBMODE: {FIBOCOM_USBMODE[self.usbnet_pending or self.usbnet]}"]
            )
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 1 or not args[0].isdigit():
            return _cme(50)
        if int(args[0]) not in numbers:
            return _cme(50)
        self.usbnet_pending = numbers[int(args[0])]
        return Result()

    def _dial(self, connect: bool, cid: int) -> Result:
        """The vendor connect/disconnect: connecting also activates the context."""
        if not self.dial_needed():
            return _cme(3)  # no AT data call in this USB mode (QMI/MBIM are driven elsewhere)
        if cid not in self.pdp:
            return _cme(50)
        if connect:
            result = self._activate({cid})
            if result.final != "OK":
                return result
            self.dialed.add(cid)
        else:
            self.dialed.discard(cid)
        self.on_change()
        return Result()

    def _at_qnetdevctl(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            op, cid, urc = self.qnetdevctl
            state = int(cid in self.dialed)
            return Result(lines=[f"+QNETDEVCTL: {op},{cid},{urc},{state}"])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) not in (2, 3) or not all(a.isdigit() for a in args):
            return _cme(50)
        op, cid = int(args[0]), int(args[1])
        urc = int(args[2]) if len(args) > 2 else 0
        if op not in (0, 1, 2, 3) or urc not in (0, 1):
            return _cme(50)
        # 1 connects now, 3 connects and keeps reconnecting, 2 only arms auto-connect
        result = self._dial(op in (1, 3), cid) if op != 2 else Result()
        if result.final == "OK":
            self.qnetdevctl = (op, cid, urc)
        return result

    def _at_gtrndis(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            if not self.dialed:
                return Result(lines=["+GTRNDIS: 0"])
            return Result(lines=[f"+GTRNDIS: 1,{min(self.dialed)}"])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 2 or args[0] not in ("0", "1"):
            return _cme(50)
        if not args[1].isdigit():
            return _cme(50)
        return self._dial(args[0] == "1", int(args[1]))

    def _at_qcrmcall(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(lines=[f"$QCRMCALL: {c},V4" for c in sorted(self.dialed)])
        args = split_args(cmd.args)
        # AT$QCRMCALL=<state>,<instance>[,<IP type>[,<tech>[,<profile>]]]
        if cmd.kind != "set" or len(args) < 2 or args[0] not in ("0", "1"):
            return _cme(50)
        if not all(a.isdigit() for a in args if a):
            return _cme(50)
        cid = int(args[4]) if len(args) > 4 and args[4] else 1
        result = self._dial(args[0] == "1", cid)
        if result.final == "OK" and args[0] == "1":
            result.lines = [f"$QCRMCALL: {args[1]},V4"]
        return result

    def _at_scact(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(lines=[f"!SCACT: {c},{int(c in self.dialed)}" for c in sorted(self.pdp)])
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 2 or args[0] not in ("0", "1"):
            return _cme(50)
        if not args[1].isdigit():
            return _cme(50)
        cid = int(args[1])
        result = self._dial(args[0] == "1", cid)
        if result.final == "OK" and args[0] == "0":
            # !SCACT=0 deactivates the context itself, as AT+CGACT=0 would
            self.pdp_user_off.add(cid)
            self._set_active(self.pdp_active - {cid}, "ME")
            self._state_changed()
        return result

    # -------------------------------------------------------------------- CFUN

    def _at_cfun(self, cmd: Command) -> Result:
        if cmd.kind == "query":
            return Result(lines=[f"+CFUN: {self.cfun}"])
        args = split_args(cmd.args)
        if cmd.kind != "set" or not args or args[0] not in ("0", "1", "4"):
            return _cme(50)
        fun = int(args[0])
        reset = len(args) > 1 and args[1] == "1"
        if reset:
            if fun != 1:
                return _cme(50)
            return Result(after=self.start_reset)
        self.set_cfun(fun)
        return Result()

    def set_cfun(self, fun: int) -> None:
        """Change the phone functionality level: 0 and 4 drop the radio, 1 brings it back."""
        if fun != 1 and self.p.refresh == "cfun":
            # Radio off powers the SIM down, even when it was already off: the card is read
            # afresh on the way up, with whatever profile it has enabled by then.
            self.pending_refresh = False
        if fun == self.cfun:
            return
        self.cfun = fun
        if fun != 1:
            self._detach()
        else:
            self._state_changed()
            self._schedule_attach()

    # -------------------------------------------------------------------- APDU

    def _apdu_reply(self, prefix: str, data: bytes) -> str:
        text = data.hex().upper()
        sep = " " if self.p.apdu_colon_space else ""
        return f'{prefix}:{sep}{len(text)},"{text}"'

    def _card_ready(self) -> Result | None:
        if self.card is None or self.sim_state == "absent":
            return _cme(10)
        return None

    def _at_ccho(self, cmd: Command) -> Result:
        if (err := self._card_ready()) is not None or self.card is None:
            return err or _cme(10)
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 1 or not is_hex(args[0]) or not args[0]:
            return _cme(50)
        try:
            channel = self.card.open_channel(bytes.fromhex(args[0]))
        except KeyError:
            return _cme(50)
        except RuntimeError:
            return _cme(14)
        if self.p.ccho_form == "hex_token":
            token = f"{self._rng.getrandbits(32) | 0x01000000:016x}"
        else:
            token = str(channel)
        self.sessions[token] = channel
        line = token if self.p.ccho_form == "bare" else f"+CCHO: {token}"
        return Result(lines=[line])

    def _session(self, sid: str) -> str | None:
        if sid in self.sessions:
            return sid
        for token in self.sessions:
            if token.lower() == sid.lower():
                return token
            if sid.isdigit() and token.isdigit() and int(sid) == int(token):
                return token
        return None

    def _at_cgla(self, cmd: Command) -> Result:
        if (err := self._card_ready()) is not None or self.card is None:
            return err or _cme(10)
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 3 or not args[1].isdigit():
            return _cme(50)
        token = self._session(args[0])
        hexdata = args[2]
        if token is None or not is_hex(hexdata) or int(args[1]) != len(hexdata) or not hexdata:
            return _cme(50)
        try:
            resp = self.card.transmit(self.sessions[token], bytes.fromhex(hexdata))
        except KeyError:
            return _cme(50)
        return Result(lines=[self._apdu_reply("+CGLA", resp)])

    def _at_cchc(self, cmd: Command) -> Result:
        if (err := self._card_ready()) is not None or self.card is None:
            return err or _cme(10)
        args = split_args(cmd.args)
        token = self._session(args[0]) if cmd.kind == "set" and len(args) == 1 else None
        if token is None:
            return _cme(50)
        channel = self.sessions.pop(token)
        try:
            self.card.close_channel(channel)
        except KeyError:
            return _cme(50)
        return Result()

    def _at_csim(self, cmd: Command) -> Result:
        if (err := self._card_ready()) is not None or self.card is None:
            return err or _cme(10)
        args = split_args(cmd.args)
        if cmd.kind != "set" or len(args) != 2 or not args[0].isdigit():
            return _cme(50)
        hexdata = args[1]
        if not is_hex(hexdata) or int(args[0]) != len(hexdata) or not hexdata:
            return _cme(50)
        resp = self.card.transmit_basic(bytes.fromhex(hexdata))
        return Result(lines=[self._apdu_reply("+CSIM", resp)])

    # ------------------------------------------------------------ control side

    def set_signal(self, **values: int | None) -> None:
        """Change signal measurements; unknown keys raise CoreError."""
        for key, value in values.items():
            if not hasattr(self.signal, key):
                raise CoreError(f"unknown signal field {key}")
            setattr(self.signal, key, None if value is None else int(value))
        if self.p.signal_urc and self.cfun == 1:
            ber = 99 if self.signal.ber is None else self.signal.ber
            self.emit_urc(self.p.signal_urc.format(csq=csq_index(self.signal.rssi_dbm), ber=ber))

    def set_registration(
        self,
        state: str | None = None,
        act: str | None = None,
        lac: int | str | None = None,
        tac: int | str | None = None,
        cell_id: int | str | None = None,
    ) -> None:
        """Change what the network grants; URCs follow for every CxREG with n > 0."""
        if state is not None:
            if state not in REG_STATES:
                raise CoreError(f"state must be one of {REG_STATES}")
            self.network.state = state
        if act is not None:
            if act not in ACT_CODES:
                raise CoreError(f"act must be one of {tuple(ACT_CODES)}")
            self.network.act = act
        for key, value in (("lac", lac), ("tac", tac), ("cell_id", cell_id)):
            if value is not None:
                num = int(value, 16) if isinstance(value, str) else int(value)
                setattr(self.network, key, num)
        self._state_changed()

    def set_operator(
        self, name: str | None = None, short: str | None = None, mcc_mnc: str | None = None
    ) -> None:
        """Change the serving operator's names."""
        if name is not None:
            self.operator.name = name
        if short is not None:
            self.operator.short = short
        if mcc_mnc is not None:
            if not mcc_mnc.isdigit() or len(mcc_mnc) not in (5, 6):
                raise CoreError("mcc_mnc must be 5 or 6 digits")
            self.operator.mcc_mnc = mcc_mnc
        self._state_changed()

    def set_operators(self, entries: list[dict[str, Any]]) -> None:
        """Replace the list AT+COPS=? reports."""
        try:
            self.operators = [ScanEntry(**e) for e in entries]
        except TypeError as exc:
            raise CoreError(str(exc)) from exc

    def set_link(self, state: str) -> None:
        """Data-path state of the simulated link: up, down or degraded."""
        if state not in ("up", "down", "degraded"):
            raise CoreError("link state must be up, down or degraded")
        self.link = state
        self.on_change()

    def set_sim(self, state: str) -> None:
        """Insert, remove or lock the SIM."""
        if state not in ("ready", "pin", "puk", "absent"):
            raise CoreError("sim state must be ready, pin, puk or absent")
        self.sim_state = state
        if state != "ready":
            self._close_sessions()
            self._detach()
        else:
            self._state_changed()
            self._schedule_attach()

    def mark_broken(self, iccid: str, broken: bool = True) -> None:
        """A broken profile never registers once enabled."""
        if broken:
            self.broken.add(iccid)
        else:
            self.broken.discard(iccid)
        prof = self._profile()
        if prof is not None and prof.iccid == iccid:
            if broken:
                self._detach()
            else:
                self._schedule_attach()

    def fault(self, kind: str, **params: Any) -> None:
        """Inject a fault (see docs/emulator.md); CoreError for an unknown kind."""
        duration = params.get("duration")
        if kind == "hang":
            self.faults.hang = True
            self._buf.clear()
            if duration is not None:
                self._later("hang", float(duration), lambda: self.clear("hang"))
        elif kind == "slow":
            self.faults.slow = float(params.get("delay", 2.0))
            if duration is not None:
                self._later("slow", float(duration), lambda: self.clear("slow"))
        elif kind == "garbage":
            data = self._garbage_bytes(params)
            if params.get("when", "now") == "next":
                self.faults.garbage_next = data
            else:
                self._emit(data)
        elif kind == "partial":
            text = str(params.get("text", "+CSQ: 1"))
            self._emit(b"\r\n" + text.encode("latin-1", "replace"))
        elif kind == "urc_interleave":
            self.faults.urc_interleave = int(params.get("count", 1))
            self.faults.urc_text = params.get("urc")
        elif kind == "error_once":
            command = str(params.get("command", "AT+CPIN?")).strip().upper()
            self.faults.error_once[command] = int(params.get("code", 10))
        elif kind == "reset":
            self.start_reset()
        else:
            raise CoreError(f"unknown fault kind {kind!r}")
        log.info("emu_fault", modem=self.cfg.id, kind=kind)

    def _garbage_bytes(self, params: dict[str, Any]) -> bytes:
        if "hex" in params:
            return bytes.fromhex(str(params["hex"]))
        if "text" in params:
            return str(params["text"]).encode("latin-1", "replace")
        count = int(params.get("count", 16))
        # no CR/LF: garbage that glues onto the next line is the harder case for a reader
        pool = [b for b in range(256) if b not in (0x0D, 0x0A)]
        return bytes(self._rng.choice(pool) for _ in range(count))

    def clear(self, kind: str | None = None) -> None:
        """Clear one fault kind or all of them; a cleared hang answers again."""
        if kind in (None, "hang"):
            self._cancel("hang")
            self.faults.hang = False
        if kind in (None, "slow"):
            self._cancel("slow")
            self.faults.slow = 0.0
        if kind in (None, "garbage"):
            self.faults.garbage_next = None
        if kind in (None, "urc_interleave"):
            self.faults.urc_interleave = 0
        if kind in (None, "error_once"):
            self.faults.error_once.clear()
        self._pump()

    def status(self) -> dict[str, Any]:
        """A JSON-ready snapshot for the control socket's `status`."""
        stat = self.reg_stat()
        names = {v: k for k, v in STAT_CODES.items()}
        prof = self._profile()
        return {
            "id": self.cfg.id,
            "vendor": self.p.name,
            "cfun": self.cfun,
            "registration": {
                "state": names.get(stat, "unknown"),
                "stat": stat,
                "act": self.network.act,
                "lac": self.network.lac,
                "tac": self.network.tac,
                "cell_id": self.network.cell_id,
                "pending_refresh": self.pending_refresh,
            },
            "network": asdict(self.network),
            "operator": asdict(self.operator),
            "signal": asdict(self.signal),
            "sim": self.sim_state,
            "iccid": prof.iccid if prof else None,
            "eid": self.card.eid if self.card is not None else self.cfg.eid,
            "link": self.link,
            "data_path": self.data_path(),
            "pdp": {str(c): c in self.pdp_active for c in sorted(self.pdp)},
            "usbnet": self.usbnet,
            "dialed": sorted(self.dialed),
            "dial_needed": self.dial_needed(),
            "data_cid": self.data_cid(),
            "cgerep": list(self.cgerep),
            "counters": {"rx_bytes": self.bytes_rx, "tx_bytes": self.bytes_tx},
            "faults": {
                "hang": self.faults.hang,
                "slow": self.faults.slow,
                "urc_interleave": self.faults.urc_interleave,
                "garbage_next": self.faults.garbage_next is not None,
                "resetting": self.resetting,
            },
            "settings": {
                "echo": self.echo,
                "verbose": self.verbose,
                "cmee": self.cmee,
                "reg_n": dict(self.reg_n),
            },
            "delays": asdict(self.delays),
            "broken": sorted(self.broken),
            "sessions": dict(self.sessions),
            "commands": self.commands_seen,
            "history": list(self.history)[-20:],
        }


def _q(value: float | None) -> str:
    """A Quectel numeric field: `-` where the modem does not know the value."""
    return "-" if value is None else str(value)
