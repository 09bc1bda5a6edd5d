"""What the rollout controller (fleet.rollout) needs of the world, injected so that tests drive it
with fakes: a `Client` (the publishing side of an MQTT connection; edgeproto.mqtt.MqttClient is
one), a `Clock`, and an `Inbox` that keeps what arrives on the controller's subscriptions (whoever
owns the connection hands it every message)."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Protocol

from edgeproto.mqtt import dumps
from edgeproto.records import FINAL_STATES, TelemetryWindow
from edgeproto.topics import Topics
from fleet.conn import parse_json
from fleet.delta import ModelIndex, index_topic
from fleet.errors import RolloutError
from fleet.status import FleetTable

HISTORY = 32  # telemetry windows kept per device


@dataclass(frozen=True)
class Clock:
    """Wall time (records, leases, `issued`), monotonic time (deadlines, soak) and waiting."""

    wall: Callable[[], float] = time.time
    mono: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.wall(), timezone.utc)

    def iso(self) -> str:
        """Now as the records write it (UTC, milliseconds)."""
        return self.now().isoformat(timespec="milliseconds")


class Client(Protocol):
    """The publishing side of the controller's MQTT connection."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False): ...  # -> .wait_for_publish
    def publish_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                     timeout: float = 10.0) -> bool: ...
    def subscribe_wait(self, topic: str, qos: int = 1, timeout: float = 10.0) -> bool: ...


def publish_retained(client: Client, topic: str, doc: dict | None) -> None:
    """Retained and acknowledged; None clears the topic."""
    if not client.publish_wait(topic, dumps(doc) if doc is not None else b"", qos=1, retain=True, timeout=30):
        raise RolloutError(f"the broker did not acknowledge {topic}")


class Inbox:
    """What the controller has heard: its rollout's retained record, lease and control request, the
    group's desired record, every model's retained chunk index (fleet.delta), the devices' status (a FleetTable), their recent telemetry and the final
    states of their updates (from events, and from the retained status: events are not retained).
    Telemetry and status are seen through the rollout's `model` (set once the record names it), so
    the gates judge that model alone. Fed on the connection's thread, read on the controller's."""

    def __init__(self, topics: Topics, rollout_id: str, *, mono: Callable[[], float] = time.monotonic):
        self.topics, self.id, self._mono = topics, rollout_id, mono
        self.table = FleetTable(topics)
        self.record: dict | None = None  # the retained rollout record, as published
        self.lease: dict | None = None
        self.control: dict | None = None
        self.model: str | None = None  # the model the rollout updates (None: the devices' only/first one)
        self.group_desired: dict | None = None
        self.group_topic: str | None = None  # set before subscribing to it
        self.legacy_desired: dict | None = None  # the group's old-style record, when the rollout is a model's
        self.legacy_topic: str | None = None
        self.indexes: dict[str, ModelIndex] = {}  # model -> its chunk index (delta rollouts)
        self._index_prefix = index_topic(topics.root)[:-1]
        self._lock = threading.Lock()
        self._telemetry: dict[str, collections.deque] = {}  # device -> (received mono, whole window)
        self._outcomes: dict[str, dict[str, str]] = {}  # update_id -> device -> final state
        self._errors: dict[str, dict[str, str]] = {}  # update_id -> device -> the final event's error

    @property
    def subscriptions(self) -> list[str]:
        t, rid = self.topics, self.id
        return [t.status(), t.telemetry(), t.events(), t.rollout(rid), t.rollout_lease(rid), t.rollout_control(rid),
                index_topic(t.root)]

    def feed(self, topic: str, payload: bytes) -> None:
        t = self.topics
        if topic == t.rollout(self.id):
            self.record = parse_json(payload)
        elif topic == t.rollout_lease(self.id):
            self.lease = parse_json(payload)
        elif topic == t.rollout_control(self.id):
            self.control = parse_json(payload)
        elif topic == self.group_topic:
            self.group_desired = parse_json(payload)
        elif topic == self.legacy_topic:
            self.legacy_desired = parse_json(payload)
        elif topic.startswith(self._index_prefix):
            self.indexes[topic[len(self._index_prefix):]] = ModelIndex.from_doc(parse_json(payload) if payload else None)
        else:
            self._device(topic, payload)

    def _device(self, topic: str, payload: bytes) -> None:
        dev, hit = self.table.feed(topic, payload), self.topics.parse_device(topic)
        if hit is None:
            return
        if dev is None:
            if hit[1] == "events":
                doc = parse_json(payload)
                if isinstance(doc, dict) and isinstance(doc.get("update_id"), str):
                    self._outcome(doc["update_id"], hit[0], doc.get("state"), doc.get("error"))
        elif hit[1] == "telemetry":
            tel = TelemetryWindow.from_dict(dev, parse_json(payload))
            with self._lock:
                self._telemetry.setdefault(dev, collections.deque(maxlen=HISTORY)).append((self._mono(), tel))
        elif hit[1] == "status" and (e := self.table.get(dev)) is not None:
            # every model's update: update ids are the rollout's own, whichever model they are for
            for u in (e.status.update, *(slot.update for slot in e.status.models.values())):
                if u and u.update_id:
                    self._outcome(u.update_id, dev, u.state, u.error)

    def _outcome(self, update_id: str, device: str, state, error=None) -> None:
        if state in FINAL_STATES:
            with self._lock:
                self._outcomes.setdefault(update_id, {})[device] = state
                if isinstance(error, str) and error:
                    self._errors.setdefault(update_id, {})[device] = error[:300]

    def telemetry(self, device: str) -> list[tuple[float, str | None, TelemetryWindow]]:
        """(received, model version, window) of the rollout's model, oldest first, at most HISTORY."""
        with self._lock:
            got = list(self._telemetry.get(device, ()))
        return [(t, w.model_version, w) for t, w in ((t, tel.for_model(self.model)) for t, tel in got)]

    def errors(self, update_id: str) -> dict[str, str]:
        """device -> why `update_id` failed or rolled back there (the device's own words)."""
        with self._lock:
            return dict(self._errors.get(update_id, {}))

    def outcomes(self, update_id: str) -> dict[str, str]:
        """device -> final state of `update_id` (committed, failed, rolled_back) heard so far."""
        with self._lock:
            return dict(self._outcomes.get(update_id, {}))


__all__ = ["Clock", "Client", "Inbox", "publish_retained", "HISTORY"]
