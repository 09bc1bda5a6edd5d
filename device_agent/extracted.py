"""Where the in-process API unpacks a bundle it loads: one cache directory per user, never beside the
user's files (issue 27: four MPNet bundles left 3.8 GB of hidden copies next to them). Each bundle has a
folder named by its sha256; the least recently loaded are evicted past a size limit.

    EDGEPACK_EXTRACT_DIR    the directory (default: $XDG_CACHE_HOME/edgepack/bundles, ~/.cache/...)
    EDGEPACK_EXTRACT_LIMIT  bytes it may hold, e.g. 2G or 500M (default 4G)

The agent does not use it: it extracts into its own data directory (device_agent/store.py)."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from edgebundle.errors import InputError

ENV_DIR = "EDGEPACK_EXTRACT_DIR"
ENV_LIMIT = "EDGEPACK_EXTRACT_LIMIT"
DEFAULT_LIMIT = 4 * 2**30
IN_USE_S = 300  # a folder loaded this recently may be open in another process: not evicted
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def root() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgepack" / "bundles"


def limit() -> int:
    raw = os.environ.get(ENV_LIMIT, "").strip().upper().removesuffix("B").removesuffix("I")
    if not raw:
        return DEFAULT_LIMIT
    unit = raw[-1] if raw[-1] in _UNITS else ""
    try:
        return int(float(raw[: len(raw) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise InputError(f"{ENV_LIMIT}={os.environ[ENV_LIMIT]!r} is not a size",
                         hint="bytes, or a number with K, M or G (e.g. 2G)") from None


_live: dict[Path, int] = {}  # folders of models loaded in this process (count of holders): never evicted
_lock = threading.Lock()


def folder(digest: str) -> Path:
    """The folder for the bundle with this sha256, created, marked as just used and held for this process
    until release() (Model.close)."""
    d = root() / digest[:16]
    d.mkdir(parents=True, exist_ok=True)
    os.utime(d)
    with _lock:
        _live[d] = _live.get(d, 0) + 1
    return d


def release(d: Path) -> None:
    with _lock:
        if _live.get(d, 0) > 1:
            _live[d] -= 1
        else:
            _live.pop(d, None)


def prune(keep: Path, *, max_bytes: int | None = None, now: float | None = None) -> list[Path]:
    """Evict the least recently used folders until the cache holds `max_bytes` (default: the limit);
    `keep`, folders of models loaded in this process and folders used in the last IN_USE_S seconds (by
    another process, maybe) stay even past it. Returns what was removed."""
    max_bytes = limit() if max_bytes is None else max_bytes
    now = time.time() if now is None else now
    entries = []
    for d in root().iterdir():
        try:  # another process may be extracting (a .part renamed) or evicting meanwhile
            if d.is_dir() and not d.is_symlink():
                size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
                entries.append((d.stat().st_mtime, d, size))
        except OSError:
            continue
    total = sum(size for _, _, size in entries)
    removed = []
    with _lock:
        live = set(_live)
    for mtime, d, size in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if d == keep or d in live or now - mtime < IN_USE_S:
            continue
        shutil.rmtree(d, ignore_errors=True)
        total -= size
        removed.append(d)
    return removed
