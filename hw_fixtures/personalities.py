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
        ),
        Personality(
            name="dell",
            manufacturer="Dell Inc.",
            model="DW5821e Snapdragon X20 LTE",
            revision="T77W968.F1.0.0.4.2.GC.009",
            ccho_form="none",
            has_cchc=False,
            refresh="reset",
        ),
    )
}


def get_personality(name: str, **overrides: object) -> Personality:
    """The named personality with scenario overrides applied; KeyError for an unknown name."""
    base = PERSONALITIES[name.lower()]
    known = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **known)  # type: ignore[arg-type]
