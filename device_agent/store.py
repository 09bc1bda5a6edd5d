"""The agent's data directory: bundles it holds and which one is active.

    DATA_DIR/bundles/<sha256[:16]>-<file name>   verified copies of bundles
    DATA_DIR/models/<sha256[:16]>/               extracted model files (hash-checked)
    DATA_DIR/active.json                         {"bundle": ..., "sha256": ...}, replaced atomically; an adapter
                                                 bundle (genai-adapter) has "base": {"bundle", "sha256"} beside
    DATA_DIR/chunks/<bundle file>.<min-avg-max>.json   a held bundle's content-defined chunks (delta updates)
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from edgebundle.archive import open_bundle, sha256_file
from edgebundle.cdc import CdcParams, Chunk, chunk_file

log = logging.getLogger("edgepack.agent")


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
    """The one place that knows the data directory's layout: callers hold a stored bundle's path,
    or the `ref` (its path relative to the data directory) that records and active.json name it by."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.bundles = self.root / "bundles"
        self.models = self.root / "models"
        self.cache = self.root / "cache"
        self.chunk_lists = self.root / "chunks"
        for d in (self.bundles, self.models, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        self._digests: dict[str, str] = {}  # file name in bundles/ -> sha256, for those added by this process

    def add(self, bundle: str | Path, *, move: bool = False, sha256: str | None = None,
            name: str | None = None) -> tuple[Path, str]:
        """Copy (or, for a download already in the data directory, move) a bundle in;
        returns (path in store, sha256). `sha256`: the caller already hashed this very file
        (a transfer hashes as it writes), so it is not hashed again."""
        src = Path(bundle)
        open_bundle(src)
        digest = sha256 or sha256_file(src)
        dest = self.bundles / f"{digest[:16]}-{name or src.name}"
        # a copy already there that this process did not add is hashed, not taken on its name's word
        if not dest.exists() or (dest.name not in self._digests and sha256_file(dest) != digest):
            if move:
                os.replace(src, dest)
            else:
                tmp = dest.with_name(f".{dest.name}.part")
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
        self._digests[dest.name] = digest
        return dest, digest

    def sha256(self, path: Path) -> str:
        """A stored bundle's sha256: the one add() had in this process, else hashed now (after a
        restart a file is not taken on its name's word)."""
        return self._digests.get(Path(path).name) or sha256_file(path)

    def ref(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def path(self, ref: str) -> Path:
        return self.root / ref

    def model_dir(self, sha256: str) -> Path:
        return self.models / sha256[:16]

    def cache_dir(self, sha256: str) -> Path:
        """Runtime caches (compiled engines) of one bundle."""
        return self.cache / sha256[:16]

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
        p = self.path(rel) if rel else None
        return p if p and p.is_file() else None

    def active_slot(self) -> dict | None:
        """{"bundle": ref, "sha256": ...} as active.json names it (and "base", the bundle an adapter runs on);
        None when it names none."""
        st = self.read_state()
        if not st.get("bundle"):
            return None
        return {"bundle": st["bundle"], "sha256": st.get("sha256"), **({"base": st["base"]} if st.get("base") else {})}

    def active_sha256(self) -> str | None:
        return self.read_state().get("sha256")

    def activate(self, path: Path, sha256: str, *, base: dict | None = None) -> None:
        """`path` becomes the active bundle; `base`: the bundle an adapter bundle runs on ({"bundle", "sha256"})."""
        state = self.read_state()
        state.update(bundle=self.ref(path), sha256=sha256)
        state.pop("base", None)
        if base:
            state["base"] = {"bundle": base["bundle"], "sha256": base["sha256"]}
        self.write_state(state)

    def deactivate(self) -> None:
        """No active bundle (the device serves none)."""
        self.write_state({})

    def prune(self, keep: set[str]) -> None:
        """Drop every bundle but those named in `keep` (refs), with its extracted model files."""
        names = {Path(ref).name for ref in keep}
        for p in self.bundles.glob("*.edgepack"):
            if p.name not in names:
                p.unlink(missing_ok=True)
                shutil.rmtree(self.model_dir(p.name.split("-")[0]), ignore_errors=True)
                self._digests.pop(p.name, None)
                for c in self.chunk_lists.glob(f"{p.name}.*.json"):
                    c.unlink(missing_ok=True)

    def chunks(self, params: CdcParams) -> dict[str, tuple[Path, int, int]]:
        """A content-addressed view of the bundles held here (the active one and the previous one):
        chunk sha256 -> (bundle, offset, size). Each bundle is cut with `params` on first use and
        its list kept in DATA/chunks/ (valid while the file's size and mtime stay). The view is a
        hint: whoever copies a chunk re-hashes the bytes it reads."""
        view: dict[str, tuple[Path, int, int]] = {}
        for path in sorted(self.bundles.glob("*.edgepack")):
            for c in self._cut(path, params):
                view.setdefault(c.sha256, (path, c.offset, c.size))
        return view

    def _cut(self, bundle: Path, params: CdcParams) -> list[Chunk]:
        st = bundle.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        cached = self.chunk_lists / f"{bundle.name}.{params.key}.json"
        try:
            doc = json.loads(cached.read_text())
            if doc["stamp"] == stamp:
                return [Chunk(sha, off, n) for sha, off, n in doc["chunks"]]
        except (OSError, ValueError, TypeError, KeyError):
            pass  # none yet, or damaged: cut again
        chunks = chunk_file(bundle, params)
        try:
            atomic_write(cached, json.dumps({"stamp": stamp, "chunks": [[c.sha256, c.offset, c.size]
                                                                       for c in chunks]}).encode())
        except OSError as e:  # disk full: the list is cut again next time, nothing else depends on it
            log.warning("cannot keep the chunk list of %s: %s", bundle.name, e)
        return chunks
