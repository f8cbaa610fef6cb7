"""Find a modem's AT port by USB ids (udev) when the config names the device, not the tty."""

from __future__ import annotations

from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class TtyCandidate:
    """A tty with the USB identity udev reports for it."""

    path: str
    vendor: str | None
    product: str | None
    serial: str | None
    interface: str | None


def list_usb_ttys() -> list[TtyCandidate]:
    """Every tty udev knows with USB ids; empty where udev is not available."""
    try:
        import pyudev
    except ImportError:  # pragma: no cover - pyudev is a dependency
        return []
    try:
        context = pyudev.Context()
        devices = list(context.list_devices(subsystem="tty"))
    except Exception as exc:  # udev missing in containers: not an error, just no candidates
        log.debug("udev_unavailable", error=str(exc))
        return []
    out: list[TtyCandidate] = []
    for dev in devices:
        props = dev.properties
        vendor = props.get("ID_VENDOR_ID")
        if not vendor or not dev.device_node:
            continue
        out.append(
            TtyCandidate(
                path=str(dev.device_node),
                vendor=str(vendor).lower(),
                product=str(props.get("ID_MODEL_ID", "")).lower() or None,
                serial=props.get("ID_SERIAL_SHORT"),
                interface=props.get("ID_USB_INTERFACE_NUM"),
            )
        )
    return sorted(out, key=lambda c: c.path)


def match_usb(
    candidates: list[TtyCandidate], vendor: str, product: str, serial: str | None
) -> list[str]:
    """Paths of the candidates with these USB ids (hex, case-insensitive), in path order."""
    v, p = vendor.lower().removeprefix("0x"), product.lower().removeprefix("0x")
    return [
        c.path
        for c in candidates
        if c.vendor == v and c.product == p and (serial is None or c.serial == serial)
    ]
