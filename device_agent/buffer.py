"""Bounded on-disk queue (SQLite) for telemetry while the broker is unreachable.

Messages leave in insertion order and are deleted only after the broker acknowledged
them (QoS 1 PUBACK), so an agent restart or a broker outage loses nothing within the
bounds. Past the bounds the oldest messages are dropped and the drops counted.

Commits are durable (synchronous=FULL: fsync at every commit): with NORMAL, a power loss could
roll back committed sequence numbers, and `seq` would go backwards. When the disk cannot take a
write (full, read-only, I/O error) the message is dropped and counted in `write_errors`, the
error is kept in `last_error` for the status topic, and nothing raises: the agent keeps serving."""
from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("edgepack.agent")


class QueueUnwritable(Exception):
    """The queue's disk refused a write (counted; the caller drops what it wanted to queue)."""


class DiskQueue:
    def __init__(self, path: str | Path, *, max_messages: int = 10_000, max_bytes: int = 10 << 20):
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.write_errors = 0  # messages that could not be written (disk full...), since start
        self.last_error: str | None = None  # the last write error, None once a write succeeds again
        self._lock = threading.RLock()  # a callable payload may read health() inside push()
        self._sending: int | None = None  # the message being published (see sending())
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', 0)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', 0)")

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def _failed(self, e: sqlite3.Error) -> QueueUnwritable:
        self.write_errors += 1
        if self.last_error is None:
            log.error("telemetry buffer cannot be written (%s): dropping and counting messages until it can", e)
        self.last_error = str(e)
        return QueueUnwritable(str(e))

    def push(self, topic: str, payload: bytes | Callable[[int], bytes]) -> int:
        """Append; returns how many old messages were dropped to stay within bounds.
        QueueUnwritable (counted) when the disk refuses the write.

        A callable payload is given the next sequence number (one that keeps counting across
        restarts, so gaps reveal lost messages), taken in the same transaction as the insert: a
        kill between the two cannot leave a number used by no message, an uncounted gap."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    if callable(payload):
                        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
                        payload = payload(db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0])
                    db.execute("INSERT INTO queue (topic, payload, size) VALUES (?, ?, ?)",
                               (topic, payload, len(payload)))
                    count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue").fetchone()
                    dropped = 0
                    while count > self.max_messages or (size > self.max_bytes and count > 1):
                        # never the message on its way to the broker: it may arrive, and then it
                        # would be counted both as dropped and as delivered
                        row = db.execute("SELECT id, size FROM queue WHERE id != ? ORDER BY id LIMIT 1",
                                         (self._sending if self._sending is not None else -1,)).fetchone()
                        if row is None:
                            break
                        oldest, osize = row
                        db.execute("DELETE FROM queue WHERE id = ?", (oldest,))
                        count, size, dropped = count - 1, size - osize, dropped + 1
                    if dropped:
                        db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise self._failed(e) from None
            if self.last_error is not None:
                log.warning("telemetry buffer writable again (%d message(s) were dropped)", self.write_errors)
                self.last_error = None
            return dropped

    def sending(self, msg_id: int | None) -> bool:
        """Mark the message being published (None when done): push() drops around it. False when
        the message was dropped since it was peeked (it is counted as dropped: do not send it)."""
        with self._lock:
            self._sending = None
            if msg_id is None:
                return True
            try:
                if self._db.execute("SELECT 1 FROM queue WHERE id = ?", (msg_id,)).fetchone() is None:
                    return False
            except sqlite3.Error:
                pass  # cannot tell: send it (at least once)
            self._sending = msg_id
            return True

    def peek(self, n: int = 50) -> list[tuple[int, str, bytes]]:
        with self._lock:
            try:
                return self._db.execute("SELECT id, topic, payload FROM queue ORDER BY id LIMIT ?", (n,)).fetchall()
            except sqlite3.Error as e:
                log.warning("cannot read the telemetry buffer: %s", e)
                return []

    def delete(self, msg_id: int) -> bool:
        """False when the delete could not be written (the message is sent again later: at least once)."""
        with self._lock:
            try:
                self._db.execute("DELETE FROM queue WHERE id = ?", (msg_id,))
                return True
            except sqlite3.Error as e:
                log.warning("cannot delete a delivered message from the telemetry buffer: %s", e)
                return False

    def __len__(self) -> int:
        with self._lock:
            try:
                return self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
            except sqlite3.Error:
                return 0

    @property
    def dropped(self) -> int:
        with self._lock:
            try:
                return self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0]
            except sqlite3.Error:
                return 0

    def health(self) -> dict:
        """The buffer's view for status and telemetry."""
        return {"queued": len(self), "dropped_total": self.dropped, "write_errors": self.write_errors,
                "error": self.last_error}

    def close(self) -> None:
        with self._lock:
            self._db.close()
