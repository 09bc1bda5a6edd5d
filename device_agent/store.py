"""The agent's data directory: bundles it holds and which one is active.

    DATA_DIR/bundles/<sha256[:16]>-<file name>   verified copies of bundles
    DATA_DIR/models/<sha256[:16]>/               extracted model files (hash-checked)
    DATA_DIR/active.json                         {"bundle": ..., "sha256": ...}, replaced atomically
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from edgebundle.archive import open_bundle, sha256_file


def atomic_write(path: Path, data: bytes) -> None:
    """Write, fsync, rename: readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Store:
    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.bundles = self.root / "bundles"
        self.models = self.root / "models"
        self.cache = self.root / "cache"
        for d in (self.bundles, self.models, self.cache):
            d.mkdir(parents=True, exist_ok=True)

    def add(self, bundle: str | Path, *, move: bool = False, sha256: str | None = None,
            name: str | None = None) -> tuple[Path, str]:
        """Copy (or, for a download already in the data directory, move) a bundle in;
        returns (path in store, sha256)."""
        src = Path(bundle)
        open_bundle(src)
        digest = sha256 or sha256_file(src)
        dest = self.bundles / f"{digest[:16]}-{name or src.name}"
        if not dest.exists():
            if move:
                os.replace(src, dest)
            else:
                tmp = dest.with_name(f".{dest.name}.part")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
        return dest, digest

    def model_dir(self, sha256: str) -> Path:
        return self.models / sha256[:16]

    def read_state(self) -> dict:
        p = self.root / "active.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return {}

    def write_state(self, state: dict) -> None:
        atomic_write(self.root / "active.json", json.dumps(state, indent=2).encode())

    def active(self) -> Path | None:
        rel = self.read_state().get("bundle")
        p = self.root / rel if rel else None
        return p if p and p.is_file() else None

    def activate(self, path: Path, sha256: str) -> None:
        state = self.read_state()
        state.update(bundle=str(path.relative_to(self.root)), sha256=sha256)
        self.write_state(state)
