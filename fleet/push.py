"""Push a bundle as desired state (chunks retained on the broker) and follow the devices' update
events; clear a desired record."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from edgebundle.archive import open_bundle
from edgebundle.errors import InputError
from edgebundle.trust import parse_time
from edgeproto.broker import BrokerConfig
from edgeproto.desired import Desired, MqttTransfer, Probation, UrlTransfer, sign_record
from edgeproto.mqtt import MqttClient, dumps
from edgeproto.records import FINAL_STATES
from edgeproto.topics import Topics
from fleet.conn import Collector, parse_json
from fleet.errors import FleetError

DEFAULT_CHUNK = 1 << 20
FINAL = FINAL_STATES
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
         progress: Callable[[str, dict], None] = lambda _d, _e: None,
         sign_key=None, key_cert=None) -> PushResult:
    """Publish the bundle's chunks (retained) and the desired record (retained); with `wait`,
    follow the target devices' events until each commits, fails, rolls back, or time runs out.

    `sign_key` (a private key or its PEM path) signs the record; devices with trusted keys refuse
    unsigned records. `key_cert` (a certificate or its path) goes with the signature when the key
    is a fleet key certified by a root key. The record's `issued` is now, or just after the
    record already on the topic, so a pusher with a slow clock cannot make its record look older."""
    if (device is None) == (group is None):
        raise InputError("give exactly one of --device or --group")
    name = device if device is not None else group
    if not _ID.match(name or ""):
        raise InputError(f"{'device id' if device is not None else 'group'} {name!r} must be 1-64 letters, digits, "
                         "'.', '_' or '-'")
    if chunk_size < 1024 or chunk_size > (64 << 20):
        raise InputError("--chunk-size must be between 1 KiB and 64 MiB")
    key, cert = _signer(sign_key, key_cert)
    # Structure and manifest only: every device re-checks every hash and the signature, so the
    # pusher reads the file once (whole-file and per-chunk sha256 in one pass).
    b = open_bundle(bundle)
    m = b.manifest
    sha, hashes = _hashes(bundle, chunk_size)
    size = Path(bundle).stat().st_size
    topics = Topics(broker.topic_prefix)
    transfer = (UrlTransfer(url=url) if url else
                MqttTransfer(topic=topics.bundle(sha), chunk_size=chunk_size,
                             chunks=(size + chunk_size - 1) // chunk_size, chunk_sha256=tuple(hashes)))
    target = f"devices/{device}" if device else f"groups/{group}"
    topic = topics.target_desired(target)
    watch = [topics.events(), topics.status()] if wait else []
    conn = Collector(broker, watch, name="push")
    try:
        desired = Desired(update_id=uuid.uuid4().hex, name=m.name, version=m.version, sha256=sha, size=size,
                          transfer=transfer, allow_downgrade=allow_downgrade, probation=probation,
                          staging_max_p95_ms=staging_max_p95_ms, issued=_issued_after(conn, topic), target=target)
        doc = desired.to_dict()
        doc["signature"] = parse_json(b.signature) if b.signature else None  # informative: the bundle's own
        if key is not None:
            doc = sign_record(doc, key, cert=cert)
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


def _signer(sign_key, key_cert):
    from edgebundle.signing import load_private_key

    key = load_private_key(sign_key) if isinstance(sign_key, (str, os.PathLike)) else sign_key
    cert = key_cert
    if isinstance(key_cert, (str, os.PathLike)):
        try:
            cert = json.loads(Path(key_cert).read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read key certificate {key_cert}: {e}") from None
    if cert is not None and key is None:
        raise InputError("--key-cert goes with --sign-key")
    if cert is not None:
        from edgebundle.signing import key_id

        if cert.get("key_id") != key_id(key.public_key()):
            raise InputError(f"the certificate is for key {cert.get('key_id')}, not the signing key "
                             f"{key_id(key.public_key())}")
    return key, cert


def _issued_after(conn: Collector, topic: str) -> str:
    """Now (UTC, ms), or 1 ms after the `issued` of the record retained on `topic` if that is later."""
    now = datetime.now(timezone.utc)
    floor = None
    if conn.client.subscribe_wait(topic, qos=1, timeout=10):
        deadline = time.monotonic() + 0.2  # a retained record follows the SUBACK at once
        while time.monotonic() < deadline and floor is None:
            with conn.cond:
                hit = [p for t, p in conn.messages if t == topic]
                if not hit:
                    conn.cond.wait(0.05)
                    continue
            doc = parse_json(hit[-1])
            try:
                floor = parse_time(doc["issued"], what="issued") if isinstance(doc, dict) and doc.get("issued") else now
            except ValueError:
                floor = now
        conn.client.unsubscribe(topic)
    if floor is not None and floor >= now:
        now = floor + timedelta(milliseconds=1)
    return now.isoformat(timespec="milliseconds")


def _hashes(bundle: Path, chunk_size: int) -> tuple[str, list[str]]:
    whole, chunks = hashlib.sha256(), []
    with open(bundle, "rb") as f:
        while chunk := f.read(chunk_size):
            whole.update(chunk)
            chunks.append(hashlib.sha256(chunk).hexdigest())
    return whole.hexdigest(), chunks


def _publish_chunks(client: MqttClient, bundle: Path, transfer: MqttTransfer, window: int = 64) -> None:
    pending = []
    with open(bundle, "rb") as f:
        i = 0
        while chunk := f.read(transfer.chunk_size):
            pending.append(client.publish(Topics.chunk(transfer.topic, i), chunk, qos=1, retain=True))
            i += 1
            if len(pending) >= window:  # bounded in-flight: memory stays flat for big bundles
                for info in pending:
                    info.wait_for_publish(60)
                pending.clear()
    for info in pending:
        info.wait_for_publish(60)


def _follow(conn: Collector, result: PushResult, *, device, group, timeout, expect, progress) -> None:
    """Collect events for this update_id; the target set is the device, or the group's members
    from their retained status (plus `expect`)."""
    uid = result.desired["update_id"]
    topics = Topics(conn.client.cfg.topic_prefix)
    targets = {device} if device else set(expect or [])
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        new, seen = conn.take(seen, 0.5)
        for topic, payload in new:
            hit, doc = topics.parse_device(topic), parse_json(payload)
            if hit is None or not isinstance(doc, dict):
                continue
            dev, kind = hit
            if kind == "status" and group and group in (doc.get("groups") or []) and device is None:
                targets.add(dev)
            elif kind == "events" and doc.get("update_id") == uid:
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
    topics = Topics(broker.topic_prefix)
    topic = topics.desired(device) if device else topics.group_desired(group)
    conn = Collector(broker, [], name="clear")
    try:
        conn.client.publish_wait(topic, b"", qos=1, retain=True)
    finally:
        conn.stop()


__all__ = ["push", "clear", "PushResult", "DEFAULT_CHUNK"]
