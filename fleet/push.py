"""Push a bundle as desired state (chunks retained on the broker) and follow the devices' update
events; remove a model from devices (a signed removal record); clear a desired record.

A record addresses one model of a device or a group (`{root}/devices/{id}/models/{name}/desired`,
`{root}/groups/{g}/models/{name}/desired`; the model's name defaults to the bundle's), or, for agents
that predate several models, the device's or group's own topic (`device_topic`); docs/mqtt-protocol.md
says which record a device acts on when both exist."""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from edgebundle.archive import open_bundle, sha256_file
from edgebundle.errors import InputError
from edgebundle.trust import parse_time
from edgeproto.broker import BrokerConfig
from edgeproto.bundleref import MODEL_NAME
from edgeproto.desired import CdcTransfer, Desired, MqttTransfer, Probation, Removal, Shadow, UrlTransfer, sign_record
from edgeproto.mqtt import MqttClient, dumps
from edgeproto.records import FINAL_STATES, DeviceStatus
from edgeproto.topics import Topics, target
from fleet import delta as cdc
from fleet.conn import Collector, parse_json, publish_retained
from fleet.errors import FleetError

DEFAULT_CHUNK = 1 << 20
FINAL = FINAL_STATES
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class PushResult:
    desired: dict
    topic: str
    devices: dict[str, dict] = field(default_factory=dict)  # device -> last event
    warnings: list[str] = field(default_factory=list)
    success: str = "committed"  # the final state that means done ("removed" for a removal)
    cost: cdc.Cost | None = None  # a delta push: bytes published, and fetched per device

    @property
    def ok(self) -> bool:
        return all(e.get("state") == self.success for e in self.devices.values())


@dataclass(frozen=True)
class Address:
    """Where a desired record goes: a device or a group, and one of its models (None: the
    device's or group's own topic, the one agents that predate several models read)."""

    device: str | None = None
    group: str | None = None
    model: str | None = None

    @classmethod
    def of(cls, *, device: str | None, group: str | None, model: str | None = None) -> "Address":
        if (device is None) == (group is None):
            raise InputError("give exactly one of --device or --group")
        name = device if device is not None else group
        if not _ID.match(name or ""):
            raise InputError(f"{'device id' if device is not None else 'group'} {name!r} must be 1-64 letters, "
                             "digits, '.', '_' or '-'")
        if model is not None and not MODEL_NAME.match(model):
            raise InputError(f"model name {model!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return cls(device=device, group=group, model=model)

    @property
    def target(self) -> str:
        """The record's `target` ('devices/ID' or 'groups/NAME', + '/models/MODEL')."""
        return target("devices", self.device, self.model) if self.device else target("groups", self.group, self.model)


def model_for(bundle_name: str, *, model: str | None = None, device_topic: bool = False) -> str | None:
    """The model a record addresses: `model`, else the bundle's name; None with `device_topic`."""
    if device_topic:
        if model is not None:
            raise InputError("--model and --device-topic exclude each other",
                             hint="--device-topic addresses an agent's only model, whatever its name")
        return None
    name = model or bundle_name
    if not MODEL_NAME.match(name or ""):
        raise InputError(f"the bundle's name {name!r} cannot name a model on a device (1-64 letters, digits, "
                         "'.', '_' or '-')", hint="give --model NAME (or --device-topic for agents that predate "
                                                  "several models)")
    return name


@dataclass(frozen=True)
class Prepared:
    """A bundle ready to publish: what the desired record says about it."""

    path: Path
    name: str
    version: str
    sha256: str
    size: int
    transfer: MqttTransfer | CdcTransfer | UrlTransfer
    interface: str  # edgebundle.interface.interface_hash of its manifest
    bundle_signature: dict | None


@dataclass(frozen=True)
class Signer:
    key: object = None
    cert: dict | None = None

    @classmethod
    def load(cls, sign_key=None, key_cert=None) -> "Signer":
        key, cert = _signer(sign_key, key_cert)
        return cls(key=key, cert=cert)


def prepare(bundle: Path, topics: Topics, *, url: str | None = None, chunk_size: int = DEFAULT_CHUNK,
            indexes: dict[str, cdc.ModelIndex] | None = None, model: str | None = None) -> Prepared:
    """Structure and manifest only: every device re-checks every hash and the signature, so the
    pusher reads the file once (whole-file and per-chunk sha256 in one pass). `indexes` (a delta
    push: every model's retained chunk index) cuts it into content-defined chunks instead, alike
    with the previous version of `model` (default: the bundle's name)."""
    if chunk_size < 1024 or chunk_size > (64 << 20):
        raise InputError("--chunk-size must be between 1 KiB and 64 MiB")
    from edgebundle.interface import interface_hash

    b = open_bundle(bundle)
    m = b.manifest
    size = Path(bundle).stat().st_size
    if indexes is not None:  # with `url`: the chunks are byte ranges of the bundle there, not retained
        sha = sha256_file(bundle)
        transfer = cdc.cdc_transfer(Path(bundle), topics.root, size=size, previous=indexes.get(model or m.name))
        if url:
            transfer = replace(transfer, url=url)
    else:
        sha, hashes = _hashes(bundle, chunk_size)
        transfer = (UrlTransfer(url=url) if url else
                    MqttTransfer(topic=topics.bundle(sha), chunk_size=chunk_size,
                                 chunks=(size + chunk_size - 1) // chunk_size, chunk_sha256=tuple(hashes)))
    return Prepared(path=Path(bundle), name=m.name, version=m.version, sha256=sha, size=size, transfer=transfer,
                    interface=interface_hash(m), bundle_signature=parse_json(b.signature) if b.signature else None)


def make_record(p: Prepared, *, target: str, update_id: str, issued: str, signer: Signer = Signer(),
                allow_downgrade: bool = False, allow_interface_change: bool = False,
                probation: Probation = Probation(), staging_max_p95_ms: float | None = None,
                shadow: Shadow | None = None) -> dict:
    """The desired record for `target` ('devices/ID' or 'groups/NAME', + '/models/MODEL'), signed when
    `signer` has a key."""
    desired = Desired(update_id=update_id, name=p.name, version=p.version, sha256=p.sha256, size=p.size,
                      transfer=p.transfer, allow_downgrade=allow_downgrade,
                      allow_interface_change=allow_interface_change, probation=probation,
                      staging_max_p95_ms=staging_max_p95_ms, shadow=shadow, issued=issued, target=target)
    doc = desired.to_dict()
    doc["signature"] = p.bundle_signature  # informative: the bundle's own
    return sign_record(doc, signer.key, cert=signer.cert) if signer.key is not None else doc


def publish_record(client: MqttClient, topic: str, doc: dict | None) -> None:
    """Retained, acknowledged; None clears the topic."""
    if not client.publish_wait(topic, dumps(doc) if doc is not None else b"", qos=1, retain=True, timeout=30):
        raise FleetError(f"the broker did not acknowledge the desired record on {topic}")


def removal_record(*, target: str, update_id: str, issued: str, signer: Signer = Signer()) -> dict:
    """A removal for `target` (a model of a device or a group), signed when `signer` has a key."""
    doc = Removal(update_id=update_id, issued=issued, target=target).to_dict()
    return sign_record(doc, signer.key, cert=signer.cert) if signer.key is not None else doc


def interface_warnings(table, p: Prepared, *, devices: list[str] | None = None, group: str | None = None,
                       allowed: bool = False, model: str | None = None) -> list[str]:
    """Devices (from a FleetTable of retained status) whose `model` (None: their first) runs a
    bundle with another interface."""
    entries = [e for e in table.entries(group=group) if devices is None or e.status.device_id in devices]
    running = [(e.status.device_id, e.status.for_model(model).model) for e in entries]
    differ = sorted(dev for dev, m in running if m and m.interface and m.interface != p.interface)
    if not differ:
        return []
    names = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
    if allowed:
        return [f"{len(differ)} device(s) run a model with another interface (inputs/outputs) than "
                f"{p.name} {p.version}: {names}; --allow-interface-change applies it: their clients must be ready"]
    return [f"{len(differ)} device(s) run a model with another interface (inputs/outputs) than {p.name} "
            f"{p.version}: {names}; they will refuse the update (push with --allow-interface-change once "
            "their clients are ready)"]


def old_agents(table, *, devices: list[str] | None = None, group: str | None = None) -> list[str]:
    """Target devices whose retained status has no `models`: agents that predate several models,
    which read only their device's and groups' own desired topics."""
    entries = [e for e in table.entries(group=group) if devices is None or e.status.device_id in devices]
    return sorted(e.status.device_id for e in entries if e.status_raw is not None and "models" not in e.status_raw)


def push(bundle: Path, broker: BrokerConfig, *, device: str | None = None, group: str | None = None,
         model: str | None = None, device_topic: bool = False,
         url: str | None = None, chunk_size: int = DEFAULT_CHUNK, allow_downgrade: bool = False,
         allow_interface_change: bool = False,
         probation: Probation = Probation(), staging_max_p95_ms: float | None = None,
         shadow: Shadow | None = None, wait: bool = False, timeout: float = 600, expect: list[str] | None = None,
         progress: Callable[[str, dict], None] = lambda _d, _e: None,
         warn: Callable[[str], None] = lambda _m: None, check_interface: bool = True,
         sign_key=None, key_cert=None, delta: bool = False,
         inform: Callable[[str], None] = lambda _m: None) -> PushResult:
    """Publish the bundle's chunks (retained) and the desired record (retained) for `model` of the
    device or group (default: the bundle's name; `device_topic`: their own topic instead, for
    agents that predate several models); with `wait`, follow the target devices' events until
    each commits, fails, rolls back, or time runs out.

    Before publishing, the devices' retained status is read (`check_interface`): devices whose
    model has another interface than the bundle are named through `warn` and in the result.
    `sign_key` (a private key or its PEM path) signs the record; devices with trusted keys refuse
    unsigned records. `key_cert` (a certificate or its path) goes with the signature when the key
    is a fleet key certified by a root key. The record's `issued` is now, or just after the
    record already on the topic, so a pusher with a slow clock cannot make its record look older.

    `delta` publishes content-defined chunks (fleet.delta): only those the broker does not retain
    yet; what the update costs each device is said through `inform` (and `result.cost`) before
    publishing. Agents that predate delta updates refuse such a record: push those without it."""
    Address.of(device=device, group=group)  # a bad --device or --group fails before the bundle is read
    signer = Signer.load(sign_key, key_cert)
    topics = Topics(broker.topic_prefix)
    ix_conn = None
    if delta:
        name = open_bundle(bundle).manifest.name  # a bad bundle or model name fails before the broker is asked
        model_for(name, model=model, device_topic=device_topic)
        ix_conn = Collector(broker, [cdc.index_topic(topics.root)], name="push-index")
    else:
        p = prepare(bundle, topics, url=url, chunk_size=chunk_size)
        model_for(p.name, model=model, device_topic=device_topic)  # before the broker is asked anything
    try:  # the chunk indexes arrive while the devices' status is read
        table = _fleet_table(broker) if check_interface or ix_conn else None
        # the status read waited for 0.2 s of quiet: the retained indexes (sent right after the SUBACK) are in
        indexes = cdc.read_indexes(ix_conn, topics.root, quiet_s=0.01) if ix_conn else None
    finally:
        if ix_conn:
            ix_conn.stop()
    if indexes is not None:
        p = prepare(bundle, topics, url=url, chunk_size=chunk_size, indexes=indexes, model=model)
    addr = Address.of(device=device, group=group, model=model_for(p.name, model=model, device_topic=device_topic))
    warnings = []
    if check_interface:
        warnings = interface_warnings(table, p, devices=[device] if device else None, group=group,
                                      allowed=allow_interface_change, model=addr.model)
        old = old_agents(table, devices=[device] if device else None, group=group) if addr.model else []
        if old:
            warnings.append(f"{len(old)} device(s) run an agent that predates several models and will not see a "
                            f"record on the model's topic: {', '.join(old[:8])}; push with --device-topic for them")
        for msg in warnings:
            warn(msg)
    chunks = None if url else (lambda client: publish_chunks(client, p))
    cost = None
    if indexes is not None:
        running = running_bundles(table, device=device, group=group, model=addr.model)
        if url:  # devices read byte ranges from the URL: nothing to publish, no patches (they live on the broker)
            cost = cdc.cost(p.transfer, indexes, running=running)
            inform(f"delta from {url}: devices fetch byte ranges of the bundle there, nothing is published")
            for line in cost.lines()[1:]:
                inform(line)
        else:
            p, patches = with_patches(broker, p, indexes, running.values())
            cost = cdc.cost(p.transfer, indexes, running=running)
            for line in cost.lines():
                inform(line)
            chunks = lambda client: _publish_delta(client, p, indexes, model=addr.model or p.name,  # noqa: E731
                                                   desired_topic=result.topic, inform=inform, patches=patches)

    def record(issued: str) -> dict:
        return make_record(p, target=addr.target, update_id=uuid.uuid4().hex, issued=issued, signer=signer,
                           allow_downgrade=allow_downgrade, allow_interface_change=allow_interface_change,
                           probation=probation, staging_max_p95_ms=staging_max_p95_ms, shadow=shadow)

    result = PushResult(desired={}, topic=topics.target_desired(addr.target), warnings=warnings, cost=cost)
    return _publish(broker, result, record, chunks=chunks, addr=addr,
                    follow=Follow(timeout=timeout, expect=tuple(expect or ()), progress=progress) if wait else None)


def remove(broker: BrokerConfig, *, model: str, device: str | None = None, group: str | None = None,
           wait: bool = False, timeout: float = 600, expect: list[str] | None = None,
           progress: Callable[[str, dict], None] = lambda _d, _e: None, sign_key=None, key_cert=None) -> PushResult:
    """Publish a removal record (retained, signed with `sign_key`) for `model` of the device or
    group: the devices unload the model and delete its files. With `wait`, follow each device's
    events until it reports `removed` (or fails, or time runs out)."""
    if model is None:
        raise InputError("--remove needs --model NAME (the model to remove)")
    addr = Address.of(device=device, group=group, model=model)
    signer = Signer.load(sign_key, key_cert)
    topics = Topics(broker.topic_prefix)
    result = PushResult(desired={}, topic=topics.target_desired(addr.target), success="removed")
    return _publish(broker, result, lambda issued: removal_record(target=addr.target, update_id=uuid.uuid4().hex,
                                                                  issued=issued, signer=signer),
                    chunks=None, addr=addr,
                    follow=Follow(timeout=timeout, expect=tuple(expect or ()), progress=progress) if wait else None)


@dataclass(frozen=True)
class Follow:
    """How `--wait` follows the devices: for how long, which group members to expect besides those
    whose retained status names the group, and who hears each event."""

    timeout: float = 600
    expect: tuple[str, ...] = ()
    progress: Callable[[str, dict], None] = lambda _d, _e: None


def _publish(broker: BrokerConfig, result: PushResult, record: Callable[[str], dict], *,
             chunks: Callable[[MqttClient], None] | None, addr: Address, follow: Follow | None) -> PushResult:
    """The record (made for its `issued`) first, so online devices start pulling chunks while they
    are still being published (the transfer pipelines); offline ones find them retained later.
    `chunks` publishes the bundle's chunks on the same connection."""
    topics = Topics(broker.topic_prefix)
    conn = Collector(broker, [topics.events(), topics.status()] if follow else [], name="push")
    try:
        result.desired = record(_issued_after(conn, result.topic))
        publish_record(conn.client, result.topic, result.desired)
        if chunks is not None:
            chunks(conn.client)
        if follow:
            _follow(conn, result, addr=addr, follow=follow)
        return result
    finally:
        conn.stop()


def _fleet_table(broker: BrokerConfig):
    """The devices' retained status (fleet.status.FleetTable), read once before publishing."""
    from fleet.status import FleetWatcher

    w = FleetWatcher(broker, name="push-check", telemetry=False)
    try:
        w.settle(quiet_s=0.2, max_s=5.0)
    finally:
        w.stop()
    return w.table


def running_bundles(table, *, device: str | None, group: str | None, model: str | None) -> dict[str, str | None]:
    """Target device -> sha256 of the bundle it runs for `model` (None: unknown), from retained status."""
    out: dict[str, str | None] = {}
    for e in table.entries(group=group):
        if device is None or e.status.device_id == device:
            m = e.status.for_model(model).model
            out[e.status.device_id] = m.bundle_sha256 if m else None
    if device is not None:
        out.setdefault(device, None)
    return out


def with_patches(broker: BrokerConfig, p: Prepared, indexes: dict[str, cdc.ModelIndex],
             running) -> tuple[Prepared, dict[str, bytes]]:
    """`p` with chunk patches against the bundles the devices run (fleet.patches), and their bytes."""
    from fleet.patches import add_patches

    lists = {sha: b for ix in indexes.values() for sha, b in ix.bundles.items()}
    t, patches = add_patches(broker, p.path, p.transfer, lists, running)
    return replace(p, transfer=t), patches


def _publish_delta(client: MqttClient, p: Prepared, indexes: dict[str, cdc.ModelIndex], *, model: str,
                   desired_topic: str, inform: Callable[[str], None], patches: dict[str, bytes] | None = None) -> None:
    cdc.publish_delta(client, p.path, p.transfer, skip=cdc.retained(indexes), patches=patches)
    cleared = cdc.record_index(client, Topics(client.cfg.topic_prefix).root, model=model, sha256=p.sha256,
                               t=p.transfer, desired_topic=desired_topic, indexes=indexes)
    if cleared:
        inform(f"delta: cleared {cleared} retained chunk(s) that no desired record names any more")


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


def publish_chunks(client: MqttClient, p: Prepared, window: int = 64) -> None:
    """Every chunk, retained, with a bounded number in flight (memory stays flat for big bundles)."""
    transfer = p.transfer
    with open(p.path, "rb") as f:
        chunks = iter(lambda: f.read(transfer.chunk_size), b"")
        publish_retained(client, ((Topics.chunk(transfer.topic, i), c) for i, c in enumerate(chunks)), window=window)


def _follow(conn: Collector, result: PushResult, *, addr: Address, follow: Follow) -> None:
    """Collect events for this update_id; the target set is the device, or the group's members
    that serve the model (from their retained status) or answer with an event (a model new to
    them), plus `expect`. A device's status seen through the model also gives a final state whose
    event this connection missed."""
    uid = result.desired["update_id"]
    topics = Topics(conn.client.cfg.topic_prefix)
    targets = {addr.device} if addr.device else set(follow.expect)
    deadline = time.monotonic() + follow.timeout
    seen = 0
    while time.monotonic() < deadline:
        new, seen = conn.take(seen, 0.5)
        for topic, payload in new:
            hit, doc = topics.parse_device(topic), parse_json(payload)
            if hit is None or not isinstance(doc, dict):
                continue
            dev, kind = hit
            if kind == "status":
                st = DeviceStatus.from_dict(dev, doc).for_model(addr.model)
                _status_seen(result, dev, st, uid, follow)
                if addr.group and addr.group in st.groups and (addr.model is None or st.model is not None):
                    targets.add(dev)
            elif kind == "events" and doc.get("update_id") == uid:
                result.devices[dev] = doc
                targets.add(dev)
                follow.progress(dev, doc)
        if targets and all(result.devices.get(t, {}).get("state") in FINAL for t in targets):
            return
    for t in targets:
        if result.devices.get(t, {}).get("state") not in FINAL:
            result.devices[t] = {**result.devices.get(t, {}), "state": "timed_out",
                                 "error": f"no final state within {follow.timeout:.0f} s"}
    if not targets:
        result.devices["(none)"] = {"state": "timed_out", "error": f"no device of group {addr.group!r} reported"}


def _status_seen(result: PushResult, dev: str, st: DeviceStatus, uid: str, follow: Follow) -> None:
    u = st.update
    if u and u.update_id == uid and u.state in FINAL and result.devices.get(dev, {}).get("state") not in FINAL:
        result.devices[dev] = {"update_id": uid, "state": u.state, "version": u.version, "error": u.error}
        follow.progress(dev, result.devices[dev])


def clear(broker: BrokerConfig, *, device: str | None = None, group: str | None = None,
          model: str | None = None) -> None:
    """Remove a retained desired record (devices keep what they run): the model's, or with no
    `model` the device's or group's own."""
    topic = Topics(broker.topic_prefix).target_desired(Address.of(device=device, group=group, model=model).target)
    conn = Collector(broker, [], name="clear")
    try:
        conn.client.publish_wait(topic, b"", qos=1, retain=True)
    finally:
        conn.stop()


__all__ = ["push", "remove", "running_bundles", "clear", "prepare", "make_record", "removal_record", "publish_record", "publish_chunks",
           "interface_warnings", "model_for", "Address", "PushResult", "Prepared", "Signer", "DEFAULT_CHUNK"]
