"""One entry point from a recorded (command, reply) pair to the values the agent reads from it.

`interpret` is the function external checkers call (the conformance suite does): it never raises,
and reports invalid replies in the result instead (`error`, `ok: False`, `parse_ok: False`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from agent.at import parsers as p
from agent.errors import ParseError

Result = dict[str, object]

_FINAL_ERROR_RE = re.compile(
    r"^\s*(\+CME ERROR|\+CMS ERROR|ERROR|COMMAND NOT SUPPORT|NO CARRIER)\b", re.IGNORECASE | re.M
)
_REG = {"+CREG", "+CGREG", "+CEREG", "+C5GREG"}
_POWER = {0: "off", 1: "on", 4: "low"}


def _command_key(command: str) -> tuple[str, str, bool]:
    """('+CREG', '?', solicited) from 'AT+CREG?', 'URC +CREG', 'AT+CREG=2;+CREG?', 'AT+CCID / …'."""
    text = command.strip().upper()
    solicited = True
    if text.startswith("URC"):
        solicited = False
        text = text[3:].strip()
    text = text.split()[0] if text.split() else ""
    text = text.split(";")[-1]
    if text.startswith("AT"):
        text = text[2:]
    m = re.match(r"([+^!$%#*&]?[A-Z0-9]+)(=\?|\?|=.*)?$", text)
    if not m:
        return text, "", solicited
    suffix = m.group(2) or ""
    if suffix.startswith("=") and suffix != "=?":
        suffix = "="
    return m.group(1), suffix, solicited


def _registration(response: str, name: str, solicited: bool) -> Result:
    reg = p.parse_registration(response, kind=name.lstrip("+"), solicited=solicited)
    out: Result = {
        "reply_type": reg.kind,
        "reg_state": reg.state,
        "reg_state_mm": reg.state_detail,
        "stat_raw": reg.stat,
        "n": reg.n,
        "solicited": reg.solicited,
        "act": p.act_family(reg.act),
        "act_name": reg.act,
        "ci": reg.cell_id or 0,
    }
    if reg.kind in ("CREG", "CGREG"):
        out["lac"] = reg.lac or 0
    else:
        out["tac"] = reg.tac or 0
    return out


def _cops_test(response: str) -> Result:
    ops = p.parse_cops_test(response)
    return {
        "operators": [
            {
                "long": o.long,
                "short": o.short,
                "numeric": o.numeric,
                "status": o.status,
                "act": o.act,
            }
            for o in ops
        ]
    }


def _cops_read(response: str) -> Result:
    r = p.parse_cops_read(response)
    return {"mode": r.mode, "format": r.format, "operator": r.operator, "act": r.act}


def _cesq(response: str) -> Result:
    r = p.parse_cesq(response)
    return {
        "rxlev": r.rxlev,
        "ber": r.ber,
        "rscp_level": r.rscp,
        "ecn0_level": r.ecno,
        "rsrq_level": r.rsrq,
        "rsrp_level": r.rsrp,
        "gsm_valid": r.rssi_dbm is not None,
        "umts_valid": r.rscp_dbm is not None or r.ecno_db is not None,
        "lte_valid": r.rsrp_dbm is not None or r.rsrq_db is not None,
        "rssi_dbm": r.rssi_dbm,
        "rscp_dbm": r.rscp_dbm,
        "ecn0_db": r.ecno_db,
        "rsrq_db": r.rsrq_db,
        "rsrp_dbm": r.rsrp_dbm,
    }


def _csq(response: str) -> Result:
    rssi, ber = p.parse_csq(response)
    return {"rssi_dbm": rssi, "ber": ber}


def _hcsq(response: str) -> Result:
    r = p.parse_hcsq(response)
    return {
        "act": r.act,
        "mode": r.mode,
        "values_raw": list(r.values),
        "rssi_dbm": r.rssi_dbm,
        "rsrp_dbm": r.rsrp_dbm,
        "rsrq_db": r.rsrq_db,
        "sinr_db": r.sinr_db,
    }


def _cpsi(response: str) -> Result:
    r = p.parse_cpsi(response)
    return {
        "act": r.rat,
        "online": r.online,
        "mcc_mnc": r.mcc_mnc,
        "tac": r.tac,
        "ci": r.cell_id,
        "band": r.band,
        "rssi_dbm": r.rssi_dbm,
        "rsrp_dbm": r.rsrp_dbm,
        "rsrq_db": r.rsrq_db,
        "sinr_db": r.sinr_db,
    }


def _sysinfo(r: p.SysInfo) -> Result:
    return {
        "srv_status": r.srv_status,
        "srv_domain": r.srv_domain,
        "roam_status": r.roam_status,
        "sys_mode": r.sys_mode,
        "sim_state": r.sim_state,
        "lock_state": r.lock_state,
        "sys_submode": r.sys_submode,
        "sys_submode_valid": r.sys_submode is not None,
        "sys_mode_name": r.sys_mode_name,
        "sys_submode_name": r.sys_submode_name,
    }


def _smoni(response: str) -> Result:
    r = p.parse_smoni(response)
    return {
        "tech": r.tech,
        "rssi_dbm": r.rssi_dbm,
        "ecn0_db": r.ecn0_db,
        "rscp_dbm": r.rscp_dbm,
        "rsrp_dbm": r.rsrp_dbm,
        "rsrq_db": r.rsrq_db,
    }


def _cpin(response: str) -> Result:
    state = p.parse_cpin(response)
    # `lock` names the lock in force, so a ready SIM has none; `state` is SimStatus.state.
    return {
        "lock": "none" if state == "ready" else state,
        "state": state,
        "expect_prefix": bool(re.search(r"\+CPIN", response, re.I)),
    }


def _cfun(response: str) -> Result:
    fun = p.parse_cfun(response)
    return {"fun": fun, "power_state": _POWER.get(fun, "unknown")}


def _csim(response: str) -> Result:
    length, data = p.parse_csim(response)
    out: Result = {"length": length, "hex": data, "sw": data[-4:] if len(data) >= 4 else None}
    out["pin_retries"] = p.csim_pin_retries(data)
    return out


def _cgla(response: str) -> Result:
    length, data = p.parse_cgla(response)
    return {"length": length, "hex": data, "sw": data[-4:] if len(data) >= 4 else None}


def _ccho(response: str) -> Result:
    return {"session_id": p.parse_ccho(response)}


def _crsm(response: str) -> Result:
    sw1, sw2, data = p.parse_crsm(response)
    return {"sw1": sw1, "sw2": sw2, "hex": data}


def _cgdcont_test(response: str) -> Result:
    return {
        "formats": [
            {"min_cid": f.min_cid, "max_cid": f.max_cid, "pdp_type": f.pdp_type}
            for f in p.parse_cgdcont_test(response)
        ]
    }


def _cgdcont_read(response: str) -> Result:
    return {
        "contexts": [
            {"cid": c.cid, "pdp_type": p.pdp_family(c.pdp_type), "apn": c.apn}
            for c in p.parse_cgdcont_read(response)
        ]
    }


def _cgact(response: str) -> Result:
    return {"contexts": [{"cid": c, "active": a} for c, a in p.parse_cgact_read(response)]}


def _cgpaddr(response: str) -> Result:
    return {"addresses": [{"cid": c, "addresses": a} for c, a in p.parse_cgpaddr(response)]}


def _cpms(response: str) -> Result:
    m1, m2, m3 = p.parse_cpms_test(response)
    return {"mem1": m1, "mem2": m2, "mem3": m3}


def _cind(response: str) -> Result:
    return {
        "indicators": [
            {"name": i.name, "index": i.index, "min": i.min, "max": i.max}
            for i in p.parse_cind_test(response)
        ]
    }


def _cmer(response: str) -> Result:
    modes, ind = p.parse_cmer_test(response)
    return {"modes": modes, "ind": ind}


def _iccid(response: str) -> Result:
    return {"iccid": p.parse_iccid(response)}


def _gsn(response: str) -> Result:
    imei, esn, meid = p.parse_gsn(response)
    return {"imei": imei, "esn": esn, "meid": meid}


def _context_params(r: p.ContextParams) -> Result:
    return {
        "cid": r.cid,
        "bearer_id": r.bearer_id,
        "apn": r.apn,
        "local_address": r.local_address,
        "subnet": r.subnet,
        "gateway": r.gateway,
        "dns_primary": r.dns_primary,
        "dns_secondary": r.dns_secondary,
    }


def _cgcontrdp(response: str) -> Result:
    # The first line's values at the top level (one context, one family: the common case), and
    # every line under `contexts` (dual stack gives an IPv4 and an IPv6 line per cid).
    rows = p.parse_cgcontrdp(response)
    if not rows:
        raise ParseError("no +CGCONTRDP line", response)
    return {**_context_params(rows[0]), "contexts": [_context_params(r) for r in rows]}


def _cgev(response: str) -> Result:
    e = p.parse_cgev(response)
    return {
        "event": e.name,
        "origin": e.origin,
        "action": e.action,
        "pdn": e.pdn,
        "cid": e.cid,
        "parent_cid": e.parent_cid,
        "event_type": e.event_type,
        "pdp_type": p.pdp_family(e.pdp_type) if e.pdp_type else None,
        "pdp_address": e.pdp_address,
        "class": e.klass,
        "context_lost": e.context_lost,
    }


def _qnwinfo(response: str) -> Result:
    r = p.parse_qnwinfo(response)
    return {
        "act": r.act,
        "act_label": r.act_label,
        "operator_numeric": r.operator_numeric,
        "band": r.band,
        "channel": r.channel,
    }


def _xlec(response: str) -> Result:
    r = p.parse_xlec(response)
    return {"num_cc": r.num_cc, "primary_band": r.primary_band, "bands": list(r.bands)}


def _qcsq(response: str) -> Result:
    r = p.parse_qcsq(response)
    return {
        "act": r.rat,
        "rssi_dbm": r.rssi_dbm,
        "rsrp_dbm": r.rsrp_dbm,
        "rsrq_db": r.rsrq_db,
        "sinr_db": r.sinr_db,
    }


def _qeng(response: str) -> Result:
    cells = p.parse_qeng_servingcell(response)
    return {
        "state": cells[0].state,
        "cells": [
            {
                "act": c.rat,
                "mcc": c.mcc,
                "mnc": c.mnc,
                "cell_id": c.cell_id,
                "pci": c.pci,
                "earfcn": c.earfcn,
                "band": c.band,
                "tac": c.tac,
                "lac": c.lac,
                "rsrp_dbm": c.rsrp_dbm,
                "rsrq_db": c.rsrq_db,
                "rssi_dbm": c.rssi_dbm,
                "rscp_dbm": c.rscp_dbm,
                "sinr_db": c.sinr_db,
            }
            for c in cells
        ],
    }


def _cscs(response: str) -> Result:
    return {"charset": p.parse_cscs(response)}


_Handler = Callable[[str], Result]

# (command name, suffix) → handler; suffix None matches any suffix.
_HANDLERS: dict[tuple[str, str | None], _Handler] = {
    ("+COPS", "=?"): _cops_test,
    ("+COPS", "?"): _cops_read,
    ("+CESQ", None): _cesq,
    ("+CSQ", None): _csq,
    ("^HCSQ", None): _hcsq,
    ("+CPSI", None): _cpsi,
    ("^SYSINFO", None): lambda r: _sysinfo(p.parse_sysinfo(r)),
    ("^SYSINFOEX", None): lambda r: _sysinfo(p.parse_sysinfoex(r)),
    ("^SMONI", None): _smoni,
    ("+CPIN", None): _cpin,
    ("+CFUN", None): _cfun,
    ("+CSIM", None): _csim,
    ("+CGLA", None): _cgla,
    ("+CCHO", None): _ccho,
    ("+CCHC", None): lambda _r: {},
    ("+CRSM", None): _crsm,
    ("+CGDCONT", "=?"): _cgdcont_test,
    ("+CGDCONT", "?"): _cgdcont_read,
    ("+CGACT", None): _cgact,
    ("!SCACT", None): _cgact,
    ("+CGPADDR", None): _cgpaddr,
    ("+CPMS", "=?"): _cpms,
    ("+CIND", "=?"): _cind,
    ("+CMER", "=?"): _cmer,
    ("+CCID", None): _iccid,
    ("+ICCID", None): _iccid,
    ("^ICCID", None): _iccid,
    ("!ICCID", None): _iccid,
    ("+QCCID", None): _iccid,
    ("+CICCID", None): _iccid,
    ("^SCID", None): _iccid,
    ("+CGSN", None): _gsn,
    ("+GSN", None): _gsn,
    ("+CGCONTRDP", None): _cgcontrdp,
    ("+CGEV", None): _cgev,
    ("+QCFG", None): lambda r: {"usbnet": p.parse_usb_mode(r, "+QCFG")},
    ("+GTUSBMODE", None): lambda r: {"usb_mode": p.parse_usb_mode(r, "+GTUSBMODE")},
    ("+QNWINFO", None): _qnwinfo,
    ("+XLEC", None): _xlec,
    ("+QCSQ", None): _qcsq,
    ("+QENG", None): _qeng,
    ("+CSCS", None): _cscs,
}

_FAILURE_DEFAULTS: dict[str, Result] = {
    "+CGSN": {"imei": None, "esn": None, "meid": None},
    "+GSN": {"imei": None, "esn": None, "meid": None},
    "^HCSQ": {"act": "unknown"},
    "+QCSQ": {"act": "unknown"},
}


def _final_error(response: str) -> Result | None:
    m = _FINAL_ERROR_RE.search(response)
    if not m:
        return None
    line = response[m.start(1) :].splitlines()[0].strip()
    head = m.group(1).upper()
    if head == "+CME ERROR":
        code, text = p.parse_cme_error(line)
        return {"error": "cme", "code": code, "text": text}
    if head == "+CMS ERROR":
        code, text = p.parse_cms_error(line)
        return {"error": "cms", "code": code, "text": text}
    return {"error": line.lower() or "error", "code": None, "text": None}


def interpret(command: str, response: str) -> dict[str, object]:
    """Values read from `response` to `command` (conformance `expect` keys); never raises.

    Success adds `ok: True, parse_ok: True`; an invalid reply gives `error: <reason>`,
    `ok: False`, `parse_ok: False`; an unknown command gives `error: "unsupported command"`.
    """
    name, suffix, solicited = _command_key(command)
    try:
        failed = _final_error(response)
        if failed is not None:
            return {**failed, "ok": False, "parse_ok": False}
        if name in _REG:
            result = _registration(response, name, solicited)
        else:
            handler = _HANDLERS.get((name, suffix)) or _HANDLERS.get((name, None))
            if handler is None:
                return {"error": "unsupported command", "ok": False, "parse_ok": False}
            result = handler(response)
    except ParseError as exc:
        return {
            **_FAILURE_DEFAULTS.get(name, {}),
            "error": str(exc) or "unparseable",
            "ok": False,
            "parse_ok": False,
        }
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        # A parser bug must not take a checker down; report it like any other bad reply.
        return {"error": f"internal: {type(exc).__name__}: {exc}", "ok": False, "parse_ok": False}
    return {**result, "ok": True, "parse_ok": True}
