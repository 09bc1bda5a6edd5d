"""Data capture (off by default): a bounded, sampled ring of real requests on disk, pulled by the fleet.

- Sampling never touches the request path beyond a random draw and a non-blocking queue put: a
  share `rate` of answered requests (at most `per_minute` a minute) goes to a writer thread; when
  its queue is full the sample is dropped and counted.
- The ring: one `.npz` per captured request in DATA/capture/ (other models: models.d/NAME/capture/),
  the request's inputs by name and the model's outputs as `output:NAME`, written to a temporary
  name and renamed (a crash leaves no half sample). Over `max_bytes` the oldest go first.
- A pull (edgeproto.capture) packs the newest samples into one `.npz`, one array per input (the
  layout `edgepack build --calibration` reads), outputs alongside, and sends it to the fleet as
  retained, hash-checked chunks; `clear` deletes the sent samples from the device.
Inputs are kept as the client sent them (text as text); what to keep off the ring: docs/ota.md."""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from edgebundle.errors import EdgepackError
from edgeproto.bundleref import Limits, MqttTransfer, RecordError
from edgeproto.capture import CaptureRequest, data_topic
from edgeproto.documents import now_iso
from edgeproto.mqtt import dumps
from edgeproto.records import JobState

log = logging.getLogger("edgepack.agent.capture")
OUTPUT = "output:"
MAX_SEEN = 256


@dataclass(frozen=True)
class CapturePolicy:
    rate: float = 0.0  # share of answered requests captured; 0: capture is off
    per_minute: int = 60  # captured requests a minute, at most
    max_bytes: int = 64 << 20  # the ring on disk, per model
    queue: int = 8  # captured requests waiting for the writer; more are dropped
    chunk_size: int = 256 << 10  # a pulled file's chunks

    @property
    def on(self) -> bool:
        return self.rate > 0


class Ring:
    """One model's captured requests on disk."""

    def __init__(self, folder: Path, policy: CapturePolicy, *, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic):
        self.folder, self.policy, self._rng, self._clock = Path(folder), policy, rng, clock
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self.folder.glob("*.tmp"):  # a write cut off by a crash
            p.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._files: deque[tuple[Path, int]] = deque(
            (p, p.stat().st_size) for p in sorted(self.folder.glob("*.npz")))
        self._bytes = sum(n for _p, n in self._files)
        self._seq = int(self._files[-1][0].stem) + 1 if self._files else 0
        self._tokens, self._t = float(policy.per_minute), clock()
        self.kept = self.dropped = self.limited = 0
        self._q: queue.Queue = queue.Queue(policy.queue)
        self._thread = threading.Thread(target=self._writer, name="capture", daemon=True)
        self._thread.start()

    # ---- the request path: a draw, a token, a non-blocking put ----
    def offer(self, inputs: dict, outputs: dict) -> None:
        if self._rng() >= self.policy.rate:
            return
        with self._lock:
            now = self._clock()
            self._tokens = min(float(self.policy.per_minute),
                               self._tokens + (now - self._t) * self.policy.per_minute / 60.0)
            self._t = now
            if self._tokens < 1.0:
                self.limited += 1
                return
            self._tokens -= 1.0
        try:
            self._q.put_nowait((inputs, outputs))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    # ---- the writer thread ----
    def _writer(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._write(*item)
            except (OSError, ValueError) as e:  # a full disk costs samples, never requests
                log.warning("capture: sample not written: %s", e)

    def _write(self, inputs: dict, outputs: dict) -> None:
        arrays = {k: a for k, v in inputs.items() if (a := _array(v)) is not None}
        arrays.update({OUTPUT + k: a for k, v in outputs.items() if (a := _array(v)) is not None})
        if not arrays:
            return
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
        path = self.folder / f"{seq:012d}.npz"
        tmp = path.with_suffix(".npz.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        size = path.stat().st_size
        with self._lock:
            self._files.append((path, size))
            self._bytes += size
            self.kept += 1
            while self._bytes > self.policy.max_bytes and len(self._files) > 1:
                old, n = self._files.popleft()
                old.unlink(missing_ok=True)
                self._bytes -= n

    # ---- pulls ----
    def newest(self) -> list[Path]:
        with self._lock:
            return [p for p, _n in reversed(self._files)]

    def forget(self, paths: list[Path]) -> None:
        gone = set(paths)
        with self._lock:
            keep = deque((p, n) for p, n in self._files if p not in gone)
            self._bytes = sum(n for _p, n in keep)
            self._files = keep
        for p in gone:
            p.unlink(missing_ok=True)

    def summary(self) -> dict:
        with self._lock:
            return {"requests": len(self._files), "bytes": self._bytes, "kept": self.kept, "dropped": self.dropped,
                    "rate_limited": self.limited}

    def close(self) -> None:
        try:
            self._q.put(None, timeout=5)
        except queue.Full:
            pass
        self._thread.join(timeout=10)


def _array(v) -> np.ndarray | None:
    """A tensor as .npz keeps it without pickling: numbers as they are, text as unicode, raw bytes as
    bytes; anything else is not captured."""
    a = np.asarray(v)
    if a.dtype != object:
        return a
    items = a.reshape(-1).tolist()
    if all(isinstance(x, str) for x in items):
        return np.asarray(items, dtype=str).reshape(a.shape)
    if all(isinstance(x, bytes) for x in items):
        return np.asarray(items, dtype=bytes).reshape(a.shape)
    return None


def pack(paths: list[Path], max_samples: int, out: Path) -> dict:
    """The newest samples (`paths` newest first) of the most common layout into one .npz at `out`,
    oldest first; a request's batch counts as that many samples. Returns what it holds."""
    groups: dict[tuple, list[dict]] = {}
    used: dict[tuple, list[Path]] = {}
    rows: Counter = Counter()
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            log.warning("capture: %s unreadable (%s): skipped", p.name, e)
            continue
        n = {len(a) if a.ndim else 0 for a in arrays.values()}
        if len(n) != 1 or 0 in n:
            continue
        sig = tuple(sorted((k, a.dtype.kind if a.dtype.kind in "US" else a.dtype.str, a.shape[1:])  # texts: any width
                           for k, a in arrays.items()))
        groups.setdefault(sig, []).append(arrays)
        used.setdefault(sig, []).append(p)
        rows[sig] += n.pop()
        if rows[sig] >= max_samples:
            break
    if not rows:
        return {"samples": 0, "skipped": 0, "used": []}
    sig = rows.most_common(1)[0][0]
    parts = groups[sig][::-1]  # oldest first
    data = {k: np.concatenate([a[k] for a in parts])[-max_samples:] for k in parts[0]}
    np.savez_compressed(out, **data)
    n = len(next(iter(data.values())))
    return {"samples": n, "skipped": sum(rows.values()) - rows[sig],
            "inputs": {k: [list(a.shape[1:]), a.dtype.str] for k, a in data.items() if not k.startswith(OUTPUT)},
            "outputs": sorted(k[len(OUTPUT):] for k in data if k.startswith(OUTPUT)), "used": used[sig]}


class Host(Protocol):
    device_id: str
    mqtt: object
    keyring: object
    root: str

    def ring(self, model: str | None) -> tuple[str | None, Ring | None]: ...


class Capturer:
    """Answers capture requests (edgeproto.capture) one at a time, off the MQTT thread."""

    def __init__(self, host: Host, *, workdir: Path, result_topic: str, policy: CapturePolicy,
                 limits: Limits = Limits()):
        self.host, self.workdir, self.result_topic = host, Path(workdir), result_topic
        self.policy, self.limits = policy, limits
        self._lock = threading.Lock()
        self._busy = False
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in self.workdir.glob("*.npz"):  # a pull cut off by a crash
            p.unlink(missing_ok=True)

    def on_request(self, payload: bytes, topic: str) -> None:
        try:
            req = self._accept(payload, topic)
        except RecordError as e:
            log.error("%s", e)
            self._publish({"request_id": e.update_id, "state": JobState.REFUSED, "error": str(e).split("\n")[0]})
            return
        threading.Thread(target=self._run, args=(req,), name="capture-pull", daemon=True).start()

    def _accept(self, payload: bytes, topic: str) -> CaptureRequest:
        req = CaptureRequest.parse(payload, source=topic, limits=self.limits)

        def refuse(msg: str, hint: str | None = None) -> RecordError:
            return RecordError(f"refused capture request {req.request_id}: {msg}", update_id=req.request_id,
                               hint=hint)

        if req.target != f"devices/{self.host.device_id}":
            raise refuse(f"it is meant for {req.target!r}, not this device")
        try:
            self.host.keyring.verify_job(payload, req.signature, req.issued, what="capture request")
        except EdgepackError as e:
            raise refuse(str(e).split("\n")[0], hint=getattr(e, "hint", None)) from None
        with self._lock:
            if req.request_id in self._seen:
                raise refuse("this request_id was already answered (a replayed request?)")
            if self._busy:
                raise refuse("busy: another capture pull is being answered; send it again later")
            self._seen[req.request_id] = None
            while len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
            self._busy = True
        return req

    def _run(self, req: CaptureRequest) -> None:
        doc = {"request_id": req.request_id, "model": req.model}
        out = self.workdir / f"{req.request_id}.npz"
        try:
            name, ring = self.host.ring(req.model)
            doc["model"] = name
            if name is None:
                raise EdgepackError(f"no model {req.model!r} on this device" if req.model else "no model on this device")
            if ring is None:
                raise EdgepackError(f"capture is off on this device (model {name}): set [capture] rate in the agent's "
                                    "config (or --capture-rate) to keep samples")
            self._publish({**doc, "state": JobState.ACCEPTED})
            held = pack(ring.newest(), req.max_samples, out)
            used = held.pop("used")
            if not held["samples"]:
                raise EdgepackError(f"model {name} has no captured samples yet (capture rate {ring.policy.rate:g})")
            doc.update(held, state=JobState.DONE, **self._send(req, out))
            if req.clear:
                ring.forget(used)
                doc["cleared"] = len(used)
        except EdgepackError as e:
            doc.update(state=JobState.FAILED, error=str(e).split("\n")[0])
        except (OSError, ValueError) as e:
            log.exception("capture pull %s failed", req.request_id)
            doc.update(state=JobState.FAILED, error=f"{type(e).__name__}: {e}")
        finally:
            out.unlink(missing_ok=True)
            with self._lock:
                self._busy = False
        self._publish(doc)

    def _send(self, req: CaptureRequest, path: Path) -> dict:
        """Retained chunks of `path` on the pull's data topic, the last one acknowledged by the broker."""
        mqtt = self.host.mqtt
        if mqtt is None:
            raise EdgepackError("no broker connection")
        data = path.read_bytes()
        size, step = len(data), self.policy.chunk_size
        topic = data_topic(self.host.root, self.host.device_id, req.request_id)
        chunks = [data[i:i + step] for i in range(0, size, step)]
        for i, c in enumerate(chunks[:-1]):
            mqtt.publish(f"{topic}/chunks/{i}", c, qos=1, retain=True)
        if not mqtt.publish_wait(f"{topic}/chunks/{len(chunks) - 1}", chunks[-1], qos=1, retain=True, timeout=60):
            raise EdgepackError("the broker did not acknowledge the capture file's chunks")
        t = MqttTransfer(topic=topic, chunk_size=step, chunks=len(chunks),
                         chunk_sha256=tuple(hashlib.sha256(c).hexdigest() for c in chunks))
        return {"sha256": hashlib.sha256(data).hexdigest(), "size": size, "transfer": t.to_dict()}

    def _publish(self, doc: dict) -> None:
        mqtt = self.host.mqtt
        if mqtt is not None:
            mqtt.publish(self.result_topic, dumps({**doc, "ts": now_iso()}), qos=1)


__all__ = ["CapturePolicy", "Capturer", "Ring", "pack"]
