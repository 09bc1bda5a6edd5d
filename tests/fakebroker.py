"""An in-memory MQTT broker, a fake clock and simulated devices, for driving fleet-side state
machines (the rollout controller) without a broker process, an agent or real sleeps. Devices
answer desired records the way agents do: strictly parsed records, each model following its own
topics (device beats group; the first model then the old-style topics), update events, retained
status with every model, and a telemetry window per second of fake time."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgebundle.archive import open_bundle, sha256_file
from edgebundle.interface import interface_hash
from edgebundle.manifest import parse_version
from edgeproto.desired import Desired, parse_record
from edgeproto.mqtt import dumps
from edgeproto.topics import Topics
from fleet.rollout_link import Clock

T = Topics()
UPDATE_S = 1.0  # fake seconds from a desired record to the device's final state
MAX_SLEEPS = 20_000  # every controller loop sleeps: this bounds a test that would never end


class FakeBroker:
    """Retained messages and subscriptions in memory. Delivery is synchronous: a publish reaches
    every matching subscriber before it returns, and a new subscription gets the retained messages
    at once (as they follow the SUBACK on a real broker). `taps` see every publish first."""

    def __init__(self):
        self.retained: dict[str, bytes] = {}
        self.subs: list[tuple[str, Callable[[str, bytes], None]]] = []
        self.taps: list[Callable[[str, bytes], None]] = []

    def connect(self, topics: list[str], on_message: Callable[[str, bytes], None]) -> "FakeClient":
        client = FakeClient(self, on_message)
        for t in topics:
            client.subscribe_wait(t)
        return client

    def subscribe(self, filt: str, cb: Callable[[str, bytes], None]) -> None:
        self.subs.append((filt, cb))
        for topic, payload in sorted(self.retained.items()):
            if _matches(filt, topic):
                cb(topic, payload)

    def publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        if retain:
            self.retained.pop(topic, None) if not payload else self.retained.__setitem__(topic, payload)
        for tap in list(self.taps):
            tap(topic, payload)
        for filt, cb in list(self.subs):
            if _matches(filt, topic):
                cb(topic, payload)

    def doc(self, topic: str):
        payload = self.retained.get(topic)
        return json.loads(payload) if payload else None


def _matches(filt: str, topic: str) -> bool:
    f, t = filt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t) or part not in ("+", t[i]):
            return False
    return len(f) == len(t)


class _Ack:
    def wait_for_publish(self, timeout=None) -> None:
        pass

    def is_published(self) -> bool:
        return True


class FakeClient:
    """What the controller uses of edgeproto.mqtt.MqttClient (every publish acknowledged)."""

    def __init__(self, broker: FakeBroker, on_message):
        self.broker, self.on_message = broker, on_message

    def subscribe_wait(self, topic: str, qos: int = 1, timeout: float = 10.0) -> bool:
        self.broker.subscribe(topic, self.on_message)
        return True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> _Ack:
        self.broker.publish(topic, payload, retain=retain)
        return _Ack()

    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 10.0) -> bool:
        self.publish(topic, payload, qos=qos, retain=retain)
        return True


class FakeClock:
    """Time moves only when the controller sleeps; then the devices act (`on_sleep`)."""

    def __init__(self):
        self.wall_t, self.mono_t, self.sleeps = 1.8e9, 1000.0, 0
        self.on_sleep: list[Callable[[], None]] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        assert self.sleeps < MAX_SLEEPS, "the controller never finished"
        self.wall_t += seconds
        self.mono_t += seconds
        for f in list(self.on_sleep):
            f()

    def clock(self) -> Clock:
        return Clock(wall=lambda: self.wall_t, mono=lambda: self.mono_t, sleep=self.sleep)


@dataclass(frozen=True)
class Behaviour:
    """How a device fares on any bundle but the one it started with."""

    refuse: bool = False  # the update fails (as a bad signature or a failed staging would)
    silent: bool = False  # never reaches a final state
    slow: float = 1.0  # p95 factor
    errors: float = 0.0  # share of requests that fail
    rss_mb: float = 100.0  # telemetry system.rss_mb


@dataclass(frozen=True)
class Running:
    name: str
    version: str
    sha256: str


@dataclass
class Slot:
    """One model of a FakeDevice: what it started on, runs, and the update in hand."""

    name: str
    first: Running
    interface: str
    p95_ms: float  # on its first bundle
    running: Running
    update: dict | None = None
    pending: tuple[float, Desired] | None = None


class FakeDevice:
    """An agent as the controller hears it: its retained status (groups, models, last update),
    update events, and a telemetry window every second (30 requests per model; p95 10 ms on its
    first model's first bundle, 40 ms on a second model's). Each model follows the first record
    present of its device's and group's model topics, and the first model then the device's and
    group's own (old-style) topics, parsed as strictly as an agent does (a malformed one fails the
    test); one it has not seen, for another bundle, ends UPDATE_S later; a newer one abandons it."""

    def __init__(self, broker: FakeBroker, clock: FakeClock, device_id: str, *, bundle: Path,
                 also: tuple[Path, ...] = (), group: str = "g", behaviour: Behaviour = Behaviour()):
        self.id, self.group, self.broker, self.clock, self.behaviour = device_id, group, broker, clock, behaviour
        self.slots: dict[str, Slot] = {}
        for i, b in enumerate((bundle, *also)):
            m = open_bundle(b).manifest
            first = Running(m.name, m.version, sha256_file(b))
            self.slots[m.name] = Slot(m.name, first, interface_hash(m), 10.0 * 4 ** i, running=first)
        self.desired: dict[str, Desired | None] = {}
        self.seen: list[str] = []  # update ids of the desired records it acted on
        self.next_telemetry, self.seq = clock.mono_t + 1.0, 0
        self._status()
        topics = [t for name in self.slots for t in self._order(name)]
        self.client = broker.connect(list(dict.fromkeys(topics)), self._on)
        clock.on_sleep.append(self.tick)

    @property
    def version(self) -> str:
        return self.versions()[next(iter(self.slots))]

    def versions(self) -> dict[str, str]:
        return {name: s.running.version for name, s in self.slots.items()}

    def _order(self, name: str) -> list[str]:
        """The topics model `name` follows, the first present record winning."""
        own = [T.model_desired(self.id, name), T.group_model_desired(self.group, name)]
        return own + ([T.desired(self.id), T.group_desired(self.group)] if name == next(iter(self.slots)) else [])

    def _on(self, topic: str, payload: bytes) -> None:
        rec = parse_record(payload, source=topic, topic_prefix=T.root)
        self.desired[topic] = rec if isinstance(rec, Desired) else None
        for name, slot in self.slots.items():
            if topic in self._order(name):
                self._follow(slot, next((d for d in map(self.desired.get, self._order(name)) if d), None))

    def _follow(self, slot: Slot, d: Desired | None) -> None:
        if d is None or d.update_id in self.seen:  # a cleared record: an update in hand goes on
            return
        if slot.pending is not None:
            self._end(slot, slot.pending[1], "failed", error=f"abandoned: superseded by update {d.update_id}")
        self.seen.append(d.update_id)
        if d.sha256 == slot.running.sha256:
            self._end(slot, d, "committed")
        elif parse_version(d.version) < parse_version(slot.running.version) and not d.allow_downgrade:
            self._end(slot, d, "failed", error="downgrade refused")
        else:
            slot.pending = (self.clock.mono_t + UPDATE_S, d)
            self._event(slot, d, "downloading")

    def tick(self) -> None:
        for slot in self.slots.values():
            if slot.pending and self.clock.mono_t >= slot.pending[0] and not self.behaviour.silent:
                d = slot.pending[1]
                if self.behaviour.refuse and d.sha256 != slot.first.sha256:
                    self._end(slot, d, "failed", error="verification failed: bad signature")
                else:
                    slot.running = Running(d.name, d.version, d.sha256)
                    self._end(slot, d, "committed")
        if self.clock.mono_t >= self.next_telemetry:
            self.next_telemetry += 1.0
            self._telemetry()

    def _end(self, slot: Slot, d: Desired, state: str, *, error: str | None = None) -> None:
        slot.pending = None
        slot.update = {"state": state, "update_id": d.update_id, "version": d.version, "error": error}
        self._event(slot, d, state, error=error)
        self._status()

    def _event(self, slot: Slot, d: Desired, state: str, *, error: str | None = None) -> None:
        doc = {"device_id": self.id, "update_id": d.update_id, "state": state, "model": slot.name,
               "version": d.version, "error": error}
        self.broker.publish(T.events(self.id), dumps(doc), retain=False)

    def _status(self) -> None:
        models = {name: {"model": {"name": s.running.name, "version": s.running.version,
                                   "bundle_sha256": s.running.sha256, "interface": s.interface},
                         "update": s.update} for name, s in self.slots.items()}
        first = next(iter(models.values()))
        doc = {"device_id": self.id, "online": True, "groups": [self.group], **first, "models": models}
        self.broker.publish(T.status(self.id), dumps(doc), retain=True)

    def _window(self, slot: Slot) -> dict:
        b, new = self.behaviour, slot.running != slot.first
        return {"count": 30, "errors": round(30 * b.errors) if new else 0, "nonfinite": 0,
                "latency_ms": {"p95": slot.p95_ms * (b.slow if new else 1.0)}}

    def _telemetry(self) -> None:
        new = any(s.running != s.first for s in self.slots.values())
        self.seq += 1
        wins = {name: self._window(s) for name, s in self.slots.items()}
        first = next(iter(self.slots.values()))
        doc = {"device_id": self.id, "seq": self.seq, "model": {"name": first.name, "version": first.running.version},
               "inference": {"count": sum(w["count"] for w in wins.values()),
                             "errors": sum(w["errors"] for w in wins.values()), "nonfinite": 0,
                             "latency_ms": {"p95": max(w["latency_ms"]["p95"] for w in wins.values())}},
               "models": {name: {"version": s.running.version, "inference": wins[name]}
                          for name, s in self.slots.items()},
               "system": {"rss_mb": self.behaviour.rss_mb if new else 100.0}}
        self.broker.publish(T.telemetry(self.id), dumps(doc), retain=False)
