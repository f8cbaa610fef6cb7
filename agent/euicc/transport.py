"""APDU transports to the ISD-R: over AT (CCHO/CGLA/CCHC, or CSIM + MANAGE CHANNEL) or in memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import stat
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Protocol

import structlog

from agent.at import parsers
from agent.errors import AgentError, ApduError, AtError, CmeError, ParseError, PortGoneError
from agent.euicc.apdu import (
    build,
    exchange,
    get_response,
    is_success,
    split_sw,
    store_data_blocks,
)

log = structlog.get_logger(__name__)

ISD_R_AID = bytes.fromhex("A0000005591010FFFFFFFF8900000100")
APDU_TIMEOUT_S = 30.0  # ordinary ES10 answers in ~1 s; enable may trigger slow card work
CHANNEL_TIMEOUT_S = 10.0
MODE_CGLA = "cgla"
MODE_CSIM = "csim"
GET_EID = bytes.fromhex("BF3E035C015A")  # harmless request that proves a kept channel still works
# Logical channels swept when stale ones may be open: eUICCs report three (TS 102 221 allows up
# to 19, but we need only one free, and every extra probe is a round-trip on a slow port).
SWEEP_CHANNELS = range(1, 4)
CME_SIM_BUSY = 14  # what modems answer AT+CCHO with when the card has no free channel
SW_NO_CHANNEL = 0x6A81  # MANAGE CHANNEL open refused: no free channel (function not supported)
SW_CHANNEL_NOT_OPEN = 0x6881

# Ports swept for stale channels by this process: a run that died mid-CCHO leaves channels
# open that no record names, so the first open after start closes whatever is open.
_swept_ports: set[str] = set()


class ChannelError(AgentError):
    """The ISD-R channel could not be opened by any method the modem offers."""

    def __init__(self, message: str, sw: int | None = None) -> None:
        super().__init__(message)
        self.sw = sw


def out_of_channels(exc: BaseException) -> bool:
    """True when an open failed because the card has no free logical channel."""
    if isinstance(exc, CmeError):
        return exc.code == CME_SIM_BUSY or "busy" in (exc.text or "").lower()
    return isinstance(exc, ChannelError) and exc.sw == SW_NO_CHANNEL


class ApduTransport(Protocol):
    """A channel to the ISD-R: open it, exchange APDUs (data + SW), close it."""

    @property
    def channel(self) -> int:
        """Logical channel number to put in the CLA of command APDUs."""
        ...

    async def open(self) -> None:
        """Open a logical channel and select the ISD-R on it."""
        ...

    async def close(self) -> None:
        """Close the channel; never raises for a channel the card already dropped."""
        ...

    async def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU; return response data followed by SW1 SW2."""
        ...


class AtReply(Protocol):
    """What the transport reads from an AT reply (agent.at.channel.AtResponse fits)."""

    @property
    def lines(self) -> tuple[str, ...]:
        """Information lines of the reply."""
        ...

    def values(self, prefix: str) -> list[str]:
        """Payloads after prefix: on lines carrying it."""
        ...


class AtCommander(Protocol):
    """The AT channel as the transport uses it (agent.at.channel.AtChannel fits)."""

    async def command(self, command: str, *, timeout: float | None = None) -> AtReply:
        """Send one command and return its reply; raises AtError and subclasses."""
        ...


# ------------------------------------------------------------------ replies and commands


MAX_SESSION_CHARS = parsers.MAX_SESSION_CHARS


def parse_session_id(lines: Sequence[str]) -> str:
    """The CCHO session id, read by agent.at.parsers (the parser interpret() uses)."""
    return parsers.parse_ccho("\n".join(lines))


def parse_apdu_reply(lines: Sequence[str], prefix: str) -> bytes:
    """Response APDU (data + SW1 SW2) of a +CGLA/+CSIM reply, read by agent.at.parsers."""
    return bytes.fromhex(parsers.parse_apdu_response("\n".join(lines), prefix)[1])


def csim_command(apdu: bytes) -> str:
    """AT+CSIM=<len>,"<HEX>" (length in hex characters)."""
    hexs = apdu.hex().upper()
    return f'AT+CSIM={len(hexs)},"{hexs}"'


def cgla_command(session: str, apdu: bytes) -> str:
    """AT+CGLA=<session>,<len>,"<HEX>" (length in hex characters)."""
    hexs = apdu.hex().upper()
    return f'AT+CGLA={session},{len(hexs)},"{hexs}"'


def channel_for_session(session: str) -> int:
    """Logical channel for the CLA: a small decimal session id is taken as the channel itself;
    opaque ids (Sierra's 64-bit tokens) get 0 because those modems route by session id."""
    if session.isascii() and session.isdigit() and len(session) <= 2 and 1 <= int(session) <= 19:
        return int(session)
    return 0


# ------------------------------------------------------------------ stale-channel record


def default_state_dir() -> Path:
    """Where open channels are recorded so a run after a crash can close them: a private per-user
    directory ($XDG_RUNTIME_DIR, else $XDG_STATE_HOME or ~/.local/state), never a shared /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "esim-agent"
    state = os.environ.get("XDG_STATE_HOME")
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "esim-agent"


# The record's contents go into AT commands: only these shapes are ever accepted from it.
_RECORD_MODES = ("", MODE_CGLA, MODE_CSIM)
_CGLA_SESSION_RE = re.compile(r"^[0-9A-Fa-f]{1,16}$")  # "1" or a 64-bit token like Sierra's
_RECORD_MAX_BYTES = 4096


def valid_session(mode: str | None, session: str) -> bool:
    """A session id we would put in AT+CCHC/CGLA (CCHO token) or MANAGE CHANNEL (1..19)."""
    if mode == MODE_CSIM:
        return (
            session.isascii()
            and session.isdigit()
            and len(session) <= 2
            and 1 <= int(session) <= 19
        )
    return bool(_CGLA_SESSION_RE.match(session))


def _private_dir(path: Path) -> bool:
    """Ours and writable by nobody else, so no other user can plant or swap a record in it."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


class _ChannelRecord:
    """A tiny JSON file per port: the dialect that worked and the channel left open, if any."""

    def __init__(self, state_dir: Path, port: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", port.strip("/")) or "port"
        self.dir = state_dir
        self.path = state_dir / f"euicc-{safe}.json"

    def load(self) -> dict[str, str]:
        """The record if it is ours and well-formed; {} (and a warning) for anything else."""
        if not self.path.exists():
            return {}
        if not _private_dir(self.dir):
            log.warning("euicc_channel_record_unsafe", path=str(self.path), reason="directory")
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    log.warning("euicc_channel_record_unsafe", path=str(self.path), reason="owner")
                    return {}
                raw = fh.read(_RECORD_MAX_BYTES + 1)
            data = json.loads(raw) if len(raw) <= _RECORD_MAX_BYTES else None
        except (OSError, ValueError):
            return {}
        record = _well_formed(data)
        if record is None:
            log.warning("euicc_channel_record_invalid", path=str(self.path))
            return {}
        return record

    def save(self, data: dict[str, str]) -> None:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private_dir(self.dir):
                log.warning("euicc_channel_record_unsafe", path=str(self.path), reason="directory")
                return
            tmp = self.path.with_suffix(".tmp")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(data))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("euicc_channel_record_failed", path=str(self.path), error=str(exc))


def _well_formed(data: object) -> dict[str, str] | None:
    """The record's fields when each has a shape we wrote; None for anything else."""
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return None
    mode = data.get("mode", "")
    session = data.get("session")
    cchc = data.get("cchc")
    if mode not in _RECORD_MODES or cchc not in (None, "missing"):
        return None
    if session is not None and (not mode or not valid_session(mode, session)):
        return None
    out = {"mode": mode}
    if session is not None:
        out["session"] = session
    if cchc is not None:
        out["cchc"] = cchc
    return out


# ------------------------------------------------------------------ AT transport


class AtApduTransport:
    """ISD-R channel over a modem's AT port; learns CCHO/CGLA vs CSIM, and CCHC's absence."""

    def __init__(
        self,
        at: AtCommander,
        port: str,
        *,
        aid: bytes = ISD_R_AID,
        mode: str | None = None,
        apdu_timeout: float = APDU_TIMEOUT_S,
        channel_timeout: float = CHANNEL_TIMEOUT_S,
        state_dir: Path | None = None,
    ) -> None:
        if mode not in (None, MODE_CGLA, MODE_CSIM):
            raise ValueError(f"unknown APDU mode {mode!r}")
        self._at = at
        self.port = port
        self.aid = aid
        self._explicit = mode
        self.mode = mode
        self.apdu_timeout = apdu_timeout
        self.channel_timeout = channel_timeout
        self._record = _ChannelRecord(state_dir or default_state_dir(), port)
        self._session: str | None = None
        self._channel = 0
        self._open = False
        self._no_cchc = False

    @property
    def channel(self) -> int:
        """Logical channel for the CLA."""
        return self._channel

    @property
    def session(self) -> str | None:
        """The CCHO session id (CGLA mode) or channel number (CSIM mode) while open."""
        return self._session

    async def open(self) -> None:
        """Reuse or close the channel an earlier run left, then open one: the configured dialect
        only, or the one that worked last time first (a tty can be another modem after replug)."""
        if self._open:
            return
        record = self._record.load()
        self._no_cchc = record.get("cchc") == "missing"
        if self._no_cchc and self._explicit in (None, MODE_CGLA) and await self._reuse(record):
            return
        await self._close_stale(record)
        if self.port not in _swept_ports:
            _swept_ports.add(self.port)
            await self._sweep("start")
        hint = self.mode or record.get("mode")
        if self._explicit is not None:
            order = [self._explicit]
        elif hint == MODE_CSIM:
            order = [MODE_CSIM, MODE_CGLA]
        else:
            order = [MODE_CGLA, MODE_CSIM]
        failures: list[str] = []
        for mode in order:
            if await self._open_mode(mode, failures):
                self._remember(mode)
                return
        raise ChannelError(f"{self.port}: cannot open the ISD-R channel ({'; '.join(failures)})")

    async def transmit(self, apdu: bytes) -> bytes:
        """Exchange one APDU on the open channel."""
        if not self._open or self._session is None:
            raise ChannelError(f"{self.port}: ISD-R channel is not open")
        if self.mode == MODE_CGLA:
            return await self._cgla(self._session, apdu)
        return await self._csim_raw(apdu)

    async def close(self) -> None:
        """Close the channel; errors from a card that already dropped it are logged, not raised.
        On a modem without AT+CCHC the session is kept and recorded for the next open to reuse,
        since it cannot be closed and each leaked one uses up a card channel."""
        if not self._open or self._session is None:
            return
        session, mode = self._session, self.mode
        self._open = False
        self._session = None
        if mode == MODE_CGLA and not self._no_cchc:
            try:
                await self._command(f"AT+CCHC={session}", self.channel_timeout)
            except PortGoneError:
                raise  # the record keeps the session: the next run closes it
            except AtError as exc:
                log.info("euicc_cchc_failed", port=self.port, session=session, error=str(exc))
                self._no_cchc = True
            else:
                self._save(mode, None)
                log.debug("euicc_channel_closed", port=self.port, mode=mode, session=session)
                return
        if mode == MODE_CGLA:
            self._save(mode, session)
            log.debug("euicc_channel_kept", port=self.port, session=session)
            return
        await self._close_session(mode, session)
        self._save(mode, None)
        log.debug("euicc_channel_closed", port=self.port, mode=mode, session=session)

    async def __aenter__(self) -> AtApduTransport:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------- internals

    async def _open_mode(self, mode: str, failures: list[str]) -> bool:
        """Open in one dialect; when the card is out of channels, sweep them and try once more."""
        for attempt in range(2):
            try:
                if mode == MODE_CGLA:
                    await self._open_ccho()
                else:
                    await self._open_csim()
            except PortGoneError:
                raise
            except (AtError, ParseError, ChannelError) as exc:
                if attempt == 0 and out_of_channels(exc):
                    log.warning(
                        "euicc_channels_exhausted", port=self.port, mode=mode, error=str(exc)
                    )
                    await self._sweep("exhausted")
                    continue
                failures.append(f"{mode}: {exc}")
                log.info("euicc_channel_mode_failed", port=self.port, mode=mode, error=str(exc))
                return False
            return True
        return False

    async def _sweep(self, reason: str) -> None:
        """Close logical channels no live owner holds: AT+CCHC by number, else MANAGE CHANNEL
        close over AT+CSIM (modems with opaque session tokens, or without CCHC)."""
        closed: list[int] = []
        for n in SWEEP_CHANNELS:
            if self._explicit != MODE_CSIM and not self._no_cchc:
                try:
                    await self._command(f"AT+CCHC={n}", self.channel_timeout)
                except PortGoneError:
                    raise
                except AtError:
                    pass  # not a session this modem knows by number: try the card itself
                else:
                    closed.append(n)
                    continue
            try:
                _, sw = split_sw(await self._csim_raw(build(0x00, 0x70, 0x80, n)))
            except PortGoneError:
                raise
            except (AtError, ParseError) as exc:
                log.debug("euicc_sweep_close_failed", port=self.port, channel=n, error=str(exc))
                continue
            if is_success(sw):
                closed.append(n)
        if closed:
            log.warning(
                "euicc_stale_channels_closed", port=self.port, reason=reason, channels=closed
            )
        else:
            log.debug("euicc_stale_channels_none", port=self.port, reason=reason)

    def _save(self, mode: str | None, session: str | None) -> None:
        data = {"mode": mode or ""}
        if session:
            data["session"] = session
        if self._no_cchc:
            data["cchc"] = "missing"
        self._record.save(data)

    async def _command(self, command: str, timeout: float) -> AtReply:
        """Run one AT command that a cancellation cannot cut short: an abandoned command is
        still answered by the modem, and that late reply would be read as the next one's."""
        task = asyncio.ensure_future(self._at.command(command, timeout=timeout))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task], timeout=timeout + 1.0)
            if task.done() and not task.cancelled():
                failed = task.exception() is not None
                if not failed and command.upper().startswith("AT+CCHO"):
                    # Opened but never ours to use: record it so the next open deals with it.
                    with contextlib.suppress(ParseError):
                        self._save(MODE_CGLA, parse_session_id(task.result().lines))
            raise

    async def _cgla(self, session: str, apdu: bytes) -> bytes:
        reply = await self._command(cgla_command(session, apdu), self.apdu_timeout)
        return parse_apdu_reply(reply.lines, "+CGLA")

    def _remember(self, mode: str) -> None:
        self.mode = mode
        self._open = True
        self._save(mode, self._session)
        log.debug("euicc_channel_opened", port=self.port, mode=mode, session=self._session)

    async def _reuse(self, record: dict[str, str]) -> bool:
        """Take over the session a run on a CCHC-less modem kept, if the ISD-R still answers."""
        session = record.get("session")
        if not session or record.get("mode") != MODE_CGLA:
            return False
        probe = store_data_blocks(GET_EID, channel_for_session(session))[0]
        try:
            _, sw = split_sw(await self._cgla(session, probe))
        except PortGoneError:
            raise
        except (AtError, ParseError, ApduError) as exc:
            log.info("euicc_kept_channel_gone", port=self.port, session=session, error=str(exc))
            self._save(MODE_CGLA, None)
            return False
        if not is_success(sw) and sw >> 8 != 0x61:
            log.info("euicc_kept_channel_gone", port=self.port, session=session, sw=f"{sw:04X}")
            return False
        if sw >> 8 == 0x61:
            # Drain the pending response so the next command starts clean.
            await exchange(partial(self._cgla, session), get_response(0, sw & 0xFF), 0)
        self._session, self._channel = session, channel_for_session(session)
        self._remember(MODE_CGLA)
        log.debug("euicc_channel_reused", port=self.port, session=session)
        return True

    async def _close_stale(self, record: dict[str, str]) -> None:
        stale = record.get("session")
        if not stale:
            return
        log.warning("euicc_stale_channel", port=self.port, mode=record.get("mode"), session=stale)
        await self._close_session(record.get("mode"), stale)
        self._save(record.get("mode"), None)

    async def _close_session(self, mode: str | None, session: str) -> None:
        try:
            if mode == MODE_CGLA:
                await self._command(f"AT+CCHC={session}", self.channel_timeout)
            elif mode == MODE_CSIM and session.isdigit():
                await self._csim_raw(build(0x00, 0x70, 0x80, int(session)))
        except PortGoneError:
            raise
        except (AtError, ParseError, ApduError) as exc:
            # The card drops its channels on REFRESH; some modems answer CCHC oddly.
            log.info("euicc_channel_close_failed", port=self.port, session=session, error=str(exc))

    async def _open_ccho(self) -> None:
        reply = await self._command(f'AT+CCHO="{self.aid.hex().upper()}"', self.channel_timeout)
        self._session = parse_session_id(reply.lines)
        self._channel = channel_for_session(self._session)

    async def _csim_raw(self, apdu: bytes) -> bytes:
        reply = await self._command(csim_command(apdu), self.apdu_timeout)
        return parse_apdu_reply(reply.lines, "+CSIM")

    async def _open_csim(self) -> None:
        data, sw = split_sw(await self._csim_raw(build(0x00, 0x70, 0x00, 0x00, le=1)))
        if not is_success(sw) or not data:
            raise ChannelError(f"{self.port}: MANAGE CHANNEL open refused: SW {sw:04X}", sw)
        channel = data[0]
        self._session, self._channel = str(channel), channel
        cla = channel if channel <= 3 else 0x40 | (channel - 4)
        select = build(cla, 0xA4, 0x04, 0x00, self.aid)
        self.mode = MODE_CSIM
        self._open = True
        try:
            _, sw = await exchange(self._csim_raw, select, channel)
            if not is_success(sw):
                raise ChannelError(f"{self.port}: SELECT ISD-R refused: SW {sw:04X}")
        except BaseException:
            await self.close()
            raise


# ------------------------------------------------------------------ in-memory transport


class CardLike(Protocol):
    """The card side of hw_fixtures.card_api.EmulatedCard that a direct transport needs."""

    def open_channel(self, aid: bytes) -> int:
        """Open a channel with aid selected."""
        ...

    def close_channel(self, channel: int) -> None:
        """Close a channel."""
        ...

    def transmit(self, channel: int, apdu: bytes) -> bytes:
        """One APDU on a channel."""
        ...


class CardTransport:
    """Talks to an in-process card object directly: tests and benchmarks of the LPA alone."""

    def __init__(self, card: CardLike, *, aid: bytes = ISD_R_AID) -> None:
        self._card = card
        self.aid = aid
        self._channel: int | None = None
        self.sent: list[bytes] = []

    @property
    def channel(self) -> int:
        """Logical channel for the CLA."""
        return self._channel or 0

    async def open(self) -> None:
        """Open a channel on the card."""
        if self._channel is None:
            self._channel = self._card.open_channel(self.aid)

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            self._card.close_channel(channel)

    async def transmit(self, apdu: bytes) -> bytes:
        """Hand the APDU to the card; yields to the loop like real I/O would."""
        if self._channel is None:
            raise ChannelError("card channel is not open")
        self.sent.append(apdu)
        await asyncio.sleep(0)
        return self._card.transmit(self._channel, apdu)
