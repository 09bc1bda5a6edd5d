"""In-process API: load a bundle (verified), warm it up, check its golden outputs, infer.

    from device_agent import load_bundle
    model = load_bundle("digits-1.0.0-arm-cpu.edgepack")
    out = model.infer({"image": x})        # floats in, floats out (quantization handled)
"""
from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.runtimes.base import Runtime
from device_agent.runtimes.registry import load_from_manifest
from edgebundle.archive import Bundle, open_bundle, sha256_file
from edgebundle.errors import InputError, VerificationError
from edgebundle.manifest import Manifest

_KINDS = {"f": "float", "i": "int", "u": "int", "b": "bool"}


class InferenceError(InputError):
    """A request does not fit the model (name, shape, dtype)."""


@dataclass
class Model:
    """A loaded bundle. `infer` is safe to call from many threads: runtimes are not
    re-entrant, so calls are serialised on one lock (the interpreter uses all threads it is given)."""

    manifest: Manifest
    runtime: Runtime
    bundle_sha256: str
    bundle_path: Path
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def describe(self) -> dict:
        """Status-topic view of the model (name, version, sha256, runtime in use)."""
        d = self.runtime.details
        return {"name": self.name, "version": self.version, "bundle_sha256": self.bundle_sha256,
                "target": self.manifest.target.get("name"), "format": self.manifest.format,
                "precision": self.manifest.precision, "runtime": d.get("runtime"),
                "runtime_version": d.get("version"),
                "provider": d.get("provider") or d.get("delegate"), "notes": d.get("notes") or []}

    def validate(self, inputs: dict) -> dict[str, np.ndarray]:
        """Check names, shapes and dtype kinds against the manifest; return arrays."""
        specs = {t.name: t for t in self.manifest.inputs}
        unknown = sorted(set(inputs) - set(specs))
        if unknown:
            raise InferenceError(f"unknown input(s) {unknown}; the model takes {sorted(specs)}")
        missing = sorted(set(specs) - set(inputs))
        if missing:
            raise InferenceError(f"missing input(s) {missing}")
        out = {}
        for name, spec in specs.items():
            x = np.asarray(inputs[name])
            sig = spec.shape_signature or spec.shape
            ok = len(x.shape) == len(sig) and all(s < 0 or s == d for s, d in zip(sig, x.shape))
            if not ok:
                raise InferenceError(f"input {name!r} has shape {list(x.shape)}; the model takes "
                                     f"{list(sig)} (-1 = any size)")
            want = np.dtype(spec.dtype)
            quantized_float = spec.quantization is not None and x.dtype.kind == "f"
            if not quantized_float and _KINDS.get(x.dtype.kind) != _KINDS.get(want.kind):
                raise InferenceError(f"input {name!r} is {x.dtype.name}; the model takes {want.name}"
                                     + (" (or float32, quantized by the agent)" if spec.quantization else ""))
            out[name] = x
        return out

    def infer(self, inputs: dict, *, raw: bool = False) -> dict[str, np.ndarray]:
        """Run once. Floats for quantized tensors are (de)quantized unless `raw`."""
        feeds = self.validate(inputs)
        with self._lock:
            return self.runtime.infer(feeds, raw=raw)

    def warm_up(self, runs: int = 3) -> float:
        """Run the golden (or random) inputs a few times; returns the last latency in ms."""
        feeds = self.runtime.sample_inputs()
        ms = 0.0
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            with self._lock:
                self.runtime.run(feeds)
            ms = (time.perf_counter() - t0) * 1000
        return ms

    def check_golden(self, bundle: Bundle | None = None) -> dict:
        """Compare outputs on the bundle's golden inputs with the expected ones."""
        g = self.manifest.golden
        if not g:
            return {"checked": 0, "ok": True, "note": "bundle has no golden outputs"}
        bundle = bundle or open_bundle(self.bundle_path)
        with tempfile.TemporaryDirectory() as tmp:
            arrays = dict(np.load(bundle.extract(tmp, [g["file"]])[g["file"]], allow_pickle=False))
        worst = 0.0
        for i in range(int(g["count"])):
            feeds = {t.name: arrays[f"input.{i}.{t.name}"] for t in self.manifest.inputs}
            got = self.infer(feeds)
            for t in self.manifest.outputs:
                exp = arrays[f"output.{i}.{t.name}"]
                err = np.abs(np.asarray(got[t.name], np.float64) - exp) - float(g.get("rtol", 0)) * np.abs(exp)
                worst = max(worst, float(np.max(err)))
        return {"checked": int(g["count"]), "ok": worst <= float(g["atol"]), "max_excess_error": worst,
                "atol": float(g["atol"])}

    def close(self) -> None:
        with self._lock:
            self.runtime.close()


def load_bundle(path: str | Path, *, model_dir: str | Path | None = None, threads: int | None = None,
                cache_dir: str | None = None, allow_cpu_fallback: bool | None = None, check_golden: bool = True,
                warmup: int = 3) -> Model:
    """Verify and load a bundle. The model file is extracted (hash-checked while streaming)
    into `model_dir` (default: a folder next to the bundle keyed by its sha256), warmed up,
    and its golden outputs are checked; a mismatch raises VerificationError."""
    path = Path(path)
    bundle = open_bundle(path)
    m = bundle.manifest
    digest = sha256_file(path)
    model_dir = Path(model_dir) if model_dir else path.parent / f".{path.name}.{digest[:16]}"
    target = model_dir / m.model_file
    if not (target.is_file() and sha256_file(target) == m.files[m.model_file].sha256):
        bundle.extract(model_dir, [m.model_file])
    runtime = load_from_manifest(str(target), m, cache_dir=cache_dir, threads=threads,
                                 allow_cpu_fallback=allow_cpu_fallback)
    model = Model(manifest=m, runtime=runtime, bundle_sha256=digest, bundle_path=path)
    model.warm_up(warmup)
    if check_golden:
        res = model.check_golden(bundle)
        if not res["ok"]:
            model.close()
            raise VerificationError(
                f"{path.name}: golden outputs differ by {res['max_excess_error']:.4g} (> atol {res['atol']:.4g})",
                hint="the model does not compute what it computed at build time on this runtime; "
                     "check the runtime version, or rebuild the bundle")
    return model

