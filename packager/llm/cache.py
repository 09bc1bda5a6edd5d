"""The build cache (packager/store.py) for causal LMs: a GGUF file's float folder, the float reference and
each recipe's export, kept by the bytes they come from, what was asked of them and the tool versions. A
rebuild (another gate, another target, a new version number) then dequantizes, exports and runs the
reference nothing again: those are ~7 of Gemma 3 270M's 9 minutes for four targets."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from packager.store import Store, digest_path, open_store as store  # noqa: F401  (store: re-exported)


def fetch(st: Store | None, key: str, out: Path) -> bool:
    """The entry `key` copied to `out` (a file or a folder, replaced): True; False when there is no store,
    no such entry, or a damaged one (deleted then, never trusted)."""
    if st is None:
        return False
    landing = out.parent / f".{out.name}.from-cache"
    shutil.rmtree(landing, ignore_errors=True)
    hit = st.get(key, landing)
    if hit is not None:
        _remove(out)
        os.replace(hit.path, out)
    shutil.rmtree(landing, ignore_errors=True)
    return hit is not None


def keep(st: Store | None, key: str, path: Path) -> None:
    if st is not None:
        st.put(key, path, {})


def text_digest(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


@dataclass(frozen=True)
class Source:
    """A causal-LM folder as the cache knows it: the store and the folder's SHA-256 (read once a build)."""

    store: Store
    digest: str

    @classmethod
    def of(cls, st: Store | None, folder: Path) -> "Source | None":
        return cls(st, digest_path(folder)) if st is not None else None

    def key(self, kind: str, **parts) -> str:
        return self.store.key({"kind": kind, "source": self.digest, **parts})


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
