"""The addresses an emulated network grants, and how 27.007 prints them (pure).

Address plan in `--net netns` mode, modem at position N (0-based) of the emulator:

* operator subnet 198.18.N.0/24, gateway 198.18.N.1 (the far end of the modem's veth);
* context <cid> is granted 198.18.N.<cid + 1> (context 1: 198.18.N.2);
* DNS: primary 198.18.N.1 (the operator namespace's own server), secondary SERVER_ADDRESS;
* SERVER_ADDRESS 198.19.0.1 is "the internet": the same address exists in every operator
  namespace, so one probe target reaches whichever operator the traffic is routed to.

In loopback mode the plan is the historical 10.64.N.<cid + 1>/24, DNS 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SERVER_ADDRESS = "198.19.0.1"
MAX_MODEMS = 250


@dataclass(frozen=True)
class ContextAddress:
    """What the network grants one PDP context."""

    address: str
    prefix: int
    gateway: str
    dns: tuple[str, ...]

    @property
    def mask(self) -> str:
        """The prefix as a dotted IPv4 mask."""
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix}").netmask)

    @property
    def network(self) -> str:
        """The subnet in CIDR form."""
        return str(ipaddress.IPv4Interface(f"{self.address}/{self.prefix}").network)


def loopback_context(index: int, cid: int) -> ContextAddress:
    """The address plan of loopback mode (no real interface carries it)."""
    base = f"10.64.{index % 256}"
    return ContextAddress(f"{base}.{cid + 1}", 24, f"{base}.1", ("127.0.0.1",))


def netns_context(index: int, cid: int) -> ContextAddress:
    """The address plan of netns mode for the modem at position index."""
    if not 0 <= index < MAX_MODEMS:
        raise ValueError(f"modem index {index} outside 0..{MAX_MODEMS - 1}")
    if not 1 <= cid <= 253:
        raise ValueError(f"cid {cid} outside 1..253")
    base = f"198.18.{index}"
    return ContextAddress(f"{base}.{cid + 1}", 24, f"{base}.1", (f"{base}.1", SERVER_ADDRESS))


def gateway_interface(index: int) -> str:
    """The operator side's address with prefix (198.18.N.1/24)."""
    return f"198.18.{index}.1/24"


def contrdp_line(cid: int, apn: str, ctx: ContextAddress, form: str = "dotted") -> str:
    """One +CGCONTRDP line (27.007 §10.1.23) for an active IPv4 context.

    `dotted` prints <local_addr and subnet_mask> as one "a.b.c.d.m.m.m.m" string, as the
    standard's IPv4 form and most modems do; `split` prints address and mask as two strings.
    The bearer id counts from 5, the first EPS bearer id.
    """
    local = f'"{ctx.address}","{ctx.mask}"' if form == "split" else f'"{ctx.address}.{ctx.mask}"'
    dns = list(ctx.dns[:2]) + [""] * (2 - len(ctx.dns[:2]))
    return f'+CGCONTRDP: {cid},{cid + 4},"{apn}",{local},"{ctx.gateway}","{dns[0]}","{dns[1]}"'
