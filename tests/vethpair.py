"""A veth pair across two network namespaces of our own, for tests about real interfaces.

`near` (esa0, 198.18.0.1/30) plays the modem's interface, `far` (esa1, 198.18.0.2/30) the network
behind it. Both namespaces get unique `esa-` names and are removed even when the test fails;
nothing touches the host's own interfaces.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from pyroute2 import IPRoute, netns

NEAR_IF, FAR_IF = "esa0", "esa1"
NEAR_ADDR, FAR_ADDR = "198.18.0.1", "198.18.0.2"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@dataclass
class VethPair:
    near: str
    far: str

    def set_far_up(self, up: bool) -> None:
        """The peer's admin state: down takes the carrier of the near end away."""
        with IPRoute(netns=self.far, flags=0) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=FAR_IF)[0], state="up" if up else "down")

    def addr(self, command: str, address: str, prefixlen: int = 32) -> None:
        """Add or delete an address on the near end."""
        with IPRoute(netns=self.near, flags=0) as ipr:
            index = ipr.link_lookup(ifname=NEAR_IF)[0]
            ipr.addr(command, index=index, address=address, prefixlen=prefixlen)

    def send(self, from_far: bool, payload: bytes, count: int) -> None:
        """UDP datagrams across the pair (near → far, or far → near); nobody needs to listen."""
        ns, dst = (self.far, NEAR_ADDR) if from_far else (self.near, FAR_ADDR)
        sock = netns.create_socket(ns, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(count):
                sock.sendto(payload, (dst, 9))
        finally:
            sock.close()


@contextmanager
def veth_pair() -> Iterator[VethPair]:
    tag = secrets.token_hex(4)
    near, far = f"esa-{tag}-n", f"esa-{tag}-f"
    netns.create(near)
    try:
        netns.create(far)
        try:
            with IPRoute(netns=near, flags=0) as ipr:
                ipr.link("add", ifname=NEAR_IF, kind="veth", peer=FAR_IF)
                far_index = ipr.link_lookup(ifname=FAR_IF)[0]
                ipr.link("set", index=far_index, net_ns_fd=far)
                index = ipr.link_lookup(ifname=NEAR_IF)[0]
                ipr.addr("add", index=index, address=NEAR_ADDR, prefixlen=30)
                ipr.link("set", index=index, state="up")
            with IPRoute(netns=far, flags=0) as ipr:
                index = ipr.link_lookup(ifname=FAR_IF)[0]
                ipr.addr("add", index=index, address=FAR_ADDR, prefixlen=30)
                ipr.link("set", index=index, state="up")
            yield VethPair(near=near, far=far)
        finally:
            netns.remove(far)
    finally:
        netns.remove(near)
