"""A delta update's missing chunks as byte ranges of the bundle at a URL (`cdc` with `url`).

Runs of missing chunks (and gaps of less than GAP bytes between them, cheaper to read through
than to ask for again) become one `Range: bytes=a-b` request each; every chunk is checked against
its sha256 before it is stored. A server that answers 200 (no ranges) is read through once, keeping
only the wanted chunks; file:// URLs are read the same way. Only from the prefixes the device
allows, redirects included (transfer._opener), within the slow-retrieval deadline."""
from __future__ import annotations

import hashlib
import time
import urllib.error
import urllib.request
from typing import Callable

from device_agent.ota.transfer import Cancelled, TransferError, TransferPolicy, TransientError, _opener, url_allowed

GAP = 64 << 10
MOST = 8 << 20  # bytes one request asks for at most


def spans(wanted: list[tuple[int, int, str]]) -> list[list[tuple[int, int, str]]]:
    """Chunks (offset, size, sha256) in file order grouped into requests."""
    out: list[list[tuple[int, int, str]]] = []
    for c in sorted(wanted):
        if out and c[0] - (out[-1][-1][0] + out[-1][-1][1]) < GAP and c[0] + c[1] - out[-1][0][0] <= MOST:
            out[-1].append(c)
        else:
            out.append([c])
    return out


def fetch_ranges(url: str, wanted: list[tuple[int, int, str]], *, store: Callable[[str, bytes], None],
                 policy: TransferPolicy, cancelled: Callable[[], bool]) -> None:
    """`store(sha256, bytes)` for every wanted chunk, read from `url` (see the module docstring)."""
    if not url_allowed(url, policy.allowed_urls):
        raise TransferError(f"downloads from {url[:200]!r} are not allowed by [ota] allowed_urls")
    opener = _opener(policy.allowed_urls)
    total = sum(n for _, n, _ in wanted)
    t0 = time.monotonic()
    deadline = t0 + policy.deadline(total)
    groups = spans(wanted)
    while groups:
        start, end = groups[0][0][0], groups[0][-1][0] + groups[0][-1][1]
        headers = {"Range": f"bytes={start}-{end - 1}"} if url.startswith("http") else {}
        try:
            with opener.open(urllib.request.Request(url, headers=headers), timeout=min(30.0, policy.stall_s)) as r:
                if getattr(r, "status", None) == 206:
                    todo, at = groups.pop(0), start
                else:  # the whole file from its start (no ranges, or file://): every chunk in this one pass
                    todo, at = [c for g in groups for c in g], 0
                    groups = []
                _read_chunks(r, todo, at, url=url, store=store, cancelled=cancelled,
                             late=lambda: time.monotonic() > deadline)
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise TransferError(f"download from {url[:200]} failed: HTTP {e.code} {e.reason}") from None
            raise TransientError(f"download from {url[:200]} failed: HTTP {e.code} {e.reason}") from None
        except (OSError, urllib.error.URLError, ValueError) as e:
            if isinstance(e, OSError) and e.errno == 28:  # ENOSPC
                raise TransferError(f"out of disk space while downloading: {e}") from None
            raise TransientError(f"download from {url[:200]} failed: {e}") from None


def _read_chunks(r, todo: list[tuple[int, int, str]], at: int, *, url: str, store: Callable[[str, bytes], None],
                 cancelled: Callable[[], bool], late: Callable[[], bool]) -> None:
    """The chunks `todo` (in file order) from a response whose first byte is the file's byte `at`."""
    read = getattr(r, "read1", r.read)
    buf = bytearray()
    for off, size, sha in todo:
        while at + len(buf) < off + size:
            if cancelled():
                raise Cancelled("update cancelled")
            if late():
                raise TransientError(f"download from {url[:200]} too slow (slow-retrieval deadline)")
            block = read(1 << 16)
            if not block:
                raise TransientError(f"{url[:200]} ended at byte {at + len(buf)}, before {off + size}")
            buf += block
            if at + len(buf) <= off:  # all before the chunk (a gap, or a server that ignored the range)
                at += len(buf)
                buf.clear()
        lo = off - at
        data = bytes(buf[lo:lo + size])
        if hashlib.sha256(data).hexdigest() != sha:
            raise TransferError(f"bytes {off}-{off + size - 1} of {url[:200]} do not match the desired record's "
                                f"chunk {sha[:16]}...: another file at that URL, or tampered")
        store(sha, data)
        del buf[:lo + size]
        at = off + size


__all__ = ["fetch_ranges", "spans", "GAP"]
