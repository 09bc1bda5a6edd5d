"""Getting a bundle onto the device: MQTT chunks (default) or a URL, resumable, checked.

MQTT design: the pusher publishes each chunk *retained* on `{topic}/chunks/{i}`; the agent
pulls them by subscribing to a small window of chunk topics at a time (a retained message is
delivered on subscribe) and unsubscribing once a chunk is stored. So the broker never queues
more than the window for the device (mosquitto keeps only 100 queued messages per offline
client by default), a device that was offline fetches whenever it returns, and a restart
resumes from the chunks already on disk. Every chunk is checked against its sha256 before it
is written; the whole file against the bundle's sha256, hashed as it is written (no second pass:
the next step is handed a file whose sha256 is the desired record's)."""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from edgebundle.errors import EdgepackError
from edgeproto.desired import Desired, MqttTransfer, url_allowed

Progress = Callable[..., None]  # (bytes done, total[, transfer]): transfer = {"fetched": ..., "reused": ...}


@dataclass(frozen=True)
class TransferPolicy:
    """Slow-retrieval and source limits (`[ota]` settings). A transfer must finish within
    `grace_s + size / min_rate` seconds of broker-connected time, and make progress at least
    every `stall_s`; URL transfers only from `allowed_urls` prefixes (redirects included)."""

    allowed_urls: tuple[str, ...] = ()
    min_rate: int = 16 << 10  # bytes per second
    grace_s: float = 120.0
    stall_s: float = 120.0

    def deadline(self, remaining: int) -> float:
        return self.grace_s + remaining / max(self.min_rate, 1)


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


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _complete(h, part: Path, *, final: Path, sha256: str, what: str) -> Path:
    """The hash computed while the file was written decides: it becomes the bundle, or goes."""
    if h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise TransferError(f"{what} bundle sha256 {h.hexdigest()[:16]}... does not match {sha256[:16]}...")
    os.replace(part, final)
    return final


class ChunkFetcher(Protocol):
    """Pulls an MQTT transfer into a work folder, fed the chunk messages of the agent's session
    (injected into the updater; tests pass fakes)."""

    def on_message(self, topic: str, payload: bytes) -> bool: ...

    def fetch(self, d: Desired, workdir: Path, *, progress: Progress, cancelled: Callable[[], bool]) -> Path: ...


@dataclass(frozen=True)
class Pull:
    """Chunks to pull from retained topics `base + tail(k)` for each key k in `keys`: every payload
    is checked against `sha256(k)` and `length(k)` before `store(k, payload)` takes it. `tails`
    maps a topic tail back to its key when tails are not the keys' digits (hashes)."""

    base: str
    keys: tuple[int, ...]
    tail: Callable[[int], str]
    sha256: Callable[[int], str]
    length: Callable[[int], int]
    store: Callable[[int, bytes], None]
    max_len: int
    tails: dict[str, int] | None = None
    window: int = 16


class MqttChunkFetcher:
    """Pull retained chunks with a bounded window of subscriptions."""

    def __init__(self, mqtt, *, window: int = 16, stall_s: float = 20.0, policy: TransferPolicy = TransferPolicy()):
        self.mqtt, self.window, self.stall_s, self.policy = mqtt, window, stall_s, policy
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._inbox: dict[int, bytes | int] = {}  # key -> payload, or its length when it is too long
        self._prefix: str | None = None
        self._max_len = 0
        self._count = 0
        self._tails: dict[str, int] | None = None

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Called from the MQTT thread; returns True when the message was a chunk for us. Anything
        that is not a chunk of the current transfer, or is longer than a chunk, is dropped here
        (never buffered)."""
        with self._lock:
            if self._prefix is None or not topic.startswith(self._prefix):
                return False
            key = self._key(topic[len(self._prefix):])
            if key is None:
                return True
            self._inbox[key] = payload if len(payload) <= self._max_len else len(payload)
            self._arrived.notify_all()
            return True

    def _key(self, tail: str) -> int | None:
        if self._tails is not None:
            return self._tails.get(tail)
        if tail.isascii() and tail.isdigit() and len(tail) <= 9 and int(tail) < self._count:
            return int(tail)
        return None

    def fetch(self, d: Desired, workdir: Path, *, progress: Progress, cancelled: Callable[[], bool]) -> Path:
        """Chunks go straight to their offset in DATA/downloads/<sha>/bundle.part (indexes of the
        stored ones in chunks.done), and the whole-file sha256 is computed as the prefix grows,
        so there is no second pass over the data."""
        t = d.transfer
        if not isinstance(t, MqttTransfer):
            raise TypeError("MqttChunkFetcher.fetch needs an MQTT transfer")
        final = workdir / "bundle.edgepack"
        if final.is_file():
            return final
        csize = t.chunk_size
        lengths = [min(csize, d.size - i * csize) for i in range(t.chunks)]
        part = PartFile(workdir, size=d.size, offsets=[i * csize for i in range(t.chunks)], lengths=lengths,
                        hashes=list(t.chunk_sha256))
        missing = tuple(i for i in range(t.chunks) if i not in part.done)
        check_space(workdir, d.size - part.bytes_done)

        def store(i: int, payload: bytes) -> None:
            part.put(i, payload)
            progress(part.bytes_done, d.size)

        with part:
            self.pull(Pull(base=t.topic.rstrip("/") + "/chunks/", keys=missing, tail=str,
                           sha256=t.chunk_sha256.__getitem__, length=lengths.__getitem__, store=store, max_len=csize,
                           window=self.window), count=t.chunks, cancelled=cancelled)
            return part.finish(final, sha256=d.sha256)

    def pull(self, job: Pull, *, cancelled: Callable[[], bool], count: int = 0) -> None:
        """Subscribe to a window of chunk topics at a time (a retained chunk arrives on subscribe),
        unsubscribe from each once stored, resubscribe to one that does not come; within the
        slow-retrieval deadline of broker-connected time. TransferError for a chunk that does not
        match (fatal: retained chunks give the same bytes again), TransientError when too slow."""
        missing = list(job.keys)
        remaining = sum(job.length(k) for k in missing)
        with self._lock:
            self._prefix, self._inbox, self._max_len = job.base, {}, job.max_len
            self._count, self._tails = count, job.tails
        outstanding: dict[int, float] = {}
        budget = self.policy.deadline(remaining)  # seconds of broker-connected time
        got_bytes, connected_s = 0, 0.0
        last_tick = last_progress = time.monotonic()
        topic = lambda k: job.base + job.tail(k)  # noqa: E731
        try:
            while missing or outstanding:
                if cancelled():
                    raise Cancelled("update cancelled")
                now = time.monotonic()
                if not self.mqtt.connected.is_set():
                    # a broker outage is not the update's fault: wait (the clocks stop meanwhile)
                    missing[:0] = sorted(outstanding)  # subscriptions die with the session: ask again later
                    outstanding.clear()
                    last_tick = last_progress = now
                    time.sleep(0.2)
                    continue
                connected_s += now - last_tick
                last_tick = now
                if connected_s > budget:
                    raise TransientError(f"download too slow: {got_bytes} of {remaining} bytes after "
                                         f"{connected_s:.0f} s (at least {self.policy.min_rate} bytes/s expected)")
                ask = []  # one SUBSCRIBE for the window's new chunks, one UNSUBSCRIBE per turn
                while missing and len(outstanding) < job.window:
                    k = missing.pop(0)
                    ask.append(topic(k))
                    outstanding[k] = time.monotonic()
                self.mqtt.subscribe(ask, qos=1)
                with self._arrived:
                    if not self._inbox:
                        self._arrived.wait(0.5)
                    got, self._inbox = self._inbox, {}
                done = []
                try:
                    for k, payload in sorted(got.items()):
                        if k not in outstanding:
                            continue
                        done.append(topic(k))
                        del outstanding[k]
                        _check(job, k, payload)
                        job.store(k, payload)
                        got_bytes += len(payload)
                        last_progress = time.monotonic()
                    for k in [k for k, t0 in outstanding.items() if time.monotonic() - t0 > self.stall_s]:
                        done.append(topic(k))  # nothing came: resubscribe (lost SUBACK, broker restart)
                        del outstanding[k]
                        missing.insert(0, k)
                finally:
                    self.mqtt.unsubscribe(done)
                if time.monotonic() - last_progress > self.policy.stall_s:
                    raise TransientError(f"no chunk arrived for {self.policy.stall_s:.0f} s "
                                         f"({len(missing) + len(outstanding)} left); is the bundle still published?")
        finally:
            with self._lock:
                self._prefix = None
            self.mqtt.unsubscribe([topic(k) for k in outstanding])


def _check(job: Pull, k: int, payload: bytes | int) -> None:
    """A chunk as the record lists it, else the update is refused (TransferError)."""
    name = f"chunk {job.tail(k)[:16]}"
    if isinstance(payload, int):
        raise TransferError(f"{name} is {payload} bytes, more than the chunk size of {job.max_len}: "
                            "corrupted or tampered; refusing the update")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != job.sha256(k) or len(payload) != job.length(k):
        raise TransferError(f"{name} sha256 {digest[:16]}... does not match the desired record's "
                            f"{job.sha256(k)[:16]}...: corrupted or tampered; refusing the update")


class PartFile:
    """DATA/downloads/<sha>/bundle.part being assembled: chunks written at their offsets, their
    indexes logged in chunks.done (no fsync per chunk: a restart re-hashes each logged chunk and
    keeps those that match), the whole-file sha256 extended as the contiguous prefix grows. Used
    as a context manager: a fatal error (TransferError, OSError: ENOSPC) removes both files."""

    def __init__(self, workdir: Path, *, size: int, offsets: list[int], lengths: list[int], hashes: list[str]):
        self.path, self.done_file = workdir / "bundle.part", workdir / "chunks.done"
        self.size, self.offsets, self.lengths = size, offsets, lengths
        self.done = _resume_at(self.path, self.done_file, hashes, offsets, lengths, size)
        self.bytes_done = sum(lengths[i] for i in self.done)
        self._held: dict[int, bytes] = {}  # stored ahead of the hash prefix (at most a window)
        self._hash, self._next = hashlib.sha256(), 0
        self._fd, self._log = -1, None

    def __enter__(self) -> "PartFile":
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._fd).st_size != self.size:
            os.ftruncate(self._fd, self.size)  # sparse: blocks are allocated as chunks land
        self._log = open(self.done_file, "a")
        self._advance()
        return self

    def put(self, i: int, data: bytes) -> None:
        try:
            os.pwrite(self._fd, data, self.offsets[i])
            self._log.write(f"{i}\n")
            self._log.flush()
        except OSError as e:
            raise TransferError(f"cannot store chunk {i}: {e}") from None
        if i not in self.done:
            self.bytes_done += len(data)
            self.done.add(i)
        self._held[i] = data
        self._advance()

    def finish(self, final: Path, *, sha256: str) -> Path:
        """fsync, then the hash computed on the way decides: the file becomes `final`, or goes."""
        os.fsync(self._fd)
        self._close()
        try:
            return _complete(self._hash, self.path, final=final, sha256=sha256, what="assembled")
        finally:
            self.done_file.unlink(missing_ok=True)

    def _advance(self) -> None:
        while self._next in self.done:
            i = self._next
            data = self._held.pop(i, None)
            if data is None:
                data = os.pread(self._fd, self.lengths[i], self.offsets[i])
            self._hash.update(data)
            self._next += 1

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __exit__(self, kind, exc, tb) -> None:
        self._close()
        if kind is not None and issubclass(kind, (TransferError, OSError)):  # fatal: nothing kept
            _discard(self.path, self.done_file)
            if not issubclass(kind, TransferError):
                raise TransferError(f"cannot store the download: {exc}") from None


def _resume(part: Path, done_file: Path, hashes: list[str], csize: int, size: int) -> set[int]:
    """Fixed-size chunks stored before a restart, each re-checked against its hash."""
    n = len(hashes)
    return _resume_at(part, done_file, hashes, [i * csize for i in range(n)],
                      [max(0, min(csize, size - i * csize)) for i in range(n)], size)


def _resume_at(part: Path, done_file: Path, hashes: list[str], offsets: list[int], lengths: list[int],
               size: int) -> set[int]:
    """Chunks stored before a restart, each re-checked against its hash (no fsync per chunk)."""
    if not (part.is_file() and done_file.is_file()) or part.stat().st_size != size:
        _discard(part, done_file)
        return set()
    done = set()
    with open(part, "rb") as f:
        for line in done_file.read_bytes().split():  # bytes: a log damaged by a power loss is not text
            if not (line.isascii() and line.isdigit()) or len(line) > 9:
                continue
            i = int(line)
            if 0 <= i < len(hashes):
                f.seek(offsets[i])
                if hashlib.sha256(f.read(lengths[i])).hexdigest() == hashes[i]:
                    done.add(i)
    done_file.write_text("".join(f"{i}\n" for i in sorted(done)))
    return done


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL the device's policy allows (else: SSRF through a redirect)."""

    def __init__(self, allowed: tuple[str, ...]):
        super().__init__()
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not url_allowed(newurl, self.allowed):
            raise TransferError(f"the server redirected to {newurl[:200]!r}, which [ota] allowed_urls does not allow")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(allowed: tuple[str, ...]) -> urllib.request.OpenerDirector:
    o = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.FileHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), _Redirects(allowed)):
        o.add_handler(handler)
    return o


def _hash_prefix(path: Path, n: int):
    """A running sha256 over the first `n` bytes of a download being resumed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while n > 0 and (block := f.read(min(n, 1 << 20))):
            h.update(block)
            n -= len(block)
    return h


def fetch_url(d: Desired, workdir: Path, *, progress: Progress, cancelled: Callable[[], bool],
              policy: TransferPolicy = TransferPolicy()) -> Path:
    """http(s):// with Range resume, or file://; same size and hash checks, the hash computed as
    the bytes are written; only from sources the policy allows, within the slow-retrieval deadline."""
    final = workdir / "bundle.edgepack"
    if final.is_file():
        return final
    url = d.transfer.url
    if not url_allowed(url, policy.allowed_urls):
        raise TransferError(f"downloads from {url[:200]!r} are not allowed by [ota] allowed_urls")
    part = workdir / "download.part"
    have = part.stat().st_size if part.exists() else 0
    if have > d.size:
        part.unlink()
        have = 0
    check_space(workdir, d.size - have)
    t0 = time.monotonic()
    deadline = t0 + policy.deadline(d.size - have)
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have and url.startswith("http") else {})
    try:
        with _opener(policy.allowed_urls).open(req, timeout=min(30.0, policy.stall_s)) as r:
            status = getattr(r, "status", 200)
            if have and status != 206:
                have = 0  # the server ignored Range: start over
            h = _hash_prefix(part, have) if have else hashlib.sha256()
            read = getattr(r, "read1", r.read)  # what has arrived, not a full megabyte: the deadline holds
            with open(part, "ab" if have else "wb") as f:
                if url.startswith("file://") and have:
                    r.read(have)
                done = have
                while block := read(1 << 16):
                    if cancelled():
                        raise Cancelled("update cancelled")
                    done += len(block)
                    if done > d.size:
                        raise TransferError(f"download is larger than the desired record's {d.size} bytes")
                    f.write(block)
                    h.update(block)
                    progress(done, d.size)
                    if time.monotonic() > deadline:
                        raise TransientError(f"download too slow: {done} of {d.size} bytes after "
                                             f"{time.monotonic() - t0:.0f} s (at least {policy.min_rate} bytes/s expected)")
                f.flush()
                os.fsync(f.fileno())
    except urllib.error.HTTPError as e:
        if 400 <= e.code < 500 and e.code not in (408, 429):  # will not fix itself: give up
            part.unlink(missing_ok=True)
            raise TransferError(f"download from {url} failed: HTTP {e.code} {e.reason}") from None
        raise TransientError(f"download from {url} failed: HTTP {e.code} {e.reason}") from None
    except (OSError, urllib.error.URLError, ValueError) as e:
        if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
            part.unlink(missing_ok=True)
            raise TransferError(f"out of disk space while downloading: {e}") from None
        raise TransientError(f"download from {url} failed: {e}") from None
    return _complete(h, part, final=final, sha256=d.sha256, what="assembled")
