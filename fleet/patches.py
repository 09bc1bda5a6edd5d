"""Chunk patches for a delta push (edgebundle.patch): each new chunk encoded against the chunks of
the same region in the bundles the target devices run, when that saves a tenth of the chunk and
more than what the record entry costs. The bases' bytes come from the broker, where they are retained (the pusher
needs only the new bundle); a base that does not come is simply not used. Patches are content
addressed and retained on `{root}/chunks/{sha256}` like chunks, listed in the model's index so
they are cleared with the bundle that needs them (fleet.delta)."""
from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from edgebundle import patch
from edgeproto.bundleref import Patch
from edgeproto.desired import CdcTransfer
from edgeproto.broker import BrokerConfig
from fleet.conn import Collector

MIN_SAVING = 256  # bytes a patch must save over its chunk (its record entry costs about that)...
MIN_SHARE = 0.1  # ...and this share of it: a patch that saves less costs the broker a second copy for little
MOST_BASES = 2  # the most common running versions patched against
BATCH = 16  # chunks encoded (and their bases read) at a time
STOP_BELOW = 0.1  # a batch whose patches save less than this share of its bytes ends the patching
MOST_MISSING = 0.5  # a version lacking more of the bundle than this is a full retrain: no patches against it


def add_patches(broker: BrokerConfig, bundle: Path, t: CdcTransfer, lists: dict[str, dict],
                running: Iterable[str | None], *, timeout_s: float = 10.0) -> tuple[CdcTransfer, dict[str, bytes]]:
    """`t` with patches against the most common bundles in `running` (sha256s; `lists`: bundle
    sha256 -> its index entry, {"chunks", "sizes"}), and the patches' bytes by sha256. Chunks go
    a batch at a time; against a version that lacks more than half of the bundle, or once a batch
    saves little against it (every weight moved: a full retrain), chunks stay chunks rather than
    spend the pusher's time and the broker's bytes on patches (docs/benchmarks.md, delta_updates)."""
    new = list(zip(t.chunk_sha256, t.chunk_sizes))
    offsets, sizes = dict(zip(t.chunk_sha256, t.offsets())), dict(new)
    patches: dict[tuple[str, tuple[str, ...]], Patch] = {}
    payloads: dict[str, bytes] = {}
    reader = None
    try:
        with open(bundle, "rb") as f:
            for sha, _ in Counter(s for s in running if s in lists).most_common(MOST_BASES):
                have = set(lists[sha]["chunks"])
                if sum(n for c, n in new if c not in have) > MOST_MISSING * sum(sizes.values()):
                    continue  # every weight moved: patches would save a few percent for the pusher's time
                work = list(patch.plan(new, list(zip(lists[sha]["chunks"], lists[sha]["sizes"]))).items())
                for i in range(0, len(work), BATCH):
                    batch = [(c, bases, anchor) for c, (bases, anchor) in work[i:i + BATCH]
                             if (c, bases) not in patches]
                    reader = reader or _Retained(broker, t)
                    held = reader.get({b for _, bases, _ in batch for b in bases}, timeout_s=timeout_s)
                    total = saved = 0
                    for chunk, bases, anchor in batch:
                        if not all(b in held for b in bases):
                            continue
                        f.seek(offsets[chunk])
                        enc = patch.encode(f.read(sizes[chunk]), b"".join(held[b] for b in bases), anchor=anchor)
                        total += sizes[chunk]
                        if len(enc) + MIN_SAVING <= (1 - MIN_SHARE) * sizes[chunk]:
                            digest = hashlib.sha256(enc).hexdigest()
                            patches[(chunk, bases)] = Patch(chunk=chunk, bases=bases, sha256=digest, size=len(enc))
                            payloads[digest] = enc
                            saved += sizes[chunk] - len(enc)
                    if total and saved < STOP_BELOW * total:
                        break
    finally:
        if reader is not None:
            reader.stop()
    return replace(t, patches=tuple(patches.values())), payloads


class _Retained:
    """Reads retained chunks from the broker on one connection, each checked against its sha256:
    retained messages follow the SUBACK, so a read ends once they stop coming (or all came)."""

    def __init__(self, broker: BrokerConfig, t: CdcTransfer):
        self.t, self.conn, self.seen, self.got = t, Collector(broker, [], name="push-bases"), 0, {}

    def get(self, shas: set[str], *, timeout_s: float) -> dict[str, bytes]:
        """The chunks `shas` that came; those the last batch read and this one needs too (neighbouring
        chunks share bases) are not read again, the others are let go."""
        self.got = {s: b for s, b in self.got.items() if s in shas}
        want = {self.t.chunk_topic(s): s for s in shas if s not in self.got}
        if want:
            self.conn.client.subscribe(sorted(want), qos=1)
            deadline = last = time.monotonic()
            deadline += timeout_s
            while want and time.monotonic() < deadline and time.monotonic() - last < 1.0:
                new, self.seen = self.conn.take(self.seen, 0.1)
                with self.conn.cond:  # kept in `got` (checked) or not wanted: the collector need not hold them
                    del self.conn.messages[:self.seen]
                    self.seen = 0
                for topic, payload in new:
                    sha = want.get(topic)
                    if sha and hashlib.sha256(payload).hexdigest() == sha:
                        self.got[sha] = payload
                        del want[topic]
                        last = time.monotonic()
            self.conn.client.unsubscribe([self.t.chunk_topic(s) for s in shas])
        return {s: self.got[s] for s in shas if s in self.got}

    def stop(self) -> None:
        self.conn.stop()


__all__ = ["add_patches"]
