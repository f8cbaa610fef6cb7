"""Vendor personalities as data: where real modems differ, the emulator differs by these fields."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Personality:
    """How one vendor's modem spells identity, ICCID, signal extensions and eUICC access."""

    name: str
    manufacturer: str
    model: str
    revision: str
    # command name (upper case, e.g. "+QCCID", "!ICCID") -> reply prefix (e.g. "+QCCID: ")
    iccid_commands: dict[str, str] = field(default_factory=lambda: {"+CCID": "+CCID: "})
    # plain: digits as the card says; padded: F-padded to 20; swapped: raw EF_ICCID nibble order
    iccid_form: str = "plain"
    # "int" (+CCHO: 1), "hex_token" (+CCHO: 00000000038aa32f), "bare" (a lone "1" line), "none"
    ccho_form: str = "int"
    has_cchc: bool = True
    # SIMCom answers +CGLA:4,"9000" with no space after the colon
    apdu_colon_space: bool = True
    # "=?" test commands rejected with ERROR (Fibocom FG132-GL, Sierra EM7590 do this)
    rejects_test_commands: bool = False
    # what makes the modem register on a newly enabled profile: auto | cfun | reset
    refresh: str = "auto"
    boot_urcs: tuple[str, ...] = ("RDY", "+CFUN: 1", "+CPIN: READY")
    # vendor signal commands served: qcsq, qeng, gstatus, cpsi, gtccinfo
    signal_extensions: frozenset[str] = frozenset()
    # emitted on every set_signal; {csq} and {ber} are substituted
    signal_urc: str | None = None
    # data-volume counter command served: "qgdcnt" (Quectel AT+QGDCNT) or None
    data_counter: str | None = None
    # USB network function the emulated modem exposes: ecm, rndis, ncm, qmi or mbim.
    # ECM and RNDIS are "router" modes: the modem runs DHCP for the host.
    usbnet: str = "ncm"
    # how the USB mode is read: "qcfg" (AT+QCFG="usbnet"), "gtusbmode" (AT+GTUSBMODE?) or None
    usbnet_command: str | None = None
    # vendor command that connects a context to the USB network function:
    # "qnetdevctl", "gtrndis", "qcrmcall", "scact" or None (AT+CGACT alone is enough)
    data_dial: str | None = None
    # the USB modes in which traffic passes only after that command
    dial_modes: frozenset[str] = frozenset()
    # AT+CGCONTRDP address and mask: "dotted" ("a.b.c.d.m.m.m.m", one parameter, as
    # 27.007 prints it for IPv4) or "split" ("a.b.c.d","m.m.m.m", two parameters)
    contrdp_form: str = "dotted"


USBNET_MODES = ("ecm", "rndis", "ncm", "qmi", "mbim")
ROUTER_MODES = frozenset({"ecm", "rndis"})
# AT+QCFG="usbnet",<n> numbering (Quectel): 0 RmNet/QMI, 1 ECM, 2 MBIM, 3 RNDIS, 5 NCM
QUECTEL_USBNET = {"qmi": 0, "ecm": 1, "mbim": 2, "rndis": 3, "ncm": 5}

PERSONALITIES: dict[str, Personality] = {
    p.name: p
    for p in (
        Personality(
            name="generic",
            manufacturer="Generic",
            model="EMU-LTE",
            revision="EMU_1.0.0",
        ),
        Personality(
            name="quectel",
            manufacturer="Quectel",
            model="EC25",
            revision="EC25EFAR06A06M4G",
            iccid_commands={"+QCCID": "+QCCID: ", "+CCID": "+CCID: "},
            iccid_form="padded",
            boot_urcs=("RDY", "+CFUN: 1", "+CPIN: READY", "+QUSIM: 1", "+QIND: SMS DONE"),
            signal_extensions=frozenset({"qcsq", "qeng"}),
            signal_urc='+QIND: "csq",{csq},{ber}',
            data_counter="qgdcnt",
            usbnet="ecm",
            usbnet_command="qcfg",
            data_dial="qnetdevctl",
            dial_modes=frozenset({"ecm", "rndis"}),
        ),
        Personality(
            name="sierra",
            manufacturer="Sierra Wireless, Incorporated",
            model="EM7455",
            revision="SWI9X30C_02.33.03.00",
            iccid_commands={"!ICCID": "!ICCID: "},
            ccho_form="hex_token",
            has_cchc=False,
            rejects_test_commands=True,
            refresh="cfun",
            boot_urcs=(),
            signal_extensions=frozenset({"gstatus"}),
            usbnet="qmi",
            data_dial="scact",
            dial_modes=frozenset({"qmi"}),
        ),
        Personality(
            name="fibocom",
            manufacturer="Fibocom Wireless Inc.",
            model="FM350-GL",
            revision="81600.0000.00.29.19.16",
            iccid_commands={"+ICCID": "+ICCID: ", "+CCID": "+CCID: "},
            ccho_form="bare",
            rejects_test_commands=True,
            signal_extensions=frozenset({"gtccinfo"}),
            usbnet="rndis",
            usbnet_command="gtusbmode",
            data_dial="gtrndis",
            dial_modes=frozenset({"ecm", "rndis"}),
            contrdp_form="split",
        ),
        Personality(
            name="simcom",
            manufacturer="SIMCOM INCORPORATED",
            model="SIMCOM_SIM7600E-H",
            revision="LE20B04SIM7600M22",
            iccid_commands={"+CICCID": "+ICCID: ", "+CCID": "+CCID: "},
            apdu_colon_space=False,
            boot_urcs=("RDY", "+CPIN: READY", "SMS DONE", "PB DONE"),
            signal_extensions=frozenset({"cpsi"}),
            usbnet="qmi",
            data_dial="qcrmcall",
            dial_modes=frozenset({"qmi"}),
        ),
        Personality(
            name="dell",
            manufacturer="Dell Inc.",
            model="DW5821e Snapdragon X20 LTE",
            revision="T77W968.F1.0.0.4.2.GC.009",
            ccho_form="none",
            has_cchc=False,
            refresh="reset",
            usbnet="mbim",
        ),
    )
}


def get_personality(name: str, **overrides: object) -> Personality:
    """The named personality with scenario overrides applied; KeyError for an unknown name."""
    base = PERSONALITIES[name.lower()]
    known = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **known)  # type: ignore[arg-type]
