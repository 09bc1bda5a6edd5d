"""What the causal-LM build and the adapter build share: signing, provenance, names, host threads."""
from __future__ import annotations

import os
import time
from pathlib import Path

from targets import TargetProfile


def cuda_here() -> bool:
    try:
        import onnxruntime_genai as og

        return bool(og.is_cuda_available())
    except ImportError:
        return False


def threads(p: TargetProfile | None) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(p.threads, cores)) if p is not None and p.threads else cores


def default_name(model: Path) -> str:
    stem = model.name if model.is_dir() else model.stem
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".-") or "model"


def signer(key_path: Path | None):
    if not key_path:
        return None
    from edgebundle import signing

    key = signing.load_private_key(key_path)
    return lambda manifest_bytes: signing.sign(manifest_bytes, key)


def provenance(opts) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {"source": str(opts.model), "tool": "edgepack", "onnxruntime-genai": v("onnxruntime-genai"),
            "transformers": v("transformers"), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
