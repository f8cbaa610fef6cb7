"""The generic 3GPP TS 27.007 modem driver: reads identity, SIM, signal, registration, operator."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

from agent.at import parsers
from agent.at.channel import AtChannel, AtResponse, line_prefix
from agent.at.redact import loggable
from agent.errors import AtError, AtTimeout, CmeError, ParseError
from agent.models import (
    Identity,
    ModemInfo,
    Operator,
    Registration,
    ScanResult,
    Signal,
    SimStatus,
)
from agent.modem.vendors import GENERIC, VendorProfile, vendor_by_name, vendor_for_manufacturer

log = structlog.get_logger(__name__)

PROBE_TRIES = 3
PROBE_TIMEOUT_S = 3.0
SCAN_TIMEOUT_S = 180.0
#: 27.007 +CME ERROR codes that mean "no SIM".
_CME_SIM_ABSENT = {10, 13}
_CME_SIM_LOCKS = {11: "sim-pin", 12: "sim-puk", 17: "sim-pin2", 18: "sim-puk2"}
# Most specific registration first: a 5G/EPS registration says more than a CS one.
_REG_QUERIES = ("AT+C5GREG?", "AT+CEREG?", "AT+CGREG?", "AT+CREG?")
_REG_ENABLE = ("AT+CREG=2", "AT+CGREG=2", "AT+CEREG=2", "AT+C5GREG=2")
_REGISTERED = ("home", "roaming")


class Modem:
    """One modem behind an AtChannel; every read tolerates a rejected command (the field is None)."""

    def __init__(self, channel: AtChannel, vendor: VendorProfile | None = None) -> None:
        self.channel = channel
        self.vendor = vendor or GENERIC
        self._vendor_fixed = vendor is not None
        self._iccid_command: str | None = None
        self._charset = "GSM"
        self._supported: dict[str, bool] = {}
        self._identity: Identity | None = None
        self.last_registration = Registration()
        self.registration_changed = asyncio.Event()
        channel.subscribe(("+CREG", "+CGREG", "+CEREG", "+C5GREG"), self._on_reg_urc)

    @property
    def port(self) -> str:
        """The serial port path."""
        return self.channel.port

    async def probe(self, *, answer_within: float | None = None) -> None:
        """Wait until the modem answers AT, then switch echo off and enable numeric errors.

        answer_within bounds the wait for that first OK (a person at a terminal wants to hear
        quickly that a port is not a modem); without it a booting modem gets PROBE_TRIES tries.
        """
        if answer_within is not None:
            await self._first_answer(answer_within)
        else:
            for attempt in range(1, PROBE_TRIES + 1):
                try:
                    await self.channel.command("AT", timeout=PROBE_TIMEOUT_S)
                    break
                except AtTimeout:
                    if attempt == PROBE_TRIES:
                        raise
        for cmd in ("ATE0", "AT+CMEE=1"):
            await self._try(cmd)
        for cmd in _REG_ENABLE:
            await self._try(cmd)
        resp = await self._try("AT+CSCS?")
        if resp is not None and (value := resp.first("+CSCS")) is not None:
            with contextlib.suppress(ParseError):
                self._charset = parsers.parse_cscs(value)
        if not self._vendor_fixed:
            ident = await self.identity()
            self.vendor = vendor_for_manufacturer(ident.manufacturer)
        log.debug("modem_probed", port=self.port, vendor=self.vendor.name, charset=self._charset)

    async def _first_answer(self, within: float) -> None:
        """One plain AT answered within `within` seconds, or AtTimeout saying what that means."""
        try:
            async with asyncio.timeout(within):
                await self.channel.command("AT", timeout=within)
        except TimeoutError:
            raise AtTimeout(
                f"{self.port}: no answer to AT within {within:g} s (not a modem's AT port?)", "AT"
            ) from None

    async def _try(self, command: str, *, timeout: float | None = None) -> AtResponse | None:
        """Run a command whose failure only means 'not supported here'; timeouts still raise."""
        try:
            return await self.channel.command(command, timeout=timeout)
        except AtTimeout:
            raise
        except AtError as exc:
            log.debug("at_rejected", port=self.port, command=loggable(command), error=str(exc))
            return None

    async def identity(self) -> Identity:
        """Manufacturer, model, revision and IMEI (None when the modem has an ESN/MEID instead).

        Read once per connection: a modem does not change identity without re-enumerating,
        and then it is a new Modem object.
        """
        if self._identity is not None:
            return self._identity
        manufacturer = _single_value(await self._try("AT+CGMI"), "+CGMI")
        model = _single_value(await self._try("AT+CGMM"), "+CGMM")
        revision = _single_value(await self._try("AT+CGMR"), "+CGMR")
        sn_reply = await self._try("AT+CGSN")
        imei: str | None = None
        if sn_reply is not None and sn_reply.lines:
            with contextlib.suppress(ParseError):
                imei = parsers.parse_gsn(sn_reply.text)[0]
        self._identity = Identity(
            manufacturer=manufacturer, model=model, revision=revision, imei=imei
        )
        return self._identity

    async def sim_state(self) -> str:
        """ready, absent, unknown, or the lock (sim-pin, sim-puk, ph-net-pin, ...)."""
        try:
            resp = await self.channel.command("AT+CPIN?")
        except CmeError as exc:
            if exc.code in _CME_SIM_ABSENT or (exc.text and "not inserted" in exc.text.lower()):
                return "absent"
            if exc.code in _CME_SIM_LOCKS:
                return _CME_SIM_LOCKS[exc.code]
            return "unknown"
        except AtTimeout:
            raise
        except AtError:
            return "unknown"
        value = resp.first("+CPIN") or (resp.lines[0] if resp.lines else "")
        try:
            return parsers.parse_cpin(value)
        except ParseError:
            return "unknown"

    async def read_iccid(self) -> str | None:
        """The ICCID of the active SIM/profile as digits, or None when none can be read."""
        commands = self.vendor.iccid_commands
        if self._iccid_command is not None:
            commands = (self._iccid_command,)
        for cmd in commands:
            resp = await self._try(cmd)
            if resp is None or not resp.lines:
                continue
            for line in resp.lines:
                try:
                    iccid = parsers.parse_iccid(line)
                except ParseError:
                    continue
                self._iccid_command = cmd
                return iccid
        return None

    async def sim_status(self) -> SimStatus:
        """SIM state and ICCID."""
        state = await self.sim_state()
        iccid = await self.read_iccid() if state not in ("absent",) else None
        return SimStatus(state=state, iccid=iccid)

    async def signal(self) -> Signal:
        """RSSI/BER from CSQ; RSRP/RSRQ from CESQ; SINR and better values from vendor commands."""
        sig = Signal()
        resp = await self._try("AT+CSQ")
        if resp is not None and (v := resp.first("+CSQ")) is not None:
            with contextlib.suppress(ParseError):
                sig.rssi_dbm, sig.ber = parsers.parse_csq(v)
        resp = await self._try("AT+CESQ")
        if resp is not None and (v := resp.first("+CESQ")) is not None:
            with contextlib.suppress(ParseError):
                cesq = parsers.parse_cesq(v)
                sig.rsrp_dbm = cesq.rsrp_dbm
                sig.rsrq_db = cesq.rsrq_db
                if sig.rssi_dbm is None and cesq.rssi_dbm is not None:
                    sig.rssi_dbm = int(cesq.rssi_dbm)
        for cmd in self.vendor.signal_commands:
            if self._supported.get(cmd) is False:
                continue
            resp = await self._try(cmd)
            self._supported[cmd] = resp is not None
            if resp is not None:
                _merge_vendor_signal(sig, resp)
        return sig

    async def registration(self) -> Registration:
        """The most specific registration the modem reports (5GS, EPS, PS, then CS)."""
        best: Registration | None = None
        for cmd in _REG_QUERIES:
            if self._supported.get(cmd) is False:
                continue
            resp = await self._try(cmd)
            self._supported[cmd] = resp is not None
            if resp is None:
                continue
            prefix = cmd[2:-1]
            value = resp.first(prefix)
            if value is None:
                continue
            try:
                reply = parsers.parse_registration(f"{prefix}: {value}", solicited=True)
            except ParseError:
                continue
            reg = _to_registration(reply)
            if reg.state in _REGISTERED:
                best = reg
                break
            if best is None or (best.state == "unknown" and reg.state != "unknown"):
                best = reg
        self.last_registration = best or Registration()
        return self.last_registration

    async def operator(self) -> Operator:
        """Operator name (long alphanumeric) and MCC/MNC (numeric format)."""
        numeric = await self._cops_read(2)
        name = await self._cops_read(0)
        return Operator(name=name, mcc_mnc=numeric)

    async def _cops_read(self, fmt: int) -> str | None:
        if await self._try(f"AT+COPS=3,{fmt}") is None and fmt != 0:
            return None
        resp = await self._try("AT+COPS?")
        if resp is None or (value := resp.first("+COPS")) is None:
            return None
        try:
            read = parsers.parse_cops_read(value, self._charset)
        except ParseError:
            return None
        if read.operator is None:
            return None
        if fmt == 2 and not read.operator.isdigit():
            return None
        return read.operator

    async def info(self) -> ModemInfo:
        """Everything `modem info` shows; a rejected command leaves its fields None."""
        identity = await self.identity()
        sim = await self.sim_status()
        signal = await self.signal()
        registration = await self.registration()
        operator = await self.operator() if registration.state in _REGISTERED else Operator()
        return ModemInfo(
            identity=identity, sim=sim, signal=signal, registration=registration, operator=operator
        )

    async def scan(self, *, timeout: float = SCAN_TIMEOUT_S) -> ScanResult:
        """Run an operator scan (AT+COPS=?); slow, as a real network search is."""
        resp = await self.channel.command("AT+COPS=?", timeout=timeout)
        # The whole reply: long lists continue on lines without the +COPS: prefix.
        text = resp.text
        return ScanResult(operators=parsers.parse_cops_test(text, self._charset) if text else [])

    async def set_cfun(self, fun: int, *, reset: bool = False) -> None:
        """Set the functionality level; reset=True sends AT+CFUN=1,1 and the port re-announces."""
        await self.channel.command(f"AT+CFUN={fun},1" if reset else f"AT+CFUN={fun}")

    async def cfun(self) -> int | None:
        """The current functionality level."""
        resp = await self._try("AT+CFUN?")
        if resp is None or (value := resp.first("+CFUN")) is None:
            return None
        try:
            return parsers.parse_cfun(value)
        except ParseError:
            return None

    async def data_active(self, cid: int | None = None) -> bool | None:
        """Whether a PDP context (cid, or any) is active; None if the modem will not say."""
        resp = await self._try("AT+CGACT?")
        if resp is None:
            return None
        try:
            contexts = parsers.parse_cgact_read(resp.text)
        except ParseError:
            return None
        return any(active for c, active in contexts if cid is None or c == cid)

    async def activate_data(self, cid: int = 1) -> None:
        """Activate a PDP context."""
        await self.channel.command(f"AT+CGACT=1,{cid}")

    async def wait_registered(self, timeout: float, *, poll_s: float = 1.0) -> Registration:
        """Wait for home/roaming registration, woken by URCs and polling; AtTimeout on deadline."""
        deadline = time.monotonic() + timeout
        while True:
            self.registration_changed.clear()
            reg = await self.registration()
            if reg.state in _REGISTERED:
                return reg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AtTimeout(f"{self.port}: not registered after {timeout:g} s", "AT+CREG?")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(poll_s, remaining)):
                    await self.registration_changed.wait()

    def _on_reg_urc(self, line: str) -> None:
        try:
            reply = parsers.parse_registration(line, solicited=False)
        except ParseError:
            log.debug("registration_urc_unparsed", port=self.port, line=line)
            return
        reg = _to_registration(reply)
        log.info("registration_urc", port=self.port, state=reg.state, act=reg.act)
        self.last_registration = reg
        self.registration_changed.set()

    async def close(self) -> None:
        """Release the port."""
        await self.channel.close()


def _single_value(resp: AtResponse | None, prefix: str) -> str | None:
    """The value of a one-line identity reply, with or without its +CGxx: prefix or quotes."""
    if resp is None or not resp.lines:
        return None
    value = resp.first(prefix)
    text = value if value is not None else resp.lines[0]
    text = text.strip().strip('"').strip()
    return text or None


def _to_registration(reply: parsers.RegReply) -> Registration:
    return Registration(
        state=reply.state,
        act=reply.act,
        lac=reply.lac,
        tac=reply.tac,
        cell_id=reply.cell_id,
    )


def vendor_signal(line: str) -> dict[str, float | None]:
    """Signal values from one vendor extension line (QCSQ, QENG, CPSI, HCSQ, SMONI); {} otherwise."""
    prefix = line_prefix(line)
    if prefix == "+QCSQ":
        q = parsers.parse_qcsq(line)
        return {
            "rssi_dbm": q.rssi_dbm,
            "rsrp_dbm": q.rsrp_dbm,
            "rsrq_db": q.rsrq_db,
            "sinr_db": q.sinr_db,
        }
    if prefix == "+QENG":
        cells = parsers.parse_qeng_servingcell(line)
        if not cells:
            return {}
        c = cells[0]
        return {
            "rssi_dbm": c.rssi_dbm,
            "rsrp_dbm": c.rsrp_dbm,
            "rsrq_db": c.rsrq_db,
            "sinr_db": c.sinr_db,
        }
    if prefix == "+CPSI":
        cpsi = parsers.parse_cpsi(line)
        return {
            "rssi_dbm": cpsi.rssi_dbm,
            "rsrp_dbm": cpsi.rsrp_dbm,
            "rsrq_db": cpsi.rsrq_db,
            "sinr_db": cpsi.sinr_db,
        }
    if prefix == "^HCSQ":
        h = parsers.parse_hcsq(line)
        return {
            "rssi_dbm": h.rssi_dbm,
            "rsrp_dbm": h.rsrp_dbm,
            "rsrq_db": h.rsrq_db,
            "sinr_db": h.sinr_db,
        }
    if prefix == "^SMONI":
        m = parsers.parse_smoni(line)
        return {"rssi_dbm": m.rssi_dbm, "rsrp_dbm": m.rsrp_dbm, "rsrq_db": m.rsrq_db}
    return {}


def _merge_vendor_signal(sig: Signal, resp: AtResponse) -> None:
    """Fold vendor signal extensions into sig where they add what 27.007 did not give."""
    for line in resp.lines:
        try:
            extra = vendor_signal(line)
        except ParseError:
            continue
        for name, value in extra.items():
            if value is not None and getattr(sig, name) is None:
                setattr(sig, name, int(value) if name == "rssi_dbm" else float(value))


@contextlib.asynccontextmanager
async def open_modem(
    port: str, *, vendor: str | None = None, probe: bool = True, answer_within: float | None = None
) -> AsyncIterator[Modem]:
    """Open a port exclusively, probe the modem, and release the port on exit."""
    channel = await AtChannel.open(port)
    modem = Modem(channel, vendor_by_name(vendor) if vendor and vendor != "auto" else None)
    try:
        if probe:
            await modem.probe(answer_within=answer_within)
        yield modem
    finally:
        await modem.close()
