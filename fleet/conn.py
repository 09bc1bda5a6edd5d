"""A short-lived fleet-side MQTT client that collects the messages of some topics."""
from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Callable, Iterable

from edgeproto.broker import BrokerConfig
from edgeproto.mqtt import MqttClient
from edgeproto.records import DeviceStatus
from edgeproto.topics import Topics
from fleet.errors import FleetError


def parse_json(payload: bytes):
    """The JSON document in a payload, or None (empty: a cleared retained message; or not JSON)."""
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


class Collector:
    """Connects, subscribes to `topics` on every (re)connect, and keeps what arrives in `messages`
    (or hands each message to `on_message` instead, for long-running consumers)."""

    def __init__(self, broker: BrokerConfig, topics: list[str], *, name: str,
                 on_message: Callable[[str, bytes], None] | None = None, connect_timeout: float = 10.0,
                 mqtt5: bool = False):
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.topics = list(topics)
        self._sink = on_message
        self.client = MqttClient(broker, client_id=f"edgepack-{name}-{uuid.uuid4().hex[:8]}", on_message=self._on,
                                 on_connect=self._subscribe, mqtt5=mqtt5)
        self.client.start()
        if not self.client.connected.wait(connect_timeout):
            self.client.stop()
            raise FleetError(f"cannot reach the broker at {broker.url}",
                             hint="check --broker, or start one locally with: edgepack broker")

    def _subscribe(self) -> None:
        for t in self.topics:
            self.client.subscribe(t)

    def _on(self, topic: str, payload: bytes) -> None:
        if self._sink is not None:
            self._sink(topic, payload)
            return
        with self.cond:
            self.messages.append((topic, payload))
            self.cond.notify_all()

    def take(self, seen: int, wait_s: float) -> tuple[list[tuple[str, bytes]], int]:
        """Messages after index `seen` (waiting up to `wait_s` for one), and the new index."""
        with self.cond:
            if len(self.messages) == seen:
                self.cond.wait(wait_s)
            return self.messages[seen:], len(self.messages)

    def stop(self) -> None:
        self.client.stop()


def wait_online(conn: Collector, topics: Topics, device: str, wait_s: float, *, then: str) -> DeviceStatus:
    """The device's retained status, collected by `conn` (subscribed to it); FleetError when the device
    never reported to this broker or is offline (`then`: what to do once it runs, for the hint)."""
    want, seen, status = topics.status(device), 0, None
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and status is None:
        new, seen = conn.take(seen, 0.2)
        status = next((DeviceStatus.from_dict(device, parse_json(p)) for t, p in new if t == want), None)
    if status is None:
        raise FleetError(f"device {device!r} has never reported to this broker (no retained status on {want})",
                         hint="check --device and --broker/--topic-prefix, and that the agent runs with this broker")
    if not status.online:
        raise FleetError(f"device {device!r} is offline ({status.reason or 'no reason given'}, since {status.ts})",
                         hint=f"start its agent, then {then}")
    return status


def publish_retained(client: MqttClient, messages: Iterable[tuple[str, bytes]], *, window: int = 64) -> int:
    """Publish (topic, payload) pairs retained at QoS 1 with at most `window` unacknowledged (memory
    stays flat for big bundles); returns how many."""
    pending, sent = [], 0
    for topic, payload in messages:
        pending.append(client.publish(topic, payload, qos=1, retain=True))
        sent += 1
        if len(pending) >= window:
            for info in pending:
                info.wait_for_publish(60)
            pending.clear()
    for info in pending:
        info.wait_for_publish(60)
    return sent
