"""`edgepack fleet capture pull`: bring a device's captured requests home as a file `edgepack build`
reads (`--calibration` / `--validation`).

Send a capture request (edgeproto.capture; signed when a key is given) to `devices/{id}/capture/request`,
wait for the device's result on `.../capture/result`, then take the file's retained chunks, check each
chunk's sha256 and the whole file's, write the file (to a temporary name, renamed: a failed pull writes
nothing) and clear the retained chunks from the broker."""
from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.capture import FINAL, MAX_SAMPLES, SCHEMA, data_topic, transfer_from
from edgeproto.records import JobState
from edgeproto.desired import sign_record
from edgeproto.mqtt import dumps
from edgeproto.topics import Topics
from fleet.conn import Collector, parse_json, wait_online
from fleet.errors import FleetError
from fleet.records import TARGET_ID, Signer

SUFFIXES = (".npz", ".txt")
TEXT = "text"  # the input text models take on the device


class CaptureFailed(FleetError):
    """The device refused the pull or could not answer it (the message says why)."""


@dataclass(frozen=True)
class Timeouts:
    status_s: float = 3.0  # for the device's retained status
    answer_s: float = 15.0  # for the device to accept or refuse
    pull_s: float = 120.0  # for the file, once accepted


def pull(broker: BrokerConfig, *, device: str, out: Path, model: str | None = None, max_samples: int = 1000,
         clear: bool = False, sign_key=None, key_cert=None, timeouts: Timeouts = Timeouts()) -> dict:
    """Pull up to `max_samples` of the newest captured samples of `model` on `device` into `out`
    (.npz: one array per input plus `output:NAME`; .txt: a text model's texts, one per line).
    Returns the device's result (samples, layout, sha256, size) with `file`."""
    out = Path(out)
    if not TARGET_ID.match(device or ""):
        raise InputError(f"device id {device!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if out.suffix not in SUFFIXES:
        raise InputError(f"-o {out.name}: write the samples to a .npz (any model) or a .txt (text models)")
    if not out.parent.is_dir():
        raise InputError(f"-o {out}: the folder {out.parent} does not exist")
    if not 1 <= max_samples <= MAX_SAMPLES:
        raise InputError(f"--max-samples must be in 1..{MAX_SAMPLES}")
    signer = Signer.load(sign_key, key_cert)
    topics = Topics(broker.topic_prefix)
    rid = uuid.uuid4().hex
    doc = {"schema": SCHEMA, "request_id": rid, "target": f"devices/{device}", "model": model,
           "max_samples": max_samples, "clear": clear,
           "issued": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    if signer.key is not None:
        doc = sign_record(doc, signer.key, cert=signer.cert)
    conn = Collector(broker, [topics.status(device), topics.capture_result(device)], name="capture")
    try:
        wait_online(conn, topics, device, timeouts.status_s, then="pull again")
        seen = len(conn.messages)
        if not conn.client.publish_wait(topics.capture_request(device), dumps(doc), qos=1, timeout=30):
            raise FleetError(f"the broker did not acknowledge the capture request on {topics.capture_request(device)}")
        res = _result(conn, topics, device, rid, seen, timeouts)
        topic = data_topic(broker.topic_prefix, device, rid)
        try:
            data = _fetch(broker, res, topic, timeouts.pull_s)
        finally:
            _clear(conn, topic, res)
    finally:
        conn.stop()
    _write(out, data)
    return {**res, "file": str(out)}


def _result(conn: Collector, topics: Topics, device: str, rid: str, seen: int, timeouts: Timeouts) -> dict:
    want, accepted = topics.capture_result(device), False
    deadline = time.monotonic() + timeouts.answer_s
    while time.monotonic() < deadline:
        new, seen = conn.take(seen, 0.5)
        for t, payload in new:
            r = parse_json(payload) if t == want else None
            if not isinstance(r, dict) or r.get("request_id") != rid:
                continue
            if r.get("state") in FINAL:
                if r["state"] != JobState.DONE:
                    raise CaptureFailed(f"{device} {r['state']} the capture pull: {r.get('error') or 'no reason given'}")
                return r
            if not accepted:
                accepted, deadline = True, time.monotonic() + timeouts.pull_s
    if not accepted:
        raise FleetError(f"device {device!r} did not answer the capture request within {timeouts.answer_s:.0f} s",
                         hint="is its agent running and connected, and recent enough for data capture?")
    raise FleetError(f"device {device!r} did not finish the capture pull within {timeouts.pull_s:.0f} s")


def _fetch(broker: BrokerConfig, res: dict, topic: str, wait_s: float) -> bytes:
    """The file from its retained chunks, every chunk and the whole checked against the result."""
    size, sha = res.get("size"), res.get("sha256")
    try:
        if not isinstance(size, int) or not isinstance(sha, str):
            raise ValueError("the result has no size or sha256")
        t = transfer_from(res.get("transfer"), topic=topic, size=size)
    except ValueError as e:
        raise CaptureFailed(f"the device's capture result is malformed: {e}") from None
    got: dict[int, bytes] = {}
    sub = Collector(broker, [f"{topic}/chunks/+"], name="capture-data")
    try:
        deadline, seen = time.monotonic() + wait_s, 0
        while len(got) < t.chunks and time.monotonic() < deadline:
            new, seen = sub.take(seen, 0.5)
            for name, payload in new:
                i = name.rsplit("/", 1)[-1]
                if i.isdigit() and int(i) < t.chunks and hashlib.sha256(payload).hexdigest() == t.chunk_sha256[int(i)]:
                    got[int(i)] = payload
    finally:
        sub.stop()
    if len(got) < t.chunks:
        raise CaptureFailed(f"{t.chunks - len(got)} of {t.chunks} chunks of the capture file did not arrive intact "
                            f"within {wait_s:.0f} s", hint="pull again")
    data = b"".join(got[i] for i in range(t.chunks))
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
        raise CaptureFailed("the capture file does not match the sha256 and size the device reported")
    return data


def _clear(conn: Collector, topic: str, res: dict) -> None:
    """The file's chunks off the broker (they were retained only for this pull)."""
    n = (res.get("transfer") or {}).get("chunks")
    if not isinstance(n, int) or not 0 < n <= 100_000:
        return
    for i in range(n - 1):
        conn.client.publish(f"{topic}/chunks/{i}", b"", qos=1, retain=True)
    conn.client.publish_wait(f"{topic}/chunks/{n - 1}", b"", qos=1, retain=True, timeout=10)


def _write(out: Path, data: bytes) -> None:
    if out.suffix == ".txt":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if TEXT not in z.files:
                raise CaptureFailed(f"the captured samples hold no text (inputs: "
                                    f"{[k for k in z.files if not k.startswith('output:')]})",
                                    hint="write them to a .npz instead")
            data = "".join(str(s).replace("\n", " ") + "\n" for s in z[TEXT].reshape(-1)).encode()
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


__all__ = ["CaptureFailed", "Timeouts", "pull"]
