"""The AT command channel: one command in flight, a queue behind it, URCs fanned out to subscribers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from agent.at import parsers
from agent.at.lines import LineReader
from agent.at.redact import loggable
from agent.errors import AtError, AtTimeout, CmeError, CmsError, ParseError, PortGoneError
from agent.transport.serial_port import SerialPort

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT_S = 5.0
RESYNC_TIMEOUT_S = 1.5
RESYNC_TRIES = 3
#: ModemManager's rule: after this many timeouts in a row the modem needs a re-probe.
TIMEOUTS_BEFORE_INVALID = 10

# Commands that legitimately take long: an operator scan, radio power changes, APDUs that may
# load a profile (tens of seconds per APDU have been seen), data context activation.
_SLOW_COMMANDS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(r"^AT\+COPS=\?", re.I), 180.0),
    (re.compile(r"^AT\+COPS=", re.I), 120.0),
    (re.compile(r"^AT\+CFUN=", re.I), 30.0),
    (re.compile(r"^AT\+CGACT=", re.I), 60.0),
    (re.compile(r"^AT\+(CGLA|CSIM)=", re.I), 60.0),
    (re.compile(r"^AT\+(CCHO|CCHC)=", re.I), 10.0),
)

_OK_FINALS = ("OK", "CONNECT")
_ERROR_FINALS = (
    "ERROR",
    "NO CARRIER",
    "BUSY",
    "NO ANSWER",
    "NO DIALTONE",
    "COMMAND NOT SUPPORT",
    "TOO MANY PARAMETERS",
)
# Lines that are unsolicited unless they answer the command in flight (27.007 and vendor URCs).
KNOWN_URCS = frozenset(
    {
        "+CREG",
        "+CGREG",
        "+CEREG",
        "+C5GREG",
        "RING",
        "+CRING",
        "+CMTI",
        "+CMT",
        "+CDS",
        "+CBM",
        "+CUSD",
        "+CIEV",
        "+CGEV",
        "+CPIN",
        "+CFUN",
        "RDY",
        "SMS DONE",
        "+QIND",
        "+QUSIM",
        "^MODE",
        "^RSSI",
        "^HCSQ",
        "^SYSSTART",
        "^BOOT",
        "^SIMST",
        "+PACSP",
        "+STKPCI",
        "+QSTK",
        "*EMRDY",
        "+SIMCARD",
        "PB DONE",
        "+CTZV",
        "+CTZE",
        "+NITZ",
        "+QNETDEVSTATUS",
        "+PBREADY",
        "+CPSI",
        "POWERED DOWN",
    }
)
_PREFIX_RE = re.compile(r"^([+^!*#$%@][A-Za-z0-9_]+)\s*:")
_CMD_RE = re.compile(r"[+^!*#$%@]?[A-Za-z0-9_]+")


def line_prefix(line: str) -> str:
    """The line's prefix ('+CREG' of '+CREG: 1'), or the whole upper-cased line if it has none."""
    m = _PREFIX_RE.match(line)
    return m.group(1).upper() if m else line.strip().upper()


def expected_prefixes(command: str) -> tuple[str, ...]:
    """The prefixes a command's own replies carry: AT+CREG=2;+CREG? -> ('+CREG',)."""
    body = command.strip()
    if body[:2].upper() == "AT":
        body = body[2:]
    out: list[str] = []
    for part in body.split(";"):
        m = _CMD_RE.match(part.strip())
        if m and m.group(0)[:1] in "+^!*#$%@":
            name = m.group(0).upper()
            if name not in out:
                out.append(name)
    return tuple(out)


def default_timeout(command: str) -> float:
    """The timeout a command gets when the caller names none."""
    for pattern, seconds in _SLOW_COMMANDS:
        if pattern.match(command.strip()):
            return seconds
    return DEFAULT_TIMEOUT_S


def classify_final(line: str) -> str | None:
    """'ok', 'error', 'cme', 'cms' for a final result code line; None otherwise."""
    upper = line.upper()
    if upper in _OK_FINALS or upper.startswith("CONNECT "):
        return "ok"
    if upper in _ERROR_FINALS:
        return "error"
    if upper.startswith("+CME ERROR"):
        return "cme"
    if upper.startswith("+CMS ERROR"):
        return "cms"
    return None


MAX_ERROR_CODE_DIGITS = parsers.MAX_ERROR_CODE_DIGITS


def parse_error_code(line: str) -> tuple[int | None, str | None]:
    """Split '+CME ERROR: 10' / '+CME ERROR: SIM not inserted' into (code, text).

    The parsers module reads it, so a numeric code also gets 27.007's wording.
    """
    try:
        if line.strip().upper().startswith("+CMS"):
            return parsers.parse_cms_error(line)
        return parsers.parse_cme_error(line)
    except ParseError:
        return None, None


@dataclass(frozen=True)
class AtResponse:
    """A successful reply: info lines (no echo, no URCs, no final code) and the final code."""

    command: str
    lines: tuple[str, ...]
    final: str = "OK"

    def values(self, prefix: str) -> list[str]:
        """Payloads of the lines carrying prefix ('+CSQ' -> ['21,99']); space after ':' optional."""
        want = prefix.upper()
        out: list[str] = []
        for line in self.lines:
            if line_prefix(line) == want:
                out.append(line.split(":", 1)[1].strip())
        return out

    def first(self, prefix: str) -> str | None:
        """The first payload for prefix, or None."""
        vals = self.values(prefix)
        return vals[0] if vals else None

    @property
    def text(self) -> str:
        """All info lines joined by newlines."""
        return "\n".join(self.lines)


@dataclass
class _Pending:
    command: str
    expected: tuple[str, ...]
    future: asyncio.Future[AtResponse]
    lines: list[str] = field(default_factory=list)
    # For resync: a final only counts once a line with this prefix has been seen.
    require: str | None = None
    seen_required: bool = False


UrcCallback = Callable[[str], None]


class AtChannel:
    """An AT command channel over one serial port; see docs/architecture.md for the contract."""

    def __init__(self, port: SerialPort) -> None:
        self._port = port
        self._reader = LineReader()
        self._lock = asyncio.Lock()
        self._pending: _Pending | None = None
        self._subscribers: dict[str, list[UrcCallback]] = {}
        self._dirty = False
        self._lost: PortGoneError | None = None
        self.consecutive_timeouts = 0
        self.lost_event = asyncio.Event()
        port.start(self._on_data, self._on_lost)

    @classmethod
    async def open(cls, path: str, *, baudrate: int = 115200) -> AtChannel:
        """Open the port exclusively and start reading."""
        return cls(await SerialPort.open(path, baudrate=baudrate))

    @property
    def port(self) -> str:
        """The port's path."""
        return self._port.path

    @property
    def is_lost(self) -> bool:
        """True once the port has gone away."""
        return self._lost is not None

    @property
    def lost(self) -> PortGoneError | None:
        """How the port went away (unplug, removal, close), once it has."""
        return self._lost

    @property
    def needs_reprobe(self) -> bool:
        """True after TIMEOUTS_BEFORE_INVALID timeouts in a row: the modem is not answering."""
        return self.consecutive_timeouts >= TIMEOUTS_BEFORE_INVALID

    def subscribe(self, prefixes: str | Iterable[str], callback: UrcCallback) -> Callable[[], None]:
        """Deliver URC lines with these prefixes ('*' for all) to callback; returns unsubscribe."""
        keys = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        keys = [k.upper() for k in keys]
        for key in keys:
            self._subscribers.setdefault(key, []).append(callback)

        def unsubscribe() -> None:
            for key in keys:
                callbacks = self._subscribers.get(key, [])
                if callback in callbacks:
                    callbacks.remove(callback)

        return unsubscribe

    async def command(self, command: str, *, timeout: float | None = None) -> AtResponse:
        """Send one command and return its reply; raises AtError and subclasses on failure."""
        if timeout is None:
            timeout = default_timeout(command)
        async with self._lock:
            if self._lost is not None:
                raise self._lost
            if self._dirty:
                await self._resync()
            try:
                response = await self._exchange(command, timeout)
            except AtTimeout:
                self.consecutive_timeouts += 1
                self._dirty = True
                log.warning(
                    "at_timeout",
                    port=self.port,
                    command=loggable(command),
                    timeout_s=timeout,
                    consecutive=self.consecutive_timeouts,
                )
                raise
            self.consecutive_timeouts = 0
            return response

    async def _exchange(
        self, command: str, timeout: float, *, require: str | None = None
    ) -> AtResponse:
        loop = asyncio.get_running_loop()
        pending = _Pending(
            command=command,
            expected=expected_prefixes(command),
            future=loop.create_future(),
            require=require.upper() if require else None,
        )
        # Whatever already arrived predates this command: complete lines are URCs; an unterminated
        # tail (a half-sent line, noise) would glue onto the echo or first reply line, so drop it.
        self._port.read_pending()
        if self._lost is not None:
            raise self._lost
        if stale := self._reader.pending():
            log.debug("at_stale_partial_dropped", port=self.port, text=stale)
        self._reader.reset()
        # Register the waiter before writing so a fast reply cannot be missed.
        self._pending = pending
        try:
            log.debug("at_send", port=self.port, command=loggable(command))
            await self._port.write(command.encode("latin-1", "replace") + b"\r", timeout=timeout)
            async with asyncio.timeout(timeout):
                return await pending.future
        except TimeoutError as exc:
            raise AtTimeout(
                f"{self.port}: no reply to {loggable(command)} within {timeout:g} s",
                loggable(command),
            ) from exc
        except asyncio.CancelledError:
            # The modem will still answer: its late reply must not answer the next command.
            self._dirty = True
            raise
        finally:
            self._pending = None
            fut = pending.future
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # the error was raised another way; mark it retrieved

    async def _resync(self) -> None:
        """Bring the modem back to a known state after a timeout or garbage."""
        self._reader.reset()
        for attempt in range(1, RESYNC_TRIES + 1):
            try:
                # ESC cancels a half-typed prompt; the +CMEE line proves the OK is ours, not a
                # late final code of the command that timed out.
                await self._port.write(b"\x1b\r", timeout=RESYNC_TIMEOUT_S)
                await self._exchange("AT+CMEE?", RESYNC_TIMEOUT_S, require="+CMEE")
            except AtTimeout:
                log.info("at_resync_retry", port=self.port, attempt=attempt)
                continue
            except PortGoneError:
                raise  # unplugged: no resync can help, and the caller must learn it
            except AtError:
                pass
            self._dirty = False
            log.info("at_resynced", port=self.port, attempt=attempt)
            return
        raise AtTimeout(f"{self.port}: modem does not answer (resync failed)", "AT")

    def _on_data(self, data: bytes) -> None:
        for line in self._reader.feed(data):
            self._on_line(line)

    def _on_line(self, line: str) -> None:
        pending = self._pending
        if pending is None or pending.future.done():
            self._dispatch_urc(line)
            return
        prefix = line_prefix(line)
        if not pending.lines and line.upper() == pending.command.strip().upper():
            return  # echo
        if pending.require is not None and prefix == pending.require:
            pending.seen_required = True
        kind = classify_final(line)
        if kind is not None:
            if pending.require is not None and not pending.seen_required:
                pending.lines.clear()  # a stale final from before the resync
                return
            self._finish(pending, kind, line)
            return
        if prefix in pending.expected:
            pending.lines.append(line)
        elif prefix in KNOWN_URCS or prefix in self._subscribers:
            self._dispatch_urc(line)
        else:
            pending.lines.append(line)

    def _finish(self, pending: _Pending, kind: str, line: str) -> None:
        if kind == "ok":
            pending.future.set_result(AtResponse(pending.command, tuple(pending.lines), line))
            return
        # Errors end up in logs and on terminals: never with a password or PIN in them.
        cmd = loggable(pending.command)
        if kind == "cme":
            code, text = parse_error_code(line)
            pending.future.set_exception(CmeError(code, text, cmd, line))
        elif kind == "cms":
            code, text = parse_error_code(line)
            pending.future.set_exception(CmsError(code, text, cmd, line))
        else:
            pending.future.set_exception(AtError(f"{cmd}: {line}", cmd, line))

    def _dispatch_urc(self, line: str) -> None:
        prefix = line_prefix(line)
        callbacks = self._subscribers.get(prefix, []) + self._subscribers.get("*", [])
        if not callbacks:
            log.debug("at_unsolicited", port=self.port, line=line)
            return
        for callback in callbacks:
            try:
                callback(line)
            except Exception:
                log.exception("urc_callback_failed", port=self.port, line=line)

    def _on_lost(self, exc: PortGoneError) -> None:
        self._lost = exc
        self.lost_event.set()
        pending = self._pending
        if pending is not None and not pending.future.done():
            pending.future.set_exception(exc)

    def mark_gone(self, reason: str) -> None:
        """The device went away (udev said so): fail the command in flight and every later one now,
        instead of after its timeout."""
        if self._lost is None:
            self._on_lost(PortGoneError(self.port, reason))

    async def close(self) -> None:
        """Release the port."""
        self._port.close()
        if self._lost is None:
            self._lost = PortGoneError(self.port, "channel closed")
        self.lost_event.set()

    async def __aenter__(self) -> AtChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
