"""Helpers for OTA tests: agents with keys, pushes, hand-made desired records (as an attacker or a
careless operator would publish them), and small probes. Every wait is bounded."""
from __future__ import annotations

import hashlib
import json
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from agents import AgentProc, wait_until
from edgeproto.broker import BrokerConfig
from edgeproto.desired import Probation

QUICK = Probation(seconds=1.5, requests=1000)
ROOT = "edgepack/v1"


def push_options(*, device=None, group=None, model=None, device_topic=False, url=None, chunk_size=4096, delta=False,
                 allow_downgrade=False, allow_interface_change=False, probation=QUICK, staging_max_p95_ms=None,
                 shadow=None, sign_key=None, key_cert=None, wait=False, timeout=60, expect=(),
                 progress=lambda _d, _e: None, check_interface=True):
    """`edgepack push`'s flags (as keywords) as fleet.PushOptions; small chunks for small test bundles."""
    from fleet import Follow, PushOptions, Terms, TransferSpec

    return PushOptions(device=device, group=group, model=model, device_topic=device_topic,
                       transfer=TransferSpec(url=url, chunk_size=chunk_size, delta=delta),
                       terms=Terms(allow_downgrade=allow_downgrade, allow_interface_change=allow_interface_change,
                                   probation=probation, staging_max_p95_ms=staging_max_p95_ms, shadow=shadow),
                       sign_key=sign_key, key_cert=key_cert, check_interface=check_interface,
                       follow=Follow(timeout=timeout, expect=tuple(expect), progress=progress) if wait else None)


def push(broker, bundle, *, sign=None, warn=lambda _m: None, inform=lambda _m: None, **flags):
    """`edgepack push` as a library call (flags: push_options); `sign` is the private key that signs
    the record."""
    import fleet

    if sign is not None:
        flags["sign_key"] = sign
    return fleet.push(bundle, BrokerConfig(url=broker.url), push_options(**flags), warn=warn, inform=inform)


def agent(tmp_path, broker, bundle, keys, *, device="dev1", group=None, env=None, name="data", extra=(),
          trusted=("a.pub",), port=None, start=True):
    args = ("--log-format", "text")
    for k in trusted:
        args += ("--trusted-key", str(keys / k))
    if group:
        args += ("--group", group)
    a = AgentProc(tmp_path / name, bundle=bundle, broker=broker.url if broker else None, device_id=device,
                  interval=1.0, extra=args + tuple(extra), env=env, port=port)
    return a.start() if start else a


def version(a) -> str | None:
    meta = a.metadata()
    return meta["versions"][0] if meta else None


def infer(a, x=None, *, model="digits", name="image") -> int:
    x = np.full((1, 8, 8, 1), 0.5, np.float32) if x is None else np.asarray(x, np.float32)
    body = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(a.base + f"/v2/models/{model}/infer", data=body),
                                    timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def state(data_dir: Path) -> str | None:
    try:
        return json.loads((Path(data_dir) / "update.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


def record(bundle: Path, *, target: str, chunk_size: int = 4096, issued: str | None = None, **fields) -> tuple[dict, list[bytes]]:
    """A desired record for `bundle` as `edgepack push` makes it (unsigned), plus its chunks.
    `fields` override or add top-level fields (None removes one)."""
    from edgebundle.archive import open_bundle

    data = Path(bundle).read_bytes()
    m = open_bundle(bundle).manifest
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    sha = hashlib.sha256(data).hexdigest()
    doc = {"schema": "edgepack.desired/1", "update_id": uuid.uuid4().hex, "name": m.name, "version": m.version,
           "sha256": sha, "size": len(data),
           "transfer": {"method": "mqtt", "topic": f"{ROOT}/bundles/{sha}", "chunk_size": chunk_size,
                        "chunks": len(chunks), "chunk_sha256": [hashlib.sha256(c).hexdigest() for c in chunks]},
           "allow_downgrade": False,
           "probation": {"seconds": QUICK.seconds, "requests": QUICK.requests, "max_error_rate": 0.02,
                         "max_p95_ms": None},
           "staging": {"max_p95_ms": None},
           "issued": issued or datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
           "target": target}
    for k, v in fields.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    return doc, chunks


def sign_record(doc: dict, key_path: Path, *, cert: dict | None = None) -> dict:
    from edgeproto.desired import sign_record as _sign
    from edgebundle.signing import load_private_key

    return _sign(doc, load_private_key(key_path), cert=cert)


class Publisher:
    """A bare MQTT client (as any broker client could be), publishing retained by default."""

    def __init__(self, url: str, **auth):
        import paho.mqtt.client as mqtt

        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv311)
        if auth.get("username"):
            self.c.username_pw_set(auth["username"], auth.get("password"))
        if url.startswith("mqtts"):
            self.c.tls_set(ca_certs=auth["ca"])
        host, port = url.split("://")[1].split(":")
        self.c.connect(host, int(port))
        self.c.loop_start()

    def publish(self, topic: str, payload, *, retain: bool = True) -> None:
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published(), topic

    def chunks(self, doc: dict, chunks: list[bytes], upto: int | None = None) -> None:
        for i, c in enumerate(chunks[:upto]):
            self.publish(f"{doc['transfer']['topic']}/chunks/{i}", c)

    def stop(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def publish_record(broker, doc: dict, chunks: list[bytes] | None = None, *, topic: str | None = None,
                   upto: int | None = None) -> None:
    p = Publisher(broker.url)
    try:
        if chunks:
            p.chunks(doc, chunks, upto)
        p.publish(topic or f"{ROOT}/{doc.get('target', 'devices/dev1')}/desired", doc)
    finally:
        p.stop()


def events(w, device: str = "dev1", update_id: str | None = None) -> list[dict]:
    return [e for e in w.of(f"{device}/events") if isinstance(e, dict)
            and (update_id is None or e.get("update_id") == update_id)]


def wait_final(w, update_id: str, device: str = "dev1", timeout: float = 30) -> dict:
    return w.wait(f"{device}/events", lambda e: isinstance(e, dict) and e.get("update_id") == update_id
                  and e.get("state") in ("committed", "failed", "rolled_back"), timeout=timeout)


__all__ = ["QUICK", "ROOT", "push", "agent", "version", "infer", "state", "record", "sign_record", "Publisher",
           "publish_record", "events", "wait_final", "wait_until"]


class FakeFetcher:
    """Serves `pull` from a dict of retained chunks (and patches), as MqttChunkFetcher would from
    the broker; `asked` lists what was pulled, in order."""

    window = 16

    def __init__(self, retained: dict[str, bytes]):
        self.retained, self.asked = retained, []

    def pull(self, job, *, cancelled, count=0):
        from device_agent.ota.transfer import TransientError

        for k in job.keys:
            sha = job.sha256(k)
            self.asked.append(sha)
            if sha not in self.retained:  # what the real fetcher says once nothing came for stall_s
                raise TransientError(f"no chunk arrived ({sha[:16]}... is not retained)")
            job.store(k, self.retained[sha])
