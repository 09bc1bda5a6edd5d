"""Which desired records a device acts on: parsed strictly, meant for the topic they arrived on,
signed by a trusted key (when keys are configured), from an allowed source, and not replayed.

Replay protection: per source topic the newest accepted `issued` is persisted (DATA/records.json),
with the update_ids seen and a digest of each record. A record issued earlier than the one
accepted on its topic, or an update_id reused for a different record, is refused. The retained
record the broker hands out again on every reconnect is the same record: accepted silently.
Comparisons are between records (the pusher's clock), never against the device's clock, so a
device without a real-time clock or with a jumping clock is not affected."""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

from device_agent.ota.keyring import Keyring
from device_agent.ota.statefile import read_state, write_state
from edgebundle.errors import EdgepackError
from edgebundle.trust import parse_time
from edgeproto.desired import Desired, Limits, RecordError, Removal, UrlTransfer, receive_record, url_allowed

MAX_SEEN = 512


@dataclass(frozen=True)
class SourcePolicy:
    """Where bundles may come from besides the configured broker: URL prefixes (`[ota] allowed_urls`)."""

    allowed_urls: tuple[str, ...] = ()


class RecordGate:
    def __init__(self, *, keyring: Keyring, limits: Limits, topic_prefix: str, sources: SourcePolicy,
                 state_path: Path | None):
        self.keyring, self.limits, self.prefix, self.sources, self.path = keyring, limits, topic_prefix, sources, state_path
        self._lock = threading.Lock()
        self.floors: dict[str, dict] = {}  # topic -> {"issued", "update_id"}
        self.seen: dict[str, str] = {}  # update_id -> record digest
        self._load()

    def accept(self, payload: bytes, topic: str) -> Desired | Removal | None:
        """The record to act on, None for a cleared topic; RecordError (with the update_id when
        it could be read) for anything refused, saying why. A removal passes the same checks. The
        payload is parsed once (edgeproto.desired.receive_record): the checks read the typed record
        and the bytes its signature covers."""
        got = receive_record(payload, source=topic, limits=self.limits, topic_prefix=self.prefix)
        if got is None:
            return None
        d, uid = got.record, got.record.update_id

        def refuse(msg: str, hint: str | None = None):
            return RecordError(f"refused desired record {uid} on {topic}: {msg}", update_id=uid, hint=hint)

        if d.target is not None and topic != f"{self.prefix}/{d.target}/desired":
            raise refuse(f"it is meant for {d.target!r}, not this topic (a record replayed onto another topic?)")
        if self.keyring.enabled:
            if d.signature is None:
                raise refuse("the record is not signed, and this device only takes signed records",
                             hint="push with --sign-key FLEET_KEY")
            if d.target is None or d.issued is None:
                raise refuse("a signed record must name its target and when it was issued")
            try:
                self.keyring.verify_record(got.signed, d.signature)
            except EdgepackError as e:
                raise refuse(str(e).split("\n")[0], hint=getattr(e, "hint", None)) from None
        if isinstance(d, Desired) and isinstance(d.transfer, UrlTransfer) and not url_allowed(d.transfer.url, self.sources.allowed_urls):
            raise refuse(f"downloads from {d.transfer.url[:200]!r} are not allowed by this device "
                         f"([ota] allowed_urls: {list(self.sources.allowed_urls) or 'none'})",
                         hint="push over MQTT, or add the URL prefix to the device's [ota] allowed_urls")
        digest = hashlib.sha256(got.signed).hexdigest()
        with self._lock:
            floor = self.floors.get(topic)
            if uid in self.seen:
                if self.seen[uid] != digest:
                    raise refuse("this update_id was already used by a different record (a replay?)")
                if floor is None or floor.get("update_id") == uid:
                    return d  # the same record again (retained: delivered on every reconnect)
                raise refuse(f"a replayed record: update {floor['update_id']} (issued {floor.get('issued')}) "
                             "replaced it on this topic")
            if floor and d.issued is not None and floor.get("issued"):
                if _time(d.issued) <= _time(floor["issued"]):
                    raise refuse(f"issued {d.issued}, not after the record already accepted on this topic "
                                 f"({floor['issued']}, update {floor['update_id']}): a replayed or out-of-date record")
            elif floor and d.issued is None and self.keyring.enabled:
                raise refuse("the record has no issued time")
            self.seen[uid] = digest
            while len(self.seen) > MAX_SEEN:
                self.seen.pop(next(iter(self.seen)))
            self.floors[topic] = {"issued": d.issued, "update_id": uid}
            self._save()
        return d

    def _load(self) -> None:
        doc = read_state(self.path, ("floors", "seen"), otherwise="replay protection restarts from the next record")
        if doc and isinstance(doc["floors"], dict) and isinstance(doc["seen"], dict):
            self.floors = {str(k): v for k, v in doc["floors"].items() if isinstance(v, dict)}
            self.seen = {str(k): str(v) for k, v in doc["seen"].items()}

    def _save(self) -> None:  # disk full: kept in memory, written with the next record
        write_state(self.path, {"schema": 1, "floors": self.floors, "seen": self.seen}, what="accepted records")


def _time(text: str):
    try:
        return parse_time(text, what="issued")
    except ValueError:  # a damaged state file: the oldest possible time
        return parse_time("1970-01-01T00:00:00+00:00", what="issued")
