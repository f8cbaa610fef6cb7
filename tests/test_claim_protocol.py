"""The group emergency claim protocol, pure: a deterministic story, then random kills, heals,
link cuts and partitions across 3-5 simulated devices sharing one simulated broker."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

from agent.siblings.claim import (
    BrokerDown,
    BrokerUp,
    ClaimAction,
    ClaimConfig,
    ClaimEvent,
    ClaimSeen,
    ClaimState,
    ClaimTick,
    LocalState,
    PublishClaim,
    ReleaseClaim,
    SiblingSeen,
    Sleep,
    Synced,
    Wake,
    initial_claim_state,
    step,
)

TTL = 30.0
SWITCH = 20.0
STABLE = 40.0


# --- a simulated broker and devices ---------------------------------------------------------


@dataclass
class Msg:
    kind: str  # "avail" | "state" | "claim" | "up" | "synced" | "down"
    device: str
    value: Any = None
    seq: int = 0
    at: float = 0.0


@dataclass
class Device:
    name: str
    holder: bool
    alive: bool = True
    link_up: bool = True  # a carrier's own higher layer works
    reachable: bool = True  # can reach the broker
    sos_works: bool = True
    machine: ClaimState | None = None
    profile_awake: bool = False

    @property
    def connected(self) -> bool:
        return self.alive and self.reachable

    def connectivity(self) -> bool:
        return (self.link_up and not self.holder) or (
            self.holder and self.profile_awake and self.sos_works
        )


@dataclass
class World:
    devices: dict[str, Device]
    order: tuple[str, ...]
    now: float = 0.0
    retained: dict[tuple[str, str], Msg] = field(default_factory=dict)
    inbox: dict[str, list[Msg]] = field(default_factory=dict)
    wakes_while_cut_off: int = 0
    wakes: int = 0

    def publish(self, msg: Msg) -> None:
        sender = self.devices[msg.device]
        if not sender.connected:
            return  # a publish without a broker is lost
        self._broker_publish(msg)

    def _broker_publish(self, msg: Msg) -> None:
        msg.at = self.now
        key = (msg.kind, msg.device)
        if msg.kind == "claim" and msg.value is None:
            self.retained.pop(key, None)
        else:
            self.retained[key] = msg
        for d in self.devices.values():
            if d.connected:
                self.inbox[d.name].append(msg)

    def connect(self, name: str) -> None:
        d = self.devices[name]
        live = [
            m
            for m in self.retained.values()
            if not (m.kind == "claim" and self.now - m.at >= TTL)  # message expiry at the broker
        ]
        self.inbox[name] = [Msg("up", name), *live, Msg("synced", name)]
        self.publish(Msg("avail", name, True))
        self.publish_state(d)

    def drop(self, name: str) -> None:
        """The connection dies: the broker fires the Last Will, the device notices."""
        self.inbox[name] = []
        self._broker_publish(Msg("avail", name, False))
        d = self.devices[name]
        if d.alive and d.holder:
            self.feed(d, BrokerDown(now=self.now))

    def publish_state(self, d: Device) -> None:
        self.publish(Msg("state", d.name, d.connectivity()))

    def feed(self, d: Device, event: ClaimEvent) -> None:
        assert d.machine is not None
        d.machine, actions = step(d.machine, event)
        self.carry_out(d, actions)

    def carry_out(self, d: Device, actions: list[ClaimAction]) -> None:
        for a in actions:
            if isinstance(a, PublishClaim):
                self.publish(Msg("claim", d.name, a.ttl, a.seq))
            elif isinstance(a, ReleaseClaim):
                self.publish(Msg("claim", d.name, None))
            elif isinstance(a, Wake):
                self.wakes += 1
                if not d.connected:
                    self.wakes_while_cut_off += 1
                d.profile_awake = True
                self.publish_state(d)
                self.feed(d, LocalState(now=self.now, higher_up=False, connected=d.connectivity()))
            elif isinstance(a, Sleep):
                d.profile_awake = False
                self.publish_state(d)
                self.feed(d, LocalState(now=self.now, higher_up=False, connected=False))

    def deliver(self, name: str) -> None:
        d = self.devices[name]
        while self.inbox[name]:
            m = self.inbox[name].pop(0)
            if not d.holder or not d.alive:
                continue
            self.feed(d, self.event(m))

    def event(self, m: Msg) -> ClaimEvent:
        if m.kind == "up":
            return BrokerUp(now=self.now)
        if m.kind == "synced":
            return Synced(now=self.now)
        if m.kind == "avail":
            return SiblingSeen(device=m.device, now=self.now, online=m.value)
        if m.kind == "state":
            return SiblingSeen(device=m.device, now=self.now, connectivity=m.value)
        return ClaimSeen(device=m.device, now=self.now, ttl=m.value, seq=m.seq)

    def start(self, name: str) -> None:
        d = self.devices[name]
        d.alive, d.profile_awake = True, False
        if d.holder:
            others = tuple(n for n in self.devices if n != name)
            cfg = ClaimConfig(
                device=name,
                group="family",
                order=self.order,
                others=others,
                ttl=TTL,
                switch_timeout=SWITCH,
                failback_stable=STABLE,
            )
            # seq grows across restarts, like the wall-clock seed the adapter uses
            d.machine = initial_claim_state(cfg, self.now, seq=int(self.now * 1000) + 1_000_000)
        if d.reachable:
            self.connect(name)

    def tick(self, dt: float) -> None:
        self.now += dt
        for d in self.devices.values():
            if d.alive and d.holder:
                self.feed(d, ClaimTick(now=self.now))

    def awake(self) -> list[str]:
        return [d.name for d in self.devices.values() if d.alive and d.profile_awake]

    def settle(self) -> None:
        for _ in range(4):
            for n in self.devices:
                self.deliver(n)


def make_world(n: int, holders: int, broken: set[int] | None = None) -> World:
    names = [f"d{i}" for i in range(n)]
    holder_names = names[n - holders :]
    devices = {
        name: Device(name=name, holder=name in holder_names, sos_works=i not in (broken or set()))
        for i, name in enumerate(names)
    }
    w = World(devices=devices, order=tuple(holder_names), inbox={m: [] for m in names})
    for name in names:
        w.start(name)
    w.settle()
    return w


# --- actions on the world -------------------------------------------------------------------


def kill(w: World, name: str) -> None:
    d = w.devices[name]
    if not d.alive:
        return
    d.alive = False
    d.profile_awake = False  # a dead device carries nothing (its modem may still be on)
    if d.reachable:
        w.drop(name)


def heal(w: World, name: str) -> None:
    d = w.devices[name]
    d.link_up = True
    if not d.alive:
        d.reachable = True
        w.start(name)
        return
    if not d.reachable:
        d.reachable = True
        w.connect(name)
    w.publish_state(d)


def cut(w: World, name: str) -> None:
    d = w.devices[name]
    d.link_up = False
    if d.alive:
        w.publish_state(d)


def partition(w: World, name: str) -> None:
    d = w.devices[name]
    if d.alive and d.reachable:
        d.reachable = False
        w.drop(name)


def test_story_one_wakes_then_the_next_when_it_fails_then_sleep() -> None:
    # d0 phone, d1 watch carry higher layers; d2, d3 hold the emergency; d2's profile is broken.
    w = make_world(4, 2, broken={2})
    assert w.awake() == []
    cut(w, "d0")
    kill(w, "d1")
    w.settle()
    w.tick(0.1)
    w.settle()
    assert w.awake() == ["d2"]  # first in order wakes, alone
    for _ in range(5):
        w.tick(SWITCH / 4)
        w.settle()
    assert w.awake() == ["d3"]  # d2 never got connectivity: the next one tried
    heal(w, "d0")
    w.settle()
    w.tick(STABLE - 1)
    w.settle()
    assert w.awake() == ["d3"]
    w.tick(1.5)
    w.settle()
    assert w.awake() == []
    assert not any(k[0] == "claim" for k in w.retained)


def test_partitioned_holder_never_wakes_on_its_stale_view() -> None:
    w = make_world(3, 1)
    partition(w, "d2")
    cut(w, "d0")
    kill(w, "d1")
    w.settle()
    for _ in range(10):
        w.tick(TTL)
        w.settle()
    assert w.awake() == []
    heal(w, "d2")
    w.settle()
    w.tick(0.1)
    w.settle()
    assert w.awake() == ["d2"]


def test_awake_claimant_cut_off_sleeps_and_the_next_waits_for_its_claim_to_expire() -> None:
    w = make_world(4, 2)
    cut(w, "d0")
    cut(w, "d1")
    w.tick(0.1)
    w.settle()
    assert w.awake() == ["d2"]
    partition(w, "d2")
    assert w.awake() == []  # it cannot refresh its claim: it sleeps at once
    w.tick(TTL - 1)
    w.settle()
    assert w.awake() == []  # d3 honours d2's claim until it expires
    w.tick(1.5)
    w.settle()
    assert w.awake() == ["d3"]


def test_a_claim_that_reaches_the_broker_first_wins() -> None:
    cfg = ClaimConfig(device="b", group="g", order=("a", "b"), others=("a", "x"), ttl=TTL)
    s = initial_claim_state(cfg, 0.0)
    for ev in (
        BrokerUp(now=0),
        SiblingSeen(device="x", now=0, online=True, connectivity=False),
        SiblingSeen(device="a", now=0, online=False),
        Synced(now=0),
    ):
        s, acts = step(s, ev)
    assert acts == [PublishClaim(seq=1, ttl=TTL)]  # a is offline: b's turn
    s, acts = step(s, ClaimSeen(device="a", now=1, ttl=TTL, seq=7))  # a was back and first
    assert acts == [ReleaseClaim()]
    s, acts = step(s, ClaimSeen(device="b", now=1, ttl=TTL, seq=1))  # the echo of ours, late
    assert not any(isinstance(a, Wake) for a in acts)
    assert not s.awake


def test_a_claimant_whose_claim_stops_echoing_sleeps_before_the_others_may_wake() -> None:
    # A silent partition: the broker session looks alive (no BrokerDown for as long as the
    # MQTT keepalive takes), but nothing we publish comes back. The other holder lets our
    # claim go TTL after it last heard it; we must be asleep before that.
    mine = ClaimConfig(device="b", group="g", order=("b", "c"), others=("a", "c"), ttl=TTL)
    theirs = ClaimConfig(device="c", group="g", order=("b", "c"), others=("a", "b"), ttl=TTL)
    b, c = initial_claim_state(mine, 0.0), initial_claim_state(theirs, 0.0)
    for ev in (
        BrokerUp(now=0),
        SiblingSeen(device="a", now=0, online=False),
        Synced(now=0),
    ):
        b, _ = step(b, ev)
        c, _ = step(c, ev)
    b, acts = step(b, SiblingSeen(device="c", now=0, online=True, connectivity=False))
    assert acts == [PublishClaim(seq=1, ttl=TTL)]  # b is first in order
    c, _ = step(c, SiblingSeen(device="b", now=0, online=True, connectivity=False))
    b, acts = step(b, ClaimSeen(device="b", now=0.01, ttl=TTL, seq=1))  # the echo: b wakes
    assert any(isinstance(a, Wake) for a in acts)
    c, _ = step(c, ClaimSeen(device="b", now=0.01, ttl=TTL, seq=1))  # c hears it too
    last_heard = 0.01
    now, slept_at, c_woke_at = 0.01, None, None
    while now < 3 * TTL and (slept_at is None or c_woke_at is None):
        now += TTL / 6  # the daemon ticks at least every ttl/6; nothing reaches the broker
        b, acts = step(b, ClaimTick(now=now))
        if slept_at is None and any(isinstance(a, Sleep) for a in acts):
            slept_at = now
        c, acts = step(c, ClaimTick(now=now))
        if c_woke_at is None and any(isinstance(a, PublishClaim) for a in acts):
            c_woke_at = now  # c claims (its wake needs the echo of that, later still)
    assert slept_at is not None
    assert c_woke_at is not None
    assert c_woke_at >= last_heard + TTL
    assert slept_at < c_woke_at
    assert not b.awake


def test_no_wake_while_a_device_was_never_heard_from() -> None:
    cfg = ClaimConfig(device="b", group="g", order=("b",), others=("a",), ttl=TTL)
    s = initial_claim_state(cfg, 0.0)
    for ev in (BrokerUp(now=0), Synced(now=0), ClaimTick(now=500)):
        s, acts = step(s, ev)
        assert acts == []
    s, acts = step(s, SiblingSeen(device="a", now=501, online=False))
    assert acts == [PublishClaim(seq=1, ttl=TTL)]


_op = st.tuples(
    st.sampled_from(
        ["kill", "heal", "cut", "partition", "tick", "deliver", "settle", "settle", "outage"]
    ),
    st.integers(0, 4),
    st.floats(0.1, 50.0),
)


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(3, 5),
    holders=st.integers(1, 3),
    broken=st.sets(st.integers(0, 4), max_size=2),
    ops=st.lists(_op, min_size=5, max_size=60),
)
def test_random_kills_heals_partitions(
    n: int, holders: int, broken: set[int], ops: list[tuple[str, int, float]]
) -> None:
    holders = min(holders, n - 1)
    w = make_world(n, holders, broken)
    names = list(w.devices)
    for op, i, dt in ops:
        name = names[i % n]
        if op == "kill":
            kill(w, name)
        elif op == "heal":
            heal(w, name)
        elif op == "cut":
            cut(w, name)
        elif op == "partition":
            partition(w, name)
        elif op == "outage":  # every higher layer of the group fails together
            for d in w.devices.values():
                if not d.holder:
                    cut(w, d.name)
        elif op == "tick":
            w.tick(dt)
        elif op == "deliver":
            w.deliver(name)  # one device hears the news before the others
        else:
            w.tick(dt / 10)
            w.settle()
        assert len(w.awake()) <= 1, w.awake()
        assert w.wakes_while_cut_off == 0
    for name in names:
        heal(w, name)
    w.settle()
    for _ in range(12):
        w.tick(STABLE / 3)
        w.settle()
        assert len(w.awake()) <= 1
    assert w.awake() == []  # every dormant profile asleep again once all healed
    assert w.wakes_while_cut_off == 0
    event(f"wakes: {min(w.wakes, 3)}")
