"""Getting a bundle onto the device: MQTT chunks (default) or a URL, resumable, checked.

MQTT design: the pusher publishes each chunk *retained* on `{topic}/chunks/{i}`; the agent
pulls them by subscribing to a small window of chunk topics at a time (a retained message is
delivered on subscribe) and unsubscribing once a chunk is stored. So the broker never queues
more than the window for the device (mosquitto keeps only 100 queued messages per offline
client by default), a device that was offline fetches whenever it returns, and a restart
resumes from the chunks already on disk. Every chunk is checked against its sha256 before it
is written; the assembled file against the bundle's sha256."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

from device_agent.ota.desired import Desired
from edgebundle.errors import EdgepackError

Progress = Callable[[int, int], None]  # (bytes done, total)


class TransferError(EdgepackError):
    """Fatal: retrying the same update cannot succeed (bad chunk, bad hash, no space)."""


class TransientError(EdgepackError):
    """Worth retrying later (broker away, connection reset)."""


class Cancelled(EdgepackError):
    pass


def check_space(path: Path, need: int, *, reserve: int = 8 << 20) -> None:
    free = shutil.disk_usage(path).free
    if free < need + reserve:
        raise TransferError(f"not enough disk space in {path}: {free} bytes free, the update needs {need + reserve}",
                            hint="free space on the device or use a smaller bundle")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"cannot write {path.name}: {e}") from None


def _assemble(parts: list[Path], dest: Path, sha256: str) -> Path:
    h = hashlib.sha256()
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with open(tmp, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"cannot assemble the bundle: {e}") from None
    if h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise TransferError(f"assembled bundle sha256 {h.hexdigest()[:16]}... does not match {sha256[:16]}...")
    os.replace(tmp, dest)
    return dest


class MqttChunkFetcher:
    """Pull retained chunks with a bounded window of subscriptions."""

    def __init__(self, mqtt, *, window: int = 8, stall_s: float = 20.0):
        self.mqtt, self.window, self.stall_s = mqtt, window, stall_s
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._inbox: dict[str, bytes] = {}
        self._prefix: str | None = None

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Called from the MQTT thread; returns True when the message was a chunk for us."""
        with self._lock:
            if self._prefix is None or not topic.startswith(self._prefix):
                return False
            self._inbox[topic] = payload
            self._arrived.notify_all()
            return True

    def fetch(self, d: Desired, workdir: Path, *, progress: Progress, cancelled: Callable[[], bool]) -> Path:
        t = d.transfer
        final = workdir / "bundle.edgepack"
        if final.is_file():
            return final
        parts_dir = workdir / "chunks"
        parts_dir.mkdir(parents=True, exist_ok=True)
        check_space(workdir, d.size - sum(p.stat().st_size for p in parts_dir.glob("*.chunk")) + d.size)
        n, hashes, base = int(t["chunks"]), list(t["chunk_sha256"]), t["topic"].rstrip("/") + "/chunks/"
        path = lambda i: parts_dir / f"{i:06d}.chunk"  # noqa: E731
        missing = [i for i in range(n) if not path(i).is_file()]
        done_bytes = sum(path(i).stat().st_size for i in range(n) if path(i).is_file())
        with self._lock:
            self._prefix, self._inbox = base, {}
        outstanding: dict[int, float] = {}
        last_progress = time.monotonic()
        try:
            while missing or outstanding:
                if cancelled():
                    raise Cancelled("update cancelled")
                if not self.mqtt.connected.is_set():
                    outstanding.clear()  # subscriptions die with the session; ask again after reconnect
                    if time.monotonic() - last_progress > 300:
                        raise TransientError("broker unreachable for 5 minutes during download")
                    time.sleep(0.2)
                    continue
                while missing and len(outstanding) < self.window:
                    i = missing.pop(0)
                    self.mqtt.subscribe(base + str(i), qos=1)
                    outstanding[i] = time.monotonic()
                with self._arrived:
                    if not self._inbox:
                        self._arrived.wait(0.5)
                    got, self._inbox = self._inbox, {}
                for topic, payload in got.items():
                    i = int(topic.rsplit("/", 1)[1])
                    if i not in outstanding:
                        continue
                    self.mqtt.unsubscribe(topic)
                    del outstanding[i]
                    digest = hashlib.sha256(payload).hexdigest()
                    if digest != hashes[i]:
                        raise TransferError(f"chunk {i} sha256 {digest[:16]}... does not match the desired record's "
                                            f"{hashes[i][:16]}...: corrupted or tampered; refusing the update")
                    _write_atomic(path(i), payload)
                    done_bytes += len(payload)
                    last_progress = time.monotonic()
                    progress(done_bytes, d.size)
                stale = [i for i, t0 in outstanding.items() if time.monotonic() - t0 > self.stall_s]
                for i in stale:  # no retained chunk arrived: resubscribe (a lost SUBACK, a restarted broker)
                    self.mqtt.unsubscribe(base + str(i))
                    del outstanding[i]
                    missing.insert(0, i)
                if time.monotonic() - last_progress > 120:
                    raise TransientError(f"no chunk arrived for 2 minutes ({len(missing) + len(outstanding)} left); "
                                         "is the bundle still published?")
        finally:
            with self._lock:
                self._prefix = None
            for i in outstanding:
                self.mqtt.unsubscribe(base + str(i))
        dest = _assemble([path(i) for i in range(n)], final, d.sha256)
        shutil.rmtree(parts_dir, ignore_errors=True)
        return dest


def fetch_url(d: Desired, workdir: Path, *, progress: Progress, cancelled: Callable[[], bool]) -> Path:
    """http(s):// with Range resume, or file://; same size and hash checks."""
    final = workdir / "bundle.edgepack"
    if final.is_file():
        return final
    part = workdir / "download.part"
    have = part.stat().st_size if part.exists() else 0
    check_space(workdir, d.size - have)
    url = d.transfer["url"]
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have and url.startswith("http") else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status = getattr(r, "status", 200)
            if have and status != 206:
                have = 0  # the server ignored Range: start over
            with open(part, "ab" if have else "wb") as f:
                if url.startswith("file://") and have:
                    r.read(have)
                done = have
                for block in iter(lambda: r.read(1 << 20), b""):
                    if cancelled():
                        raise Cancelled("update cancelled")
                    done += len(block)
                    if done > d.size:
                        raise TransferError(f"download is larger than the desired record's {d.size} bytes")
                    f.write(block)
                    progress(done, d.size)
                f.flush()
                os.fsync(f.fileno())
    except (OSError, urllib.error.URLError) as e:
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            part.unlink(missing_ok=True)
            raise TransferError(f"out of disk space while downloading: {e}") from None
        raise TransientError(f"download from {url} failed: {e}") from None
    dest = _assemble([part], final, d.sha256)
    part.unlink(missing_ok=True)
    return dest
