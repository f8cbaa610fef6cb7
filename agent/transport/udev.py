"""Device sources: what udev says about tty, usb, net and wwan devices, behind one small interface.

`DeviceSource` is the seam: `PyudevSource` reads the real udev database and follows its netlink
monitor; `FakeDeviceSource` is fed by hand (recorded properties in tests, the emulator's modems).
Nothing here knows about modems; `agent.transport.discovery` groups and classifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import structlog

from agent.errors import ConfigError

log = structlog.get_logger(__name__)

#: The subsystems a modem's parts live in.
SUBSYSTEMS = ("tty", "usb", "net", "wwan")
Action = Literal["add", "remove", "change"]


@dataclass(frozen=True)
class UdevDevice:
    """One device as udev records it: its sysfs path below /sys, properties, a few attributes."""

    subsystem: str
    devpath: str
    properties: Mapping[str, str] = field(default_factory=dict)
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def devnode(self) -> str | None:
        """The /dev node, if the device has one."""
        return self.properties.get("DEVNAME") or None

    @property
    def devtype(self) -> str | None:
        """DEVTYPE (usb_device, usb_interface, wwan_port, wwan, ...)."""
        return self.properties.get("DEVTYPE") or None

    @property
    def name(self) -> str:
        """The kernel name: the last component of the sysfs path (ttyUSB2, wwan0at0, wwan0)."""
        return self.devpath.rstrip("/").rsplit("/", 1)[-1]

    @property
    def links(self) -> tuple[str, ...]:
        """The stable symlinks udev made (/dev/serial/by-id/...)."""
        return tuple(self.properties.get("DEVLINKS", "").split())


@dataclass(frozen=True)
class DeviceEvent:
    """One udev event."""

    action: Action
    device: UdevDevice


class DeviceSource(Protocol):
    """Where devices come from: a snapshot, then the changes."""

    async def enumerate(self) -> list[UdevDevice]:
        """Every device of the followed subsystems present now."""
        ...

    def events(self) -> AsyncIterator[DeviceEvent]:
        """add/remove/change events from now on; ends when the source is closed."""
        ...

    async def close(self) -> None:
        """Stop following; pending `events()` iterators end."""
        ...


# ---- the real one -----------------------------------------------------------------------------


def _from_pyudev(dev: Any) -> UdevDevice:
    props = {str(k): str(v) for k, v in dev.properties.items()}
    attrs: dict[str, str] = {}
    # The WWAN port type lives only in sysfs (no udev property carries it).
    if props.get("DEVTYPE") == "wwan_port" or dev.subsystem == "wwan":
        with contextlib.suppress(Exception):
            value = dev.attributes.get("type")
            if value is not None:
                attrs["type"] = bytes(value).decode(errors="replace").strip()
        # A PCIe modem's identity is on its PCI function, which we do not follow: copy it.
        with contextlib.suppress(Exception):
            pci = dev.find_parent("pci")
            if pci is not None:
                attrs["pci_id"] = str(pci.properties.get("PCI_ID", ""))
                attrs["pci_vendor"] = str(pci.properties.get("ID_VENDOR_FROM_DATABASE", ""))
                attrs["pci_model"] = str(pci.properties.get("ID_MODEL_FROM_DATABASE", ""))
    return UdevDevice(
        subsystem=str(dev.subsystem),
        devpath=str(dev.device_path),
        properties=props,
        attributes={k: v for k, v in attrs.items() if v},
    )


def udev_devices(subsystems: Iterable[str] = SUBSYSTEMS) -> list[UdevDevice]:
    """The host's devices of these subsystems now (synchronous); empty where udev is missing."""
    try:
        import pyudev

        context = pyudev.Context()
        out: list[UdevDevice] = []
        for subsystem in subsystems:
            out.extend(_from_pyudev(d) for d in context.list_devices(subsystem=subsystem))
    except Exception as exc:  # no /run/udev in a container: no devices, not a failure
        log.info("udev_unavailable", error=str(exc))
        return []
    return out


class PyudevSource:
    """The host's udev: enumeration from its database, events from its netlink monitor."""

    def __init__(self, subsystems: Iterable[str] = SUBSYSTEMS) -> None:
        self.subsystems = tuple(subsystems)
        self._closed = asyncio.Event()

    async def enumerate(self) -> list[UdevDevice]:
        """Devices present now; empty (with a log line) where udev is not available."""
        return udev_devices(self.subsystems)

    async def events(self) -> AsyncIterator[DeviceEvent]:
        """Follow the udev monitor; ends at close() or when udev cannot be monitored."""
        try:
            import pyudev

            context = pyudev.Context()
            monitor = pyudev.Monitor.from_netlink(context)
            for subsystem in self.subsystems:
                monitor.filter_by(subsystem=subsystem)
            monitor.start()
        except Exception as exc:
            log.info("udev_monitor_unavailable", error=str(exc))
            return
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(monitor.fileno(), ready.set)
        try:
            while not self._closed.is_set():
                closed = asyncio.ensure_future(self._closed.wait())
                woke = asyncio.ensure_future(ready.wait())
                await asyncio.wait({closed, woke}, return_when=asyncio.FIRST_COMPLETED)
                closed.cancel()
                woke.cancel()
                ready.clear()
                while (dev := monitor.poll(timeout=0)) is not None:
                    action = str(dev.action)
                    if action in ("add", "remove", "change"):
                        yield DeviceEvent(action, _from_pyudev(dev))  # type: ignore[arg-type]
        finally:
            loop.remove_reader(monitor.fileno())

    async def close(self) -> None:
        """Stop following."""
        self._closed.set()


# ---- the fake one -----------------------------------------------------------------------------


class FakeDeviceSource:
    """A source fed by hand: recorded udev properties in tests, the emulator's modems."""

    def __init__(self, devices: Iterable[UdevDevice] = ()) -> None:
        self._devices: dict[str, UdevDevice] = {d.devpath: d for d in devices}
        self._queues: list[asyncio.Queue[DeviceEvent | None]] = []

    async def enumerate(self) -> list[UdevDevice]:
        """The devices present now."""
        return list(self._devices.values())

    def present(self) -> list[UdevDevice]:
        """The devices present now (synchronous view for tests)."""
        return list(self._devices.values())

    def events(self) -> AsyncIterator[DeviceEvent]:
        """Events emitted by add/remove/change from the moment of the call (not of iteration)."""
        queue: asyncio.Queue[DeviceEvent | None] = asyncio.Queue()
        self._queues.append(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[DeviceEvent | None]) -> AsyncIterator[DeviceEvent]:
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._queues.remove(queue)

    def _emit(self, event: DeviceEvent) -> None:
        for q in self._queues:
            q.put_nowait(event)

    def add(self, *devices: UdevDevice) -> None:
        """Devices appear (parents first, as the kernel announces them)."""
        for d in devices:
            self._devices[d.devpath] = d
            self._emit(DeviceEvent("add", d))

    def change(self, device: UdevDevice) -> None:
        """A device's properties change."""
        self._devices[device.devpath] = device
        self._emit(DeviceEvent("change", device))

    def remove(self, devpath_prefix: str) -> list[UdevDevice]:
        """Remove a device and everything below it (children first), as an unplug does."""
        gone = [
            d
            for p, d in self._devices.items()
            if p == devpath_prefix or p.startswith(devpath_prefix.rstrip("/") + "/")
        ]
        for d in sorted(gone, key=lambda d: -len(d.devpath)):
            del self._devices[d.devpath]
            self._emit(DeviceEvent("remove", d))
        return gone

    async def close(self) -> None:
        """End every events() iterator."""
        for q in self._queues:
            q.put_nowait(None)


def device_from_dict(data: Mapping[str, Any], where: str = "<udev>") -> UdevDevice:
    """One device from its recorded form {"subsystem", "devpath", "properties", "attributes"?}."""
    try:
        return UdevDevice(
            subsystem=str(data["subsystem"]),
            devpath=str(data["devpath"]),
            properties={str(k): str(v) for k, v in dict(data.get("properties", {})).items()},
            attributes={str(k): str(v) for k, v in dict(data.get("attributes", {})).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(where, "devices", f"a device needs subsystem, devpath: {exc}") from exc


def device_to_dict(device: UdevDevice) -> dict[str, Any]:
    """The recorded form of a device (inverse of device_from_dict)."""
    out: dict[str, Any] = {
        "subsystem": device.subsystem,
        "devpath": device.devpath,
        "properties": dict(device.properties),
    }
    if device.attributes:
        out["attributes"] = dict(device.attributes)
    return out


def load_recording(path: str | Path) -> tuple[dict[str, Any], list[UdevDevice]]:
    """A recorded fixture file: (its metadata, its devices)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(str(path), "<json>", str(exc)) from exc
    devices = [device_from_dict(d, str(path)) for d in data.get("devices", [])]
    meta = {k: v for k, v in data.items() if k != "devices"}
    return meta, devices
