"""The build cache across builds: converted models kept by what made them, so a second build of
the same model (one more target, another gate, a new version number) converts nothing again.

An entry's key is the SHA-256 of everything the converter reads: the model's bytes, its resolved
input shapes, the backend, format, precision, float-kept nodes and variant, the calibration data's
and check sample's bytes, the conversion options and the versions of the tools that convert.
Besides candidates it keeps the steps before them: a Hugging Face folder's ONNX export
(packager/hf_export.py) and onnx2tf's SavedModel (packager/formats/onnx_tflite.py).
Each entry holds the model file (or folder) and meta.json with its SHA-256 (digest_path); an entry
that fails that check (a damaged disk, a half-written file) is deleted and rebuilt, never trusted. Entries are
written to a temporary folder inside the cache and renamed into place, so concurrent builds see a
whole entry or none. The least recently used entries go once the cache passes its size limit.

Where: `--cache-dir` (else $EDGEPACK_CACHE_DIR, else ~/.cache/edgepack/builds); `--no-cache`
switches it off. The library caches only when BuildOptions.cache_dir (or $EDGEPACK_CACHE_DIR) names
a folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

ENV = "EDGEPACK_CACHE_DIR"
MAX_BYTES = 4 << 30
# The packages whose code turns a model into another: a new version of any of them is a new key.
TOOLS = ("edgepack", "tensorflow-cpu", "tensorflow", "tf-keras", "keras", "tf2onnx", "onnx", "onnxruntime",
         "ai-edge-litert", "onnx2tf", "onnxslim", "torch", "transformers", "onnxruntime-genai", "gguf", "peft")


def default_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepack" / "builds"


def open_store(cache_dir: Path | None, enabled: bool = True) -> "Store | None":
    """The store `cache_dir` (else $EDGEPACK_CACHE_DIR) names; None when switched off or unnamed (the
    library caches only where a folder is named; the CLI names default_dir())."""
    where = cache_dir or os.environ.get(ENV)
    return Store(Path(where)) if enabled and where else None


@lru_cache(maxsize=1)
def tool_versions() -> tuple[tuple[str, str | None], ...]:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return tuple((t, version(t)) for t in TOOLS)


def digest_path(path: Path) -> str:
    """SHA-256 of a file, or of a folder's relative names and file contents."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path)).encode() + b"\0" if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def digest_samples(samples: list[dict] | None) -> str | None:
    """SHA-256 of samples (dicts of arrays): names, dtypes, shapes and bytes."""
    if samples is None:
        return None
    h = hashlib.sha256()
    for s in samples:
        for name in sorted(s):
            a = np.ascontiguousarray(s[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes() if a.dtype != object else repr(a.tolist()).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Hit:
    path: Path  # the model file, copied out of the cache
    info: dict  # what the converter said of it (the artifact's quantization details)


@dataclass(frozen=True)
class Store:
    root: Path
    max_bytes: int = MAX_BYTES

    def key(self, parts: dict) -> str:
        # format: what edgepack's own recipes make of the same parts (2: TFLite dynamic smoothed, fp16 values;
        # 3: its embedding tables per row)
        doc = {"parts": parts, "tools": tool_versions(), "format": 3}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str, dest: Path) -> Hit | None:
        """The entry's file (or folder) copied to `dest` (a folder), or None: absent, or damaged (then
        deleted). A failure on the destination's side (a full disk) leaves the entry as it is."""
        entry = self.root / key[:2] / key
        try:
            meta = json.loads((entry / "meta.json").read_text())
            kept = entry / meta["file"]
            if not kept.exists() or digest_path(kept) != meta.get("sha256"):
                raise ValueError("damaged")  # a damaged disk, a half-deleted entry: rebuilt, never trusted
        except (OSError, ValueError, KeyError, TypeError):
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            return None
        out = Path(dest) / meta["file"]
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if kept.is_dir():
                shutil.copytree(kept, out, dirs_exist_ok=True)
            else:
                shutil.copyfile(kept, out)
            os.utime(entry)  # recently used
        except OSError:  # no room here, or pruned meanwhile by another build: convert instead
            if out.is_dir():
                shutil.rmtree(out, ignore_errors=True)
            else:
                out.unlink(missing_ok=True)
            return None
        return Hit(path=out, info=meta.get("info") or {})

    def put(self, key: str, src: Path, info: dict) -> bool:
        """Keep `src` (a file or a folder) under `key`; False when the cache cannot be written (the
        build goes on without)."""
        src = Path(src)
        entry = self.root / key[:2] / key
        tmp = self.root / "tmp" / uuid.uuid4().hex
        try:
            tmp.mkdir(parents=True)
            if src.is_dir():
                shutil.copytree(src, tmp / src.name)
            else:
                shutil.copyfile(src, tmp / src.name)
            meta = {"file": src.name, "sha256": digest_path(tmp / src.name), "info": info}
            (tmp / "meta.json").write_text(json.dumps(meta, default=str))
            entry.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, entry)
            except OSError:  # another build stored the same entry first
                shutil.rmtree(tmp, ignore_errors=True)
            self._prune()
            return True
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False

    def _prune(self) -> None:
        entries = [e for d in self.root.iterdir() if len(d.name) == 2 and d.is_dir() for e in d.iterdir()]
        sizes = {e: sum(f.stat().st_size for f in e.rglob("*") if f.is_file()) for e in entries}
        total = sum(sizes.values())
        for e in sorted(entries, key=lambda e: e.stat().st_mtime):
            if total <= self.max_bytes:
                break
            shutil.rmtree(e, ignore_errors=True)
            total -= sizes[e]
