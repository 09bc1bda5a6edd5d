"""Delta updates on the fleet side: a bundle published as content-defined chunks (edgebundle.cdc),
each retained once on `{root}/chunks/{sha256}` and shared by every version and model.

The broker keeps one small retained index per model, `{root}/chunks/index/{model}`: the chunking
parameters and, per bundle pushed for the model, its chunk list and the desired topics whose
record names it. A push reads every model's index (chunks are shared across models), publishes
only the chunks none of them lists, says what the update costs each target device (the chunks not
in the bundle its status says it runs), then updates the model's index: the new bundle takes the
desired topic over from the bundle that had it, a bundle no topic names any more leaves the
index, and its chunks that no index lists any more are cleared from the broker.

Best effort: a record cleared by hand (`push --clear`) or published by another tool is not seen,
so its chunks stay until a later push to that topic; a chunk cleared while a device still wanted
it (its record was replaced in between) only stalls that superseded download."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.cdc import CdcParams, chunk_file
from edgeproto.desired import CdcTransfer
from edgeproto.mqtt import MqttClient, dumps
from fleet.conn import Collector, parse_json, publish_retained
from fleet.errors import FleetError


def index_topic(root: str, model: str = "+") -> str:
    return f"{root}/chunks/index/{model}"


@dataclass
class ModelIndex:
    """One model's retained index: chunking parameters, and per bundle sha256 its chunks
    ({"chunks": [sha256...], "sizes": [...], "topics": [desired topics naming it]})."""

    params: CdcParams | None = None
    bundles: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc) -> "ModelIndex":
        """Lenient: what cannot be read is left out (a damaged index costs re-publishing, nothing else)."""
        if not isinstance(doc, dict):
            return cls()
        try:
            params = CdcParams.from_dict(doc.get("chunking"))
        except ValueError:
            params = None
        bundles = {sha: b for sha, b in (doc.get("bundles") or {}).items()
                   if isinstance(b, dict) and isinstance(b.get("chunks"), list) and isinstance(b.get("sizes"), list)}
        for b in bundles.values():
            if not isinstance(b.get("patches", []), list):
                b["patches"] = []
        return cls(params=params, bundles=bundles)

    def to_doc(self) -> dict:
        return {"schema": "edgepack.chunk-index/1", "chunking": self.params.to_dict() if self.params else None,
                "bundles": self.bundles}

    def chunks(self) -> set[str]:
        """Every chunk and patch (retained alike) the index's bundles need."""
        return {c for b in self.bundles.values() for c in (*b["chunks"], *b.get("patches", ()))}

    def release(self, topics: tuple[str, ...]) -> set[str]:
        """No bundle is named by `topics` any more; returns the bundles that left the index (no
        topic names them)."""
        for b in self.bundles.values():
            b["topics"] = [t for t in b.get("topics", []) if t not in topics]
        gone = {sha for sha, b in self.bundles.items() if not b["topics"]}
        for sha in gone:
            del self.bundles[sha]
        return gone

    def take_over(self, sha256: str, transfer: CdcTransfer, topic: str, *, release: tuple[str, ...] = ()) -> set[str]:
        """The bundle `sha256` is now what `topic` names (and `release` names nothing any more: a
        rollout's own name once the group's record names its bundle); returns the bundles that
        left the index."""
        entry = self.bundles.setdefault(sha256, {"chunks": list(transfer.chunk_sha256),
                                                 "sizes": list(transfer.chunk_sizes), "topics": []})
        patches = set(entry.get("patches", ())) | {p.sha256 for p in transfer.patches}
        if patches:
            entry["patches"] = sorted(patches)
        gone = self.release((topic, *release))
        entry["topics"] = sorted(set(entry["topics"]) | {topic})
        self.bundles[sha256] = entry
        self.params = transfer.params
        return gone - {sha256}


def read_indexes(conn: Collector, root: str, *, quiet_s: float = 0.05, max_s: float = 5.0) -> dict[str, ModelIndex]:
    """Every model's retained index (model -> ModelIndex) that `conn`, subscribed to
    index_topic(root) on connect, has collected: retained messages follow the SUBACK at once, so
    the read ends when they stop arriving (the caller lets them come while it reads device status)."""
    prefix = index_topic(root)[:-1]
    seen, found = 0, {}
    deadline, last = time.monotonic() + max_s, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet_s:
        new, seen = conn.take(seen, quiet_s / 2)
        for t, payload in new:
            if t.startswith(prefix) and payload:
                found[t[len(prefix):]] = ModelIndex.from_doc(parse_json(payload))
                last = time.monotonic()
    return found


def cdc_transfer(bundle: Path, root: str, *, size: int, previous: ModelIndex | None, whole=None) -> CdcTransfer:
    """The bundle cut into content-defined chunks, with the model's previous parameters when they
    still suit its size (chunks are only comparable when cut alike). `whole` (a hashlib object) is
    fed the file in the same pass (edgebundle.cdc.chunk_file): the file is read once."""
    params = previous.params if previous and previous.params and previous.params.suits(size) else None
    params = params or CdcParams.for_size(size)
    chunks = chunk_file(bundle, params, whole=whole)
    return CdcTransfer(topic=f"{root}/chunks", params=params, chunk_sha256=tuple(c.sha256 for c in chunks),
                       chunk_sizes=tuple(c.size for c in chunks))


@dataclass(frozen=True)
class Cost:
    """What a delta push costs: bytes to publish, and per target device the bytes it fetches
    (None: its running bundle is unknown to the index, so it may fetch everything)."""

    bundle_bytes: int
    publish_bytes: int
    publish_chunks: int
    devices: dict[str, int | None]

    def lines(self) -> list[str]:
        out = [f"delta: {self.publish_chunks} new chunk(s) and patch(es), {self.publish_bytes} bytes to publish "
               f"for a bundle of {self.bundle_bytes} (the rest is retained already)"]
        for dev, n in sorted(self.devices.items()):
            out.append(f"  {dev}: fetches {n} of {self.bundle_bytes} bytes ({100 * n / self.bundle_bytes:.1f} %)"
                       if n is not None else f"  {dev}: runs a bundle the index does not know: up to "
                                             f"{self.bundle_bytes} bytes")
        return out


def _distinct(t: CdcTransfer) -> dict[str, int]:
    return dict(zip(t.chunk_sha256, t.chunk_sizes))


def cost(t: CdcTransfer, indexes: dict[str, ModelIndex], *, running: dict[str, str | None]) -> Cost:
    """`running`: target device -> sha256 of the bundle it runs for the model (None: unknown)."""
    by_sha, on_broker = _distinct(t), retained(indexes)
    new = {s: n for s, n in by_sha.items() if s not in on_broker}
    lists = {sha: set(b["chunks"]) for ix in indexes.values() for sha, b in ix.bundles.items()}
    devices = {}
    for dev, sha in running.items():
        held = lists.get(sha) if sha else None
        if held is None:
            devices[dev] = None
            continue
        best = {}  # the smallest patch this device can use per chunk
        for p in t.patches:
            if held.issuperset(p.bases):
                best[p.chunk] = min(best.get(p.chunk, p.size), p.size)
        devices[dev] = sum(best.get(s, n) for s, n in by_sha.items() if s not in held)
    new_patches = {p.sha256: p.size for p in t.patches if p.sha256 not in on_broker}
    return Cost(bundle_bytes=sum(t.chunk_sizes), publish_bytes=sum(new.values()) + sum(new_patches.values()),
                publish_chunks=len(new) + len(new_patches), devices=devices)


def retained(indexes: dict[str, ModelIndex]) -> set[str]:
    """Every chunk some model's index lists (so retained on the broker already)."""
    return set().union(*(ix.chunks() for ix in indexes.values())) if indexes else set()


def publish_delta(client: MqttClient, bundle: Path, t: CdcTransfer, *, skip: set[str],
                  patches: dict[str, bytes] | None = None, window: int = 64) -> int:
    """The bundle's chunks and `patches` (sha256 -> bytes) not in `skip`, each retained once, a
    bounded number in flight; returns how many."""
    by_sha, offsets = _distinct(t), dict(zip(t.chunk_sha256, t.offsets()))
    with open(bundle, "rb") as f:
        def chunks():
            for sha, payload in (patches or {}).items():
                if sha not in skip:
                    yield t.chunk_topic(sha), payload
            for sha, size in by_sha.items():
                if sha not in skip:
                    f.seek(offsets[sha])
                    yield t.chunk_topic(sha), f.read(size)

        return publish_retained(client, chunks(), window=window)


def record_index(client: MqttClient, root: str, *, model: str, sha256: str, t: CdcTransfer,
                 desired_topic: str | None, indexes: dict[str, ModelIndex], release: tuple[str, ...] = ()) -> int:
    """The model's index after a push (the bundle now named by `desired_topic`; None: only
    `release` the topics) retained, and the chunks no index lists any more cleared; returns how
    many were cleared."""
    ix = indexes.setdefault(model, ModelIndex())
    before = retained(indexes)
    if desired_topic is None:
        ix.release(release)
    else:
        ix.take_over(sha256, t, desired_topic, release=release)
    if not client.publish_wait(index_topic(root, model), dumps(ix.to_doc()), qos=1, retain=True, timeout=30):
        raise FleetError(f"the broker did not acknowledge the chunk index of {model}")
    unused = before - retained(indexes)
    for sha in sorted(unused):
        client.publish(f"{root}/chunks/{sha}", b"", qos=1, retain=True)
    return len(unused)


__all__ = ["ModelIndex", "Cost", "cdc_transfer", "cost", "index_topic", "publish_delta", "read_indexes",
           "record_index", "retained"]
