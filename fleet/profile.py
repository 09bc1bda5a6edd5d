"""`edgepack profile`: measure bundles on one running device, through the broker it already uses.

For each bundle: publish its chunks (retained, as `edgepack push` does), send a profile job
(edgeproto.jobs) to `devices/{id}/profile/job`, and wait on `devices/{id}/profile/result` for the
device to accept it (bounded) and to finish it (bounded). The device never activates the bundle.
Chunks this command published are cleared afterwards (those a push had already retained stay)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.desired import MqttTransfer, sign_record
from edgeproto.jobs import SCHEMA, BenchSettings
from edgeproto.mqtt import dumps
from edgeproto.records import DeviceStatus, JobState, ProfileResult
from edgeproto.topics import Topics
from fleet.conn import Collector, parse_json, wait_online
from fleet.errors import FleetError
from fleet.records import TARGET_ID, Prepared, Signer
from fleet.transfer import DEFAULT_CHUNK, prepare, publish_chunks


class ProfileRefused(FleetError):
    """The device refused or could not finish a profile job (the message says why)."""


@dataclass(frozen=True)
class Timeouts:
    status_s: float = 3.0  # for the device's retained status (is it known, online?)
    accept_s: float = 15.0  # for the device to accept or refuse a job
    job_s: float = 300.0  # for a job to finish once accepted


def profile(bundles: list[Path], broker: BrokerConfig, *, device: str, bench: BenchSettings = BenchSettings(),
            timeouts: Timeouts = Timeouts(), chunk_size: int = DEFAULT_CHUNK, sign_key=None, key_cert=None,
            progress: Callable[[ProfileResult], None] = lambda _r: None) -> list[ProfileResult]:
    """Profile each bundle on `device`, one after the other; returns the final result of each
    (state 'done'). Raises FleetError when the device is unknown, offline or silent, and
    ProfileRefused when it refuses or fails a job (`results` on the error holds the ones before)."""
    if not TARGET_ID.match(device or ""):
        raise InputError(f"device id {device!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not bundles:
        raise InputError("give at least one BUNDLE")
    signer = Signer.load(sign_key, key_cert)
    topics = Topics(broker.topic_prefix)
    prepared = [prepare(Path(b), topics, chunk_size=chunk_size) for b in bundles]  # bad input before the broker
    conn = Collector(broker, [topics.status(device), topics.profile_result(device)], name="profile")
    results: list[ProfileResult] = []
    try:
        wait_online(conn, topics, device, timeouts.status_s, then="profile again")
        for p in prepared:
            try:
                results.append(_one(conn, topics, p, device=device, bench=bench, timeouts=timeouts, signer=signer,
                                    progress=progress))
            except FleetError as e:
                e.results = results
                raise
        return results
    finally:
        conn.stop()


def _one(conn: Collector, topics: Topics, p: Prepared, *, device: str, bench: BenchSettings, timeouts: Timeouts,
         signer: Signer, progress) -> ProfileResult:
    if not isinstance(p.transfer, MqttTransfer):
        raise InputError("profile jobs send bundles as MQTT chunks")
    job_id = uuid.uuid4().hex
    doc = {"schema": SCHEMA, "job_id": job_id, "target": f"devices/{device}",
           "issued": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "name": p.name,
           "version": p.version, "sha256": p.sha256, "size": p.size, "transfer": p.transfer.to_dict(),
           "bench": bench.to_dict()}
    if signer.key is not None:
        doc = sign_record(doc, signer.key, cert=signer.cert)
    kept = _already_retained(conn, Topics.chunk(p.transfer.topic, 0))
    seen = len(conn.messages)
    try:
        publish_chunks(conn.client, p)
        if not conn.client.publish_wait(topics.profile_job(device), dumps(doc), qos=1, timeout=30):
            raise FleetError(f"the broker did not acknowledge the profile job on {topics.profile_job(device)}")
        return _wait(conn, topics, device, job_id, seen, timeouts, progress, p)
    finally:
        if not kept:
            _clear_chunks(conn, p)


def _wait(conn: Collector, topics: Topics, device: str, job_id: str, seen: int, timeouts: Timeouts, progress,
          p: Prepared) -> ProfileResult:
    want = topics.profile_result(device)
    accepted = False
    deadline = time.monotonic() + timeouts.accept_s
    while time.monotonic() < deadline:
        new, seen = conn.take(seen, 0.5)
        for t, payload in new:
            if t == topics.status(device):
                st = DeviceStatus.from_dict(device, parse_json(payload))
                if st.online is False:
                    raise FleetError(f"device {device!r} went offline during profile job {job_id} "
                                     f"({st.reason or 'no reason given'})")
                continue
            r = ProfileResult.from_dict(device, parse_json(payload)) if t == want else None
            if r is None or r.job_id != job_id:
                continue
            progress(r)
            if r.final:
                if r.state != JobState.DONE:
                    raise ProfileRefused(f"{device} {r.state} the profile job for {p.name} {p.version} "
                                         f"({p.path.name}): {r.error or 'no reason given'}")
                return r
            if not accepted:
                accepted = True
                deadline = time.monotonic() + timeouts.job_s
    if not accepted:
        raise FleetError(f"device {device!r} did not answer the profile job within {timeouts.accept_s:.0f} s",
                         hint="is its agent running and connected, and recent enough for profile jobs?")
    raise FleetError(f"device {device!r} did not finish profiling {p.path.name} within {timeouts.job_s:.0f} s",
                     hint="raise --timeout, or lower --max-seconds/--runs")


def _already_retained(conn: Collector, topic: str, wait_s: float = 0.3) -> bool:
    """Whether `topic` holds a retained message already (a push's chunks: leave them in place)."""
    got = []
    probe = Collector(conn.client.cfg, [topic], name="profile-probe")
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not got:
            got, _ = probe.take(0, 0.05)
    finally:
        probe.stop()
    return any(payload for _t, payload in got)


def _clear_chunks(conn: Collector, p: Prepared) -> None:
    for i in range(p.transfer.chunks):
        conn.client.publish(Topics.chunk(p.transfer.topic, i), b"", qos=1, retain=True)
    conn.client.publish_wait(Topics.chunk(p.transfer.topic, p.transfer.chunks - 1), b"", qos=1, retain=True,
                             timeout=10)


def result_row(r: ProfileResult) -> dict:
    """One flat row per result (the CLI's table and JSON)."""
    f, b = r.figures, r.bundle
    lat = f.get("latency_ms") or {}
    return {"device": r.device_id, "bundle": f"{b.get('name')} {b.get('version')}", "precision": b.get("precision"),
            "target": b.get("target"), "p50_ms": lat.get("p50"), "p95_ms": lat.get("p95"), "p99_ms": lat.get("p99"),
            "throughput_ips": f.get("throughput_ips"), "load_ms": f.get("load_ms"),
            "rss_delta_bytes": f.get("rss_delta_bytes"), "provider": f.get("provider"), "threads": f.get("threads"),
            "golden_ok": f.get("golden_ok"), "runs": f.get("runs"), "paused_s": f.get("paused_s")}


__all__ = ["profile", "ProfileRefused", "Timeouts", "result_row"]
