"""Bounded on-disk queue (SQLite) for telemetry while the broker is unreachable.

Messages leave in insertion order and are deleted only after the broker acknowledged
them (QoS 1 PUBACK), so an agent restart or a broker outage loses nothing within the
bounds. Past the bounds the oldest messages are dropped and the drops counted."""
from __future__ import annotations

import sqlite3
import threading
from pathlib import Path


class DiskQueue:
    def __init__(self, path: str | Path, *, max_messages: int = 10_000, max_bytes: int = 10 << 20):
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('dropped', 0)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', 0)")

    def next_seq(self) -> int:
        """A sequence number that keeps counting across restarts (gaps reveal lost messages)."""
        with self._lock:
            self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'seq'")
            return self._db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()[0]

    def push(self, topic: str, payload: bytes) -> int:
        """Append; returns how many old messages were dropped to stay within bounds."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO queue (topic, payload, size) VALUES (?, ?, ?)", (topic, payload, len(payload)))
                count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM queue").fetchone()
                dropped = 0
                while count > self.max_messages or (size > self.max_bytes and count > 1):
                    oldest, osize = db.execute("SELECT id, size FROM queue ORDER BY id LIMIT 1").fetchone()
                    db.execute("DELETE FROM queue WHERE id = ?", (oldest,))
                    count, size, dropped = count - 1, size - osize, dropped + 1
                if dropped:
                    db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return dropped

    def peek(self, n: int = 50) -> list[tuple[int, str, bytes]]:
        with self._lock:
            return self._db.execute("SELECT id, topic, payload FROM queue ORDER BY id LIMIT ?", (n,)).fetchall()

    def delete(self, msg_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM queue WHERE id = ?", (msg_id,))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
