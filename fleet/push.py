"""`edgepack push` as a library call: publish a bundle as desired state (its chunks retained on the
broker, or a URL) and follow the devices' update events; remove a model from devices (a signed
removal record); clear a desired record.

The records come from fleet.records (shared with the rollout controller), the bundle's transfer
from fleet.transfer: one function here per transfer mode (`_plain`, `_by_url`, `_delta`) says what
goes on the broker once the record is out and what the pusher is told first."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from edgebundle.archive import Bundle, open_bundle
from edgebundle.errors import InputError
from edgebundle.trust import parse_time
from edgeproto.broker import BrokerConfig
from edgeproto.mqtt import MqttClient
from edgeproto.records import FINAL_STATES, DeviceStatus
from edgeproto.topics import Topics
from fleet import delta as cdc
from fleet import transfer
from fleet.conn import Collector, parse_json
from fleet.records import (Address, Prepared, Signer, Terms, default_model, interface_warnings, make_record, model_for,
                           old_agents, publish_record, removal_record)
from fleet.transfer import DEFAULT_CHUNK, TransferSpec, publish_chunks, running_bundles, with_patches

FINAL = FINAL_STATES


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
class Follow:
    """How `--wait` follows the devices: for how long, which group members to expect besides those
    whose retained status names the group, and who hears each event."""

    timeout: float = 600
    expect: tuple[str, ...] = ()
    progress: Callable[[str, dict], None] = lambda _d, _e: None


@dataclass(frozen=True)
class PushOptions:
    """What `push` is told besides the bundle and the broker: a device or a group, and the model of
    theirs the record is for (default: the bundle's name; `device_topic`: their own topic, for
    agents that predate several models); how the bundle travels; what the record asks of the
    devices; the key that signs it (a private key or its PEM path; devices with trusted keys refuse
    unsigned records) and its certificate from the root key (or its path), loaded when the push
    starts; `follow` the devices until each reaches a final state (None: return once published);
    `check_interface`: read their retained status first and warn about an interface change."""

    device: str | None = None
    group: str | None = None
    model: str | None = None
    device_topic: bool = False
    transfer: TransferSpec = TransferSpec()
    terms: Terms = Terms()
    sign_key: object = None
    key_cert: object = None
    follow: Follow | None = None
    check_interface: bool = True


@dataclass(frozen=True)
class Survey:
    """What a push reads from the broker before it publishes: the devices' retained status (a
    fleet.status.FleetTable; None: not read) and every model's chunk index (None: not a delta)."""

    table: object = None
    indexes: dict[str, cdc.ModelIndex] | None = None


@dataclass(frozen=True)
class Sending:
    """A bundle ready to go by its transfer mode: what the record says about it, what goes on the
    broker once the record is out (`publish(client, desired_topic)`; None: nothing, the devices
    download from a URL), what a delta costs, and what the pusher is told before publishing."""

    prepared: Prepared
    publish: Callable[[MqttClient, str], None] | None = None
    cost: cdc.Cost | None = None
    notes: tuple[str, ...] = ()


def push(bundle: Path, broker: BrokerConfig, options: PushOptions = PushOptions(), *,
         warn: Callable[[str], None] = lambda _m: None, inform: Callable[[str], None] = lambda _m: None) -> PushResult:
    """Publish the desired record (retained) for the options' model of a device or a group, then
    the bundle's chunks (retained; the transfer pipelines: online devices start pulling while they
    are published, offline ones find them later); with `options.follow`, follow the target
    devices' events until each commits, fails, rolls back, or time runs out.

    Devices whose model has another interface than the bundle are named through `warn` and in
    the result; agents that predate several models too, when the record is a model's. The
    record's `issued` is now, or just after the record already on the topic, so a pusher with a
    slow clock cannot make its record look older. A delta push (fleet.delta) publishes only the
    chunks the broker does not retain yet; what the update costs each device is said through
    `inform` (and `result.cost`) before publishing. Agents that predate delta updates refuse such
    a record: push those without it."""
    o = options
    Address.of(device=o.device, group=o.group)  # a bad --device or --group fails before the bundle is read
    signer = Signer.load(o.sign_key, o.key_cert)
    o.transfer.check()
    b = open_bundle(bundle)  # a bad bundle or model name fails before the broker is asked
    addr = Address.of(device=o.device, group=o.group,
                      model=model_for(default_model(b.manifest), model=o.model, device_topic=o.device_topic))
    topics = Topics(broker.topic_prefix)
    survey = _survey(broker, topics, statuses=o.check_interface or o.transfer.delta, indexes=o.transfer.delta)
    if o.transfer.delta:
        send = _delta(b, topics, o.transfer, broker=broker, survey=survey, addr=addr, inform=inform)
    elif o.transfer.url:
        send = _by_url(b, o.transfer)
    else:
        send = _plain(b, topics, o.transfer)
    p = send.prepared
    warnings = _warnings(survey.table, p, addr, allowed=o.terms.allow_interface_change) if o.check_interface else []
    for msg in warnings:
        warn(msg)
    for line in send.notes:
        inform(line)

    def record(issued: str) -> dict:
        return make_record(p, target=addr.target, update_id=uuid.uuid4().hex, issued=issued, signer=signer,
                           terms=o.terms)

    result = PushResult(desired={}, topic=topics.target_desired(addr.target), warnings=warnings, cost=send.cost)
    return _publish(broker, result, record, publish=send.publish, addr=addr, follow=o.follow)


# ---- one function per transfer mode ----
def _plain(b: Bundle, topics: Topics, spec: TransferSpec) -> Sending:
    """Fixed-size chunks, all published (retained) after the record."""
    p = transfer.plain(b, topics, chunk_size=spec.chunk_size)
    return Sending(p, publish=lambda client, _topic: publish_chunks(client, p))


def _by_url(b: Bundle, spec: TransferSpec) -> Sending:
    """The devices download the bundle from the URL: nothing is published but the record."""
    return Sending(transfer.by_url(b, url=spec.url))


def _delta(b: Bundle, topics: Topics, spec: TransferSpec, *, broker: BrokerConfig, survey: Survey, addr: Address,
           inform: Callable[[str], None]) -> Sending:
    """Content-defined chunks cut alike with the model's previous version, with patches against
    the bundles the target devices run; only what no model's index lists is published, then the
    model's index names the bundle by the record's topic. With a URL the devices read byte ranges
    there: nothing is published, and no patches (they live on the broker)."""
    indexes, model = survey.indexes, addr.model or default_model(b.manifest)
    p = transfer.delta(b, topics, previous=indexes.get(model), url=spec.url)
    running = running_bundles(survey.table, device=addr.device, group=addr.group, model=addr.model)
    if spec.url:
        cost = cdc.cost(p.transfer, indexes, running=running)
        return Sending(p, cost=cost, notes=(f"delta from {spec.url}: devices fetch byte ranges of the bundle there, "
                                            "nothing is published", *cost.lines()[1:]))
    p, patches = with_patches(broker, p, indexes, running.values())
    cost = cdc.cost(p.transfer, indexes, running=running)

    def publish(client: MqttClient, desired_topic: str) -> None:
        cdc.publish_delta(client, p.path, p.transfer, skip=cdc.retained(indexes), patches=patches)
        cleared = cdc.record_index(client, topics.root, model=model, sha256=p.sha256, t=p.transfer,
                                   desired_topic=desired_topic, indexes=indexes)
        if cleared:
            inform(f"delta: cleared {cleared} retained chunk(s) that no desired record names any more")

    return Sending(p, publish=publish, cost=cost, notes=tuple(cost.lines()))


def _survey(broker: BrokerConfig, topics: Topics, *, statuses: bool, indexes: bool) -> Survey:
    """The devices' retained status (`statuses`) and, for a delta (`indexes`), every model's
    retained chunk index: they arrive while the status is read."""
    ix_conn = Collector(broker, [cdc.index_topic(topics.root)], name="push-index") if indexes else None
    try:
        table = _fleet_table(broker) if statuses else None
        # the status read waited for 0.2 s of quiet: the retained indexes (sent right after the SUBACK) are in
        found = cdc.read_indexes(ix_conn, topics.root, quiet_s=0.01) if ix_conn else None
    finally:
        if ix_conn:
            ix_conn.stop()
    return Survey(table=table, indexes=found)


def _warnings(table, p: Prepared, addr: Address, *, allowed: bool) -> list[str]:
    """Target devices that will refuse the record (another interface) or not see it (an agent that
    predates several models, for a model's record)."""
    devices = [addr.device] if addr.device else None
    out = interface_warnings(table, p, devices=devices, group=addr.group, allowed=allowed, model=addr.model)
    old = old_agents(table, devices=devices, group=addr.group) if addr.model else []
    if old:
        out.append(f"{len(old)} device(s) run an agent that predates several models and will not see a "
                   f"record on the model's topic: {', '.join(old[:8])}; push with --device-topic for them")
    return out


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
                    publish=None, addr=addr,
                    follow=Follow(timeout=timeout, expect=tuple(expect or ()), progress=progress) if wait else None)


def _publish(broker: BrokerConfig, result: PushResult, record: Callable[[str], dict], *,
             publish: Callable[[MqttClient, str], None] | None, addr: Address, follow: Follow | None) -> PushResult:
    """The record (made for its `issued`) first, so online devices start pulling chunks while they
    are still being published (the transfer pipelines); offline ones find them retained later.
    `publish` sends the bundle's chunks after it, on the same connection."""
    topics = Topics(broker.topic_prefix)
    conn = Collector(broker, [topics.events(), topics.status()] if follow else [], name="push")
    try:
        result.desired = record(_issued_after(conn, result.topic))
        publish_record(conn.client, result.topic, result.desired)
        if publish is not None:
            publish(conn.client, result.topic)
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


__all__ = ["push", "remove", "clear", "Follow", "PushOptions", "PushResult", "Signer", "Terms", "TransferSpec",
           "DEFAULT_CHUNK"]
