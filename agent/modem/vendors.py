"""Vendor personalities as data: the generic 3GPP flow is the rule, these only name the exceptions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

#: USB network functions. ECM and RNDIS are "router" functions: the modem runs DHCP for the
#: host. NCM, QMI (RmNet) and MBIM want the host to put the granted address on the interface.
USB_MODES = ("ecm", "rndis", "ncm", "qmi", "mbim")
ROUTER_MODES = frozenset({"ecm", "rndis"})


@dataclass(frozen=True)
class DataDialect:
    """How a vendor's USB network function is brought up over AT (data, per USB mode).

    The generic rule is AT+CGDCONT then AT+CGACT; a vendor adds the command that connects the
    context to the USB function where its manual says traffic needs one, and names the modes
    whose data call cannot be made over AT at all (QMI/MBIM driven by their own protocol).
    """

    #: Command that reads the USB network mode, its reply prefix, and number → mode.
    mode_command: str | None = None
    mode_prefix: str | None = None
    modes: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    #: The mode to assume when the modem has no mode command (None: unknown, CGACT only).
    default_mode: str | None = None
    #: Connect/disconnect templates ({cid} is filled in) and the modes that need them.
    connect: str | None = None
    disconnect: str | None = None
    connect_modes: frozenset[str] = frozenset()
    #: Modes whose data call is made over QMI/MBIM, never over AT.
    not_at_modes: frozenset[str] = frozenset()


GENERIC_DATA = DataDialect()

QUECTEL_DATA = DataDialect(
    # Quectel AT manuals: AT+QCFG="usbnet",<n>: 0 RmNet (QMI), 1 ECM, 2 MBIM, 3 RNDIS, 5 NCM;
    # AT+QNETDEVCTL=<op>,<cid>,<urc_en> connects the context to ECM/RNDIS.
    mode_command='AT+QCFG="usbnet"',
    mode_prefix="+QCFG",
    modes=MappingProxyType({0: "qmi", 1: "ecm", 2: "mbim", 3: "rndis", 5: "ncm"}),
    connect="AT+QNETDEVCTL=1,{cid},1",
    disconnect="AT+QNETDEVCTL=0,{cid},0",
    connect_modes=frozenset({"ecm", "rndis"}),
    not_at_modes=frozenset({"qmi", "mbim"}),
)

FIBOCOM_DATA = DataDialect(
    # AT+GTUSBMODE numbers are module specific: 32 ECM / 33 RNDIS (FM150, FG621, L610 manuals),
    # 31 CDC-ECM (observed), 74/75 ECM/RNDIS (UIS8910 firmware), the emulator's 30/40/41. ECM
    # and RNDIS take AT+GTRNDIS=1,<cid> to pass traffic (treated alike: both are router modes).
    mode_command="AT+GTUSBMODE?",
    mode_prefix="+GTUSBMODE",
    modes=MappingProxyType(
        {
            30: "qmi",
            31: "ecm",
            32: "ecm",
            33: "rndis",
            40: "mbim",
            41: "ncm",
            74: "ecm",
            75: "rndis",
        }
    ),
    connect="AT+GTRNDIS=1,{cid}",
    disconnect="AT+GTRNDIS=0,{cid}",
    connect_modes=frozenset({"ecm", "rndis"}),
    not_at_modes=frozenset({"qmi", "mbim"}),
)

SIMCOM_DATA = DataDialect(
    # SIM7500/7600: the RmNet (QMI) interface passes traffic after AT$QCRMCALL=1,1 (instance 1,
    # which carries the default context).
    default_mode="qmi",
    connect="AT$QCRMCALL=1,1",
    disconnect="AT$QCRMCALL=0,1",
    connect_modes=frozenset({"qmi"}),
)

SIERRA_DATA = DataDialect(
    # Sierra (GobiNet/QMI compositions): AT!SCACT=1,<cid> starts the data session.
    default_mode="qmi",
    connect="AT!SCACT=1,{cid}",
    disconnect="AT!SCACT=0,{cid}",
    connect_modes=frozenset({"qmi"}),
)

DELL_DATA = DataDialect(
    # DW5821e: its data function is MBIM only.
    default_mode="mbim",
    not_at_modes=frozenset({"mbim"}),
)


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
    #: How its data connection is brought up over AT.
    data: DataDialect = GENERIC_DATA


GENERIC = VendorProfile(name="generic")

VENDORS: tuple[VendorProfile, ...] = (
    VendorProfile(
        name="quectel",
        match=("quectel",),
        iccid_commands=("AT+QCCID", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT+QCSQ", 'AT+QENG="servingcell"'),
        # EC2x keep the old carrier's configuration after a REFRESH; a full reset is what works.
        refresh="cfun",
        data=QUECTEL_DATA,
    ),
    VendorProfile(
        name="sierra",
        match=("sierra",),
        iccid_commands=("AT!ICCID?", "AT+CCID", "AT+ICCID"),
        signal_commands=(),
        refresh="cfun",
        data=SIERRA_DATA,
    ),
    VendorProfile(
        name="fibocom",
        match=("fibocom",),
        iccid_commands=("AT+ICCID", "AT+CCID"),
        refresh="auto",
        data=FIBOCOM_DATA,
    ),
    VendorProfile(
        name="simcom",
        match=("simcom", "sim tech"),
        iccid_commands=("AT+CICCID", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT+CPSI?",),
        refresh="auto",
        data=SIMCOM_DATA,
    ),
    VendorProfile(
        name="dell",
        match=("dell",),
        iccid_commands=("AT+CCID", "AT+ICCID"),
        # DW5821e: no logical channels (CSIM only) and it takes a new profile only on reset.
        refresh="reset",
        data=DELL_DATA,
    ),
    VendorProfile(
        name="huawei",
        match=("huawei",),
        iccid_commands=("AT^ICCID?", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT^HCSQ?",),
        refresh="auto",
    ),
    VendorProfile(
        name="cinterion",
        match=("cinterion", "thales", "gemalto"),
        iccid_commands=("AT^SCID", "AT+CCID", "AT+ICCID"),
        signal_commands=("AT^SMONI",),
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
