"""The agent process's plumbing: log formats (JSON lines, or text for people) and glibc malloc settings."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and any `extra={"fields": {...}}`."""

    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
             "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        d.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, default=str)


class TextFormatter(logging.Formatter):
    """`ts LEVEL logger: msg key=value ...`: the same fields as the JSON lines, for people."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None) or {}
        if not fields:
            return line
        head, nl, tail = line.partition("\n")  # a traceback stays below the fields
        kv = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return f"{head} {kv}{nl}{tail}"


def _text_value(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str, separators=(",", ":"))
    return json.dumps(s) if (not s or any(c in s for c in " \"=\n")) and not s.startswith(("{", "[")) else s


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own malloc arena and keeps freed memory in
    it; on a 1-4 GB board that is RSS for nothing. Call before threads start. No-op elsewhere."""
    libc = _libc()
    if libc and hasattr(libc, "mallopt"):
        libc.mallopt(-8, n)  # M_ARENA_MAX


def trim_memory() -> None:
    """Hand freed heap back to the OS (after loading a model, and periodically)."""
    libc = _libc()
    if libc and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    h = logging.StreamHandler()
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("edgepack")
    root.handlers[:] = [h]
    root.setLevel(level)
    root.propagate = False
