"""Fleet side: push a bundle as desired state (chunks retained on the broker), follow the
devices' update events, and read the fleet's status. Uses the agent's MQTT wrapper."""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from device_agent.config import BrokerConfig
from device_agent.mqtt import MqttClient, dumps
from device_agent.ota.desired import Desired, Probation
from edgebundle.archive import open_bundle
from edgebundle.errors import EdgepackError, InputError

DEFAULT_CHUNK = 1 << 20
FINAL = ("committed", "failed", "rolled_back")


class FleetError(EdgepackError):
    pass


class _Conn:
    """A short-lived client that collects messages on some topics."""

    def __init__(self, broker: BrokerConfig, topics: list[str], *, name: str):
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.client = MqttClient(broker, client_id=f"edgepack-{name}-{uuid.uuid4().hex[:8]}",
                                 on_message=self._on, on_connect=lambda: [self.client.subscribe(t) for t in topics])
        self.client.start()
        if not self.client.connected.wait(10):
            self.client.stop()
            raise FleetError(f"cannot reach the broker at {broker.url}",
                             hint="check --broker, or start one locally with: edgepack broker")

    def _on(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.messages.append((topic, payload))
            self.cond.notify_all()

    def stop(self) -> None:
        self.client.stop()


def _json(payload: bytes):
    try:
        return json.loads(payload) if payload else None
    except ValueError:
        return None


def status(broker: BrokerConfig, *, group: str | None = None, listen_s: float = 2.0) -> list[dict]:
    """Retained status plus the telemetry that arrives within `listen_s`, one row per device."""
    root = broker.topic_prefix
    conn = _Conn(broker, [f"{root}/devices/+/status", f"{root}/devices/+/telemetry"], name="fleet")
    time.sleep(listen_s)
    conn.stop()
    devices: dict[str, dict] = {}
    for topic, payload in conn.messages:
        doc, parts = _json(payload), topic.split("/")
        if not isinstance(doc, dict) or len(parts) < 3 or parts[-3] != "devices":
            continue  # some brokers (amqtt) deliver retained messages of other topics on wildcard subscribe
        dev = parts[-2]
        row = devices.setdefault(dev, {"device_id": dev})
        if topic.endswith("/status"):
            row["status"] = doc
        else:
            row["telemetry"] = doc
    rows = []
    for dev, d in sorted(devices.items()):
        st, tel = d.get("status") or {}, d.get("telemetry") or {}
        if group and group not in (st.get("groups") or []):
            continue
        model = st.get("model") or {}
        lat = (tel.get("inference") or {}).get("latency_ms") or {}
        rows.append({"device_id": dev, "online": st.get("online"), "groups": st.get("groups") or [],
                     "model": model.get("name"), "version": model.get("version"),
                     "provider": model.get("provider"), "update": (st.get("update") or {}).get("state"),
                     "update_error": (st.get("update") or {}).get("error"), "p95_ms": lat.get("p95"),
                     "errors": (tel.get("totals") or {}).get("errors"),
                     "last_seen": tel.get("ts") or st.get("ts")})
    return rows


@dataclass
class PushResult:
    desired: dict
    topic: str
    devices: dict[str, dict] = field(default_factory=dict)  # device -> last event

    @property
    def ok(self) -> bool:
        return all(e.get("state") == "committed" for e in self.devices.values())


def push(bundle: Path, broker: BrokerConfig, *, device: str | None = None, group: str | None = None,
         url: str | None = None, chunk_size: int = DEFAULT_CHUNK, allow_downgrade: bool = False,
         probation: Probation = Probation(), staging_max_p95_ms: float | None = None,
         wait: bool = False, timeout: float = 600, expect: list[str] | None = None,
         progress: Callable[[str, dict], None] = lambda _d, _e: None) -> PushResult:
    """Publish the bundle's chunks (retained) and the desired record (retained); with `wait`,
    follow the target devices' events until each commits, fails, rolls back, or time runs out."""
    if (device is None) == (group is None):
        raise InputError("give exactly one of --device or --group")
    if chunk_size < 1024 or chunk_size > (64 << 20):
        raise InputError("--chunk-size must be between 1 KiB and 64 MiB")
    # Structure and manifest only: every device re-checks every hash and the signature, so the
    # pusher reads the file once (whole-file and per-chunk sha256 in one pass).
    b = open_bundle(bundle)
    m = b.manifest
    sha, hashes = _hashes(bundle, chunk_size)
    size = Path(bundle).stat().st_size
    root = broker.topic_prefix
    if url:
        transfer = {"method": "url", "url": url}
    else:
        transfer = {"method": "mqtt", "topic": f"{root}/bundles/{sha}", "chunk_size": chunk_size,
                    "chunks": (size + chunk_size - 1) // chunk_size, "chunk_sha256": []}
    desired = Desired(update_id=uuid.uuid4().hex, name=m.name, version=m.version, sha256=sha, size=size,
                      transfer=transfer, allow_downgrade=allow_downgrade, probation=probation,
                      staging_max_p95_ms=staging_max_p95_ms,
                      issued=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    topic = f"{root}/devices/{device}/desired" if device else f"{root}/groups/{group}/desired"
    watch = [f"{root}/devices/+/events", f"{root}/devices/+/status"] if wait else []
    conn = _Conn(broker, watch, name="push")
    try:
        if not url:
            transfer["chunk_sha256"] = hashes
        doc = desired.to_dict()
        doc["signature"] = _json(b.signature) if b.signature else None
        # The record goes first, so online devices start pulling chunks while they are still being
        # published (the transfer pipelines); offline ones find them retained later.
        if not conn.client.publish_wait(topic, dumps(doc), qos=1, retain=True, timeout=30):
            raise FleetError("the broker did not acknowledge the desired record")
        if not url:
            _publish_chunks(conn.client, bundle, transfer)
        result = PushResult(desired=doc, topic=topic)
        if wait:
            _follow(conn, result, device=device, group=group, timeout=timeout, expect=expect, progress=progress)
        return result
    finally:
        conn.stop()


def _hashes(bundle: Path, chunk_size: int) -> tuple[str, list[str]]:
    whole, chunks = hashlib.sha256(), []
    with open(bundle, "rb") as f:
        while chunk := f.read(chunk_size):
            whole.update(chunk)
            chunks.append(hashlib.sha256(chunk).hexdigest())
    return whole.hexdigest(), chunks


def _publish_chunks(client: MqttClient, bundle: Path, transfer: dict, window: int = 64) -> None:
    pending = []
    with open(bundle, "rb") as f:
        i = 0
        while chunk := f.read(transfer["chunk_size"]):
            pending.append(client.publish(f"{transfer['topic']}/chunks/{i}", chunk, qos=1, retain=True))
            i += 1
            if len(pending) >= window:  # bounded in-flight: memory stays flat for big bundles
                for info in pending:
                    info.wait_for_publish(60)
                pending.clear()
    for info in pending:
        info.wait_for_publish(60)


def _follow(conn: _Conn, result: PushResult, *, device, group, timeout, expect, progress) -> None:
    """Collect events for this update_id; the target set is the device, or the group's members
    from their retained status (plus `expect`)."""
    uid = result.desired["update_id"]
    targets = {device} if device else set(expect or [])
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        with conn.cond:
            if len(conn.messages) == seen:
                conn.cond.wait(0.5)
            new, seen = conn.messages[seen:], len(conn.messages)
        for topic, payload in new:
            doc, parts = _json(payload), topic.split("/")
            if not isinstance(doc, dict) or len(parts) < 3 or parts[-3] != "devices":
                continue
            dev = parts[-2]
            if topic.endswith("/status") and group and group in (doc.get("groups") or []) and device is None:
                targets.add(dev)
            elif topic.endswith("/events") and doc.get("update_id") == uid:
                result.devices[dev] = doc
                progress(dev, doc)
        if targets and all(result.devices.get(t, {}).get("state") in FINAL for t in targets):
            return
    for t in targets:
        if result.devices.get(t, {}).get("state") not in FINAL:
            result.devices[t] = {**result.devices.get(t, {}), "state": "timed_out",
                                 "error": f"no final state within {timeout:.0f} s"}
    if not targets:
        result.devices["(none)"] = {"state": "timed_out", "error": f"no device of group {group!r} reported"}


def clear(broker: BrokerConfig, *, device: str | None = None, group: str | None = None) -> None:
    """Remove a retained desired record (devices keep what they run)."""
    root = broker.topic_prefix
    topic = f"{root}/devices/{device}/desired" if device else f"{root}/groups/{group}/desired"
    conn = _Conn(broker, [], name="clear")
    try:
        conn.client.publish_wait(topic, b"", qos=1, retain=True)
    finally:
        conn.stop()


__all__ = ["push", "status", "clear", "PushResult", "FleetError"]
