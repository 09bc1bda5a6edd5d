"""A model's interface as its clients see it: input and output names, dtypes and shapes with
their dynamic axes (-1). Two bundles with the same interface are interchangeable for clients;
anything else breaks requests that worked before (a renamed input, a new dtype, a fixed batch).

The agent compares the staged bundle with the active one, and publishes `interface_hash` in its
status so the fleet side can see, before a push, which devices would see a change."""
from __future__ import annotations

import hashlib
import json

from edgebundle.manifest import Manifest, TensorSpec


def _specs(tensors) -> list[dict]:
    return [{"name": t.name, "dtype": t.dtype, "shape": [int(x) for x in (t.shape_signature or t.shape)]}
            for t in tensors]


def interface(manifest: Manifest) -> dict:
    """{"inputs": [...], "outputs": [...]}, each {"name", "dtype", "shape"} in manifest order."""
    return {"inputs": _specs(manifest.inputs), "outputs": _specs(manifest.outputs)}


def interface_hash(manifest: Manifest) -> str:
    """16 hex digits of sha256 over the canonical interface (order-insensitive by name)."""
    sig = interface(manifest)
    canon = {k: sorted(v, key=lambda s: s["name"]) for k, v in sig.items()}
    return hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _shape(s: list[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in s) + "]"


def interface_diff(old: Manifest, new: Manifest) -> list[str]:
    """Human-readable differences from `old` to `new`; empty when clients see no change."""
    out: list[str] = []
    a, b = interface(old), interface(new)
    for kind in ("inputs", "outputs"):
        was = {s["name"]: s for s in a[kind]}
        now = {s["name"]: s for s in b[kind]}
        label = kind[:-1]
        for name in sorted(set(was) - set(now)):
            out.append(f"{label} {name!r} removed ({was[name]['dtype']} {_shape(was[name]['shape'])})")
        for name in sorted(set(now) - set(was)):
            out.append(f"{label} {name!r} added ({now[name]['dtype']} {_shape(now[name]['shape'])})")
        for name in sorted(set(was) & set(now)):
            o, n = was[name], now[name]
            if o["dtype"] != n["dtype"]:
                out.append(f"{label} {name!r} dtype {o['dtype']} -> {n['dtype']}")
            if o["shape"] != n["shape"]:
                out.append(f"{label} {name!r} shape {_shape(o['shape'])} -> {_shape(n['shape'])}")
    return out


__all__ = ["interface", "interface_hash", "interface_diff", "TensorSpec"]
