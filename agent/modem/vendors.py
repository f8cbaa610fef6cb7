"""Vendor personalities as data: the generic 3GPP flow is the rule, these only name the exceptions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VendorProfile:
    """What differs between modem families; picked by the manufacturer string or configuration."""

    name: str
    #: Manufacturer substrings (lower case) that select this profile.
    match: tuple[str, ...] = ()
    #: ICCID commands in the order to try them; the first that answers is remembered.
    iccid_commands: tuple[str, ...] = (
        "AT+CCID",
        "AT+ICCID",
        "AT^ICCID?",
        "AT+QCCID",
        "AT!ICCID?",
        "AT+CICCID",
    )
    #: Extra signal commands (parsed by prefix) beyond 27.007's CSQ/CESQ.
    signal_commands: tuple[str, ...] = ()
    #: How the modem takes a new eUICC profile: auto (REFRESH works), cfun (0 then 1), reset (CFUN=1,1).
    refresh: str = "auto"


GENERIC = VendorProfile(name="generic")

VENDORS: tuple[VendorProfile, ...] = (
    VendorProfile(
        name="quectel",
        match=("quectel",),
        iccid_commands=("AT+QCCID", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT+QCSQ", 'AT+QENG="servingcell"'),
        # EC2x keep the old carrier's configuration after a REFRESH; a full reset is what works.
        refresh="cfun",
    ),
    VendorProfile(
        name="sierra",
        match=("sierra",),
        iccid_commands=("AT!ICCID?", "AT+CCID", "AT+ICCID"),
        signal_commands=(),
        refresh="cfun",
    ),
    VendorProfile(
        name="fibocom",
        match=("fibocom",),
        iccid_commands=("AT+ICCID", "AT+CCID"),
        refresh="auto",
    ),
    VendorProfile(
        name="simcom",
        match=("simcom", "sim tech"),
        iccid_commands=("AT+CICCID", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT+CPSI?",),
        refresh="auto",
    ),
    VendorProfile(
        name="dell",
        match=("dell",),
        iccid_commands=("AT+CCID", "AT+ICCID"),
        # DW5821e: no logical channels (CSIM only) and it takes a new profile only on reset.
        refresh="reset",
    ),
    VendorProfile(
        name="huawei",
        match=("huawei",),
        iccid_commands=("AT^ICCID?", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT^HCSQ?",),
        refresh="auto",
    ),
)


def vendor_by_name(name: str) -> VendorProfile:
    """The profile called name; generic when it is unknown or 'auto'."""
    for vendor in VENDORS:
        if vendor.name == name.lower():
            return vendor
    return GENERIC


def vendor_for_manufacturer(manufacturer: str | None) -> VendorProfile:
    """The profile whose match strings occur in the manufacturer string; generic otherwise."""
    text = (manufacturer or "").lower()
    for vendor in VENDORS:
        if any(m in text for m in vendor.match):
            return vendor
    return GENERIC
