"""In-process API: load a bundle (verified), warm it up, check its golden outputs, infer.

    from device_agent import load_bundle
    model = load_bundle("digits-1.0.0-arm-cpu.edgepack")
    out = model.infer({"image": x})        # floats in, floats out (quantization handled)

A generative bundle (format "genai") loads the same way; `model.generation` (device_agent.generative)
generates: `model.generation.complete("Once upon", max_tokens=32).text`. A LoRA adapter bundle (format
"genai-adapter") loads beside the base it is pinned to, sharing its weights:
`load_bundle("fr-1.0.0-arm-cpu.edgepack", base=model).generation.complete(...)`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import Callable

import numpy as np

from device_agent import extracted
from device_agent.generative import GenerativeModel, adapted_generation, load_generative
from edgeruntime.base import Runtime, dequantize, quantize
from edgeruntime.registry import load_from_manifest
from device_agent.textload import text_encoder
from edgeruntime.text import TextEncoder
from edgebundle.archive import Bundle, open_bundle, sha256_file
from edgebundle.errors import BundleError, InputError, RuntimeUnavailableError, VerificationError
from edgebundle.interface import interface_hash
from edgebundle.manifest import Manifest, adapter_refusal
from edgeproto.documents import model_section

log = logging.getLogger("edgepack.agent")

_KINDS = {"f": "float", "i": "int", "u": "int", "b": "bool"}


class InferenceError(InputError):
    """A request does not fit the model (name, shape, dtype)."""


class ModelClosed(RuntimeError):
    """The model was swapped out and closed; the caller should take the current one."""


GENAI = "genai"  # generative bundles (edgeruntime.genai)
ADAPTER = "genai-adapter"  # LoRA adapters of generative bundles: loaded beside their base
MAX_GOLDEN_BYTES = 64 << 20  # golden arrays are loaded into memory
TEXT_INPUT = "text"  # text bundles take `{"text": [str, ...]}` as well as their token tensors
# Returned with a text request's outputs, per text: its tokens, whether it was cut at max_length, and
# the sequence length it ran at (its length bucket on TFLite, the request's longest text on ONNX Runtime).
TOKENS, TRUNCATED, LENGTH = "text_tokens", "text_truncated", "text_length"


class Health:
    """Per-model counters watched during an update's probation (off otherwise: zero cost).
    `nonfinite` counts NaN/Inf outputs the model is to blame for; `client_nonfinite` those the
    request caused (a NaN/Inf input, or an input on which the previous model fails the same way)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = self.errors = self.nonfinite = self.client_nonfinite = 0
        self.latencies: list[float] = []

    def snapshot(self) -> dict:
        with self.lock:
            lat = list(self.latencies)
            return {"requests": self.requests, "errors": self.errors, "nonfinite": self.nonfinite,
                    "client_nonfinite": self.client_nonfinite,
                    "p95_ms": float(np.percentile(lat, 95)) if lat else None}


def _nonfinite(arrays) -> int:
    return sum(int(v.size - np.count_nonzero(np.isfinite(v))) for v in arrays if v.dtype.kind == "f")


@dataclass
class Model:
    """A loaded bundle. `infer` is safe to call from many threads: runtimes are not
    re-entrant, so calls are serialised on one lock (the interpreter uses all threads it is given)."""

    manifest: Manifest
    runtime: Runtime
    bundle_sha256: str
    bundle_path: Path
    golden_path: Path | None = None  # extracted (hash-checked) golden.npz, next to the model file
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False
    _watch: bool = False
    _golden: dict | None = None
    _reference: "Model | None" = None
    _busy: int = 0
    _busy_lock: threading.Lock = field(default_factory=threading.Lock)
    text: TextEncoder | None = None  # text bundles: tokenizes `{"text": [...]}` requests on the device
    buckets: dict[int, Runtime] = field(default_factory=dict)  # a TFLite text bundle's shorter-length models
    pause: Callable[[], None] | None = None  # while staging: called before each warm-up or golden run (yield)
    tap: Callable[[dict, dict], None] | None = None  # during an update's shadow phase: sees each request answered
    memory: object = None  # what the agent admitted it with (device_agent.slot.Memory)
    drift: object = None  # edgeruntime.drift.Monitor over this model's live inputs and outputs (the agent's)
    capture: Callable[[dict, dict], None] | None = None  # while it serves with capture on: Ring.offer
    generation: GenerativeModel | None = None  # genai bundles: text generation (queue, chat template, defaults)
    base: "Model | None" = None  # an adapter bundle's: the genai model whose weights it runs on
    base_slot: dict | None = None  # an adapter's base bundle as its slot's store names it ({"bundle", "sha256"})
    owns_base: bool = False  # the base was loaded for this adapter alone (an agent restart): closed with it
    extracted: Path | None = None  # its folder in the in-process extraction cache, held until close

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def version_of(self, name: str) -> str | None:
        """The running version an update named `name` must not go below (anti-rollback): this model's. A
        base with LoRA slots, and an adapter on it, compare only bundles of their own names (an adapter's
        versions are its own line, not its base's); None: nothing to compare with."""
        slotted = (self.manifest.generation or {}).get("lora")
        if self.base is None and not slotted:
            return self.version
        lineage = {self.name: self.version, **({self.base.name: self.base.version} if self.base else {})}
        return lineage.get(name)

    def describe(self) -> dict:
        """Status-topic view of the model (name, version, sha256, runtime in use)."""
        d = self.runtime.details
        return model_section(self.manifest, bundle_sha256=self.bundle_sha256, interface=interface_hash(self.manifest),
                             runtime=d.get("runtime"), runtime_version=d.get("version"),
                             provider=d.get("provider") or d.get("delegate"), notes=d.get("notes") or [])

    def __post_init__(self) -> None:
        # Precomputed once: the per-request path below is a handful of comparisons.
        rt = {t.name: t for t in self.runtime.inputs}
        self._inputs = tuple((t.name, tuple(t.shape_signature or t.shape), np.dtype(t.dtype), rt.get(t.name))
                             for t in self.manifest.inputs)
        self._names = frozenset(t.name for t in self.manifest.inputs)
        self._dequant = tuple(o for o in self.runtime.outputs if o.quantized)
        # What the API takes and answers: quantized tensors in float (the agent (de)quantizes them)
        quantized = {t.name for t in (*self.runtime.inputs, *self.runtime.outputs) if t.quantized}
        self.api_dtypes = {t.name: "float32" if t.name in quantized else t.dtype
                           for t in (*self.manifest.inputs, *self.manifest.outputs)}
        self.health = Health()
        # Most texts per run: a static batch axis (TFLite), the TensorRT profile's largest batch, else any number.
        sig = (self.manifest.inputs[0].shape_signature or self.manifest.inputs[0].shape) if self.manifest.inputs else ()
        trt = self.manifest.runtime.tensorrt_profile
        self._text_step = sig[0] if sig and sig[0] > 0 else min(r["max"][0] for r in trt.values()) if trt else 0
        # A batch axis fixed at 1 (TFLite's static shapes): every input and output leads with 1 and every
        # output is fully static. A request of N items along it runs N times, the outputs stacked (0: none;
        # a dynamic batch axis takes any batch as it is).
        sigs = [tuple(t.shape_signature or t.shape) for t in (*self.manifest.inputs, *self.manifest.outputs)]
        static_out = all(d > 0 for t in self.manifest.outputs for d in (t.shape_signature or t.shape))
        self._batch_step = 1 if sigs and static_out and all(g and g[0] == 1 for g in sigs) else 0

    def watch(self, on: bool, *, reference: "Model | None" = None) -> None:
        """Count requests, errors, NaN/Inf outputs and latencies (during probation). `reference`
        (the previous model, still loaded) decides whether a non-finite output is the model's
        fault or the request's: it gets the same input only when that happens."""
        if on:
            self.health = Health()
        self._reference = reference if on else None
        self._watch = on

    def health_snapshot(self) -> dict:
        return self.health.snapshot()

    def observe(self, *, ok: bool) -> None:
        """A request served outside infer() (a generation), counted during probation like infer's:
        a request, and an error when the model failed it. No latency: a generation's time is its
        length, not the model's health."""
        if not self._watch:
            return
        h = self.health
        with h.lock:
            h.requests += 1
            h.errors += not ok

    def validate(self, inputs: dict) -> dict[str, np.ndarray]:
        """Check names, shapes and dtypes against the manifest; return arrays in the
        model's dtypes (floats for quantized inputs are quantized here)."""
        if len(inputs) != len(self._names) or not all(n in inputs for n in self._names):
            unknown = sorted(set(inputs) - self._names)
            if unknown:
                raise InferenceError(f"unknown input(s) {unknown}; the model takes {sorted(self._names)}")
            raise InferenceError(f"missing input(s) {sorted(self._names - set(inputs))}")
        feeds = {}
        for name, sig, want, info in self._inputs:
            x = inputs[name]
            if not isinstance(x, np.ndarray):
                x = np.asarray(x)
            shape = x.shape
            if shape != sig and (len(shape) != len(sig) or any(s >= 0 and s != d for s, d in zip(sig, shape))):
                raise InferenceError(f"input {name!r} has shape {list(x.shape)}; the model takes "
                                     f"{list(sig)} (-1 = any size)")
            if x.dtype.kind == "f" and x.size and not np.isfinite(x).all():
                bad = int(x.size - np.count_nonzero(np.isfinite(x)))
                raise InferenceError(f"input {name!r} holds {bad} NaN or infinite value(s); the model takes finite "
                                     "numbers")
            if x.dtype.kind == "f" and want.kind == "f" and x.dtype.itemsize > want.itemsize and x.size:
                top = float(np.abs(x).max())
                if top > float(np.finfo(want).max):
                    raise InferenceError(f"input {name!r} holds {top:.3g}, beyond what {want.name} holds "
                                         f"({float(np.finfo(want).max):.3g})")
            if x.dtype.kind in "iu" and want.kind in "iu" and x.dtype != want and x.size:
                lo, hi = np.iinfo(want).min, np.iinfo(want).max
                if int(x.min()) < lo or int(x.max()) > hi:  # astype would wrap them silently
                    raise InferenceError(f"input {name!r} holds values from {int(x.min())} to {int(x.max())}, "
                                         f"beyond what {want.name} holds ({lo} to {hi})")
            if x.dtype is not want and x.dtype != want:
                if info is not None and info.quantized and x.dtype.kind == "f":
                    x = quantize(x, info)
                elif _KINDS.get(x.dtype.kind) == _KINDS.get(want.kind):
                    x = x.astype(want)
                else:
                    raise InferenceError(f"input {name!r} is {x.dtype.name}; the model takes {want.name}"
                                         + (" (or float32, quantized by the agent)" if info and info.quantized else ""))
            feeds[name] = x
        return feeds

    def _texts(self, inputs: dict) -> list[str]:
        """`{"text": [str, ...]}`, checked: the bundle's tokenizer makes the token tensors from it."""
        if self.text is None:
            why = ("the agent lacks the `tokenizers` library (pip install 'edgepack[text]')"
                   if self.manifest.text else "this model takes no text")
            raise InferenceError(f"input 'text' cannot be served: {why}; send {sorted(self._names)} instead")
        if len(inputs) != 1:
            raise InferenceError(f"input 'text' comes alone; got {sorted(inputs)}")
        texts = inputs[TEXT_INPUT]
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise InferenceError("input 'text' must be a non-empty list of strings")
        return list(texts)

    @property
    def in_flight(self) -> int:
        """Requests running or waiting in infer() or a generation now (profile jobs pause while any are)."""
        return self._busy + (self.generation.active if self.generation is not None else 0)

    def infer(self, inputs: dict, *, raw: bool = False, stamps: list[float] | None = None) -> dict[str, np.ndarray]:
        """Run once (a batch bigger than a fixed batch axis: once per slice of it, the outputs stacked).
        Floats for quantized tensors are (de)quantized unless `raw`. `stamps` (for /metrics) gets three
        perf_counter() readings: input checked, model lock taken, run done."""
        n = self._batch_of(inputs)
        if n:
            b, parts, marks = self._batch_step, [], []
            for i in range(0, n, b):
                mine: list[float] | None = [] if stamps is not None else None
                parts.append(self.infer({k: np.asarray(v)[i:i + b] for k, v in inputs.items()}, raw=raw, stamps=mine))
                marks.append(mine)
            if stamps is not None and len(marks[0]) == 3:  # checked, lock taken (first run), done (last run)
                stamps += (marks[0][0], marks[0][1], marks[-1][-1])
            return {k: np.concatenate([o[k] for o in parts]) for k in parts[0]}
        with self._busy_lock:
            self._busy += 1
        try:
            out = self._infer(inputs, raw, stamps)
        finally:
            with self._busy_lock:
                self._busy -= 1
        drift = self.drift
        if drift is not None:
            try:
                for name, x in inputs.items():
                    drift.observe(name, x)
                for name, y in out.items():
                    drift.observe(name, y)
            except Exception:  # statistics never cost a request
                log.exception("drift statistics failed")
        for hook in (self.tap, self.capture) if not raw else ():
            if hook is not None:
                try:
                    hook(inputs, out)
                except Exception:  # the shadow and capture never cost a request
                    log.exception("request hook failed")
        return out

    def _batch_of(self, inputs: dict) -> int:
        """N when every input is a batch of N > b items along the model's fixed batch axis of b (N a
        multiple of b) and otherwise of its shape; 0 otherwise (validate() says what is wrong)."""
        b = self._batch_step
        if not b or TEXT_INPUT in inputs or set(inputs) != self._names:
            return 0
        n = set()
        for name, sig, _, _ in self._inputs:
            shape = np.shape(inputs[name])
            if len(shape) != len(sig) or any(s >= 0 and s != d for s, d in zip(sig[1:], shape[1:])):
                return 0
            n.add(shape[0])
        return n.pop() if len(n) == 1 and next(iter(n)) > b and next(iter(n)) % b == 0 else 0

    def _infer(self, inputs: dict, raw: bool, stamps: list[float] | None) -> dict[str, np.ndarray]:
        if TEXT_INPUT in inputs and TEXT_INPUT not in self._names:
            return self._infer_text(self._texts(inputs), raw, inputs, stamps)
        return self._run(self.validate(inputs), raw, inputs, stamps)

    def _infer_text(self, texts: list[str], raw: bool, inputs: dict,
                    stamps: list[float] | None) -> dict[str, np.ndarray]:
        """Tokenized here, in runs of at most the model's batch, each at the smallest length bucket that
        holds its texts (no buckets: its longest text); per-text token counts, truncation flags and
        lengths go back with the outputs."""
        step = self._text_step or len(texts)
        runs, marks = [], []
        for i in range(0, len(texts), step):
            enc = self.text.encode(texts[i:i + step])
            rt = self.buckets.get(enc.length)  # None: the main model
            mine: list[float] | None = [] if stamps is not None else None
            runs.append((enc, self._run(self.validate(enc.feeds) if rt is None else rt.prepare(enc.feeds),
                                        raw, inputs, mine, runtime=rt)))
            marks.append(mine)
        if stamps is not None:  # checked, lock taken (first run), done (last run)
            stamps += (marks[0][0], marks[0][1], marks[-1][-1])
        out = {n: _stacked([o[n] for _, o in runs]) for n in runs[0][1]}
        encs = [e for e, _ in runs]
        return dict(out, **{TOKENS: np.asarray([n for e in encs for n in e.lengths], np.int64),
                            TRUNCATED: np.asarray([c for e in encs for c in e.truncated], np.bool_),
                            LENGTH: np.asarray([e.length for e in encs for _ in e.lengths], np.int64)})

    def _run(self, feeds: dict, raw: bool, inputs: dict, stamps: list[float] | None, *,
             runtime: Runtime | None = None) -> dict[str, np.ndarray]:
        rt = runtime or self.runtime
        if stamps is not None:
            stamps.append(time.perf_counter())
        if self._watch:
            return self._infer_watched(feeds, raw, inputs, stamps, rt)
        with self._lock:
            if self._closed:
                raise ModelClosed(self.name)
            if stamps is not None:
                stamps.append(time.perf_counter())
            out = rt.run(feeds)
            if stamps is not None:
                stamps.append(time.perf_counter())
        return out if raw else self._dequantized(out, rt)

    def _dequantized(self, out: dict, rt: Runtime) -> dict[str, np.ndarray]:
        for o in self._dequant if rt is self.runtime else (o for o in rt.outputs if o.quantized):
            out[o.name] = dequantize(out[o.name], o)
        return out

    def _infer_watched(self, feeds: dict, raw: bool, inputs: dict, stamps: list[float] | None,
                       rt: Runtime) -> dict[str, np.ndarray]:
        h = self.health
        try:
            with self._lock:
                if self._closed:
                    raise ModelClosed(self.name)
                t0 = time.perf_counter()  # time inside the runtime: waiting for the lock is load, not the model
                out = rt.run(feeds)
                t1 = time.perf_counter()
                ms = (t1 - t0) * 1000
                if stamps is not None:
                    stamps += (t0, t1)
        except ModelClosed:
            raise
        except Exception:
            with h.lock:
                h.requests += 1
                h.errors += 1
            raise
        if not raw:
            out = self._dequantized(out, rt)
        bad = _nonfinite(out.values())
        client = bool(bad) and self._request_caused_it(inputs)
        with h.lock:
            h.requests += 1
            if client:
                h.client_nonfinite += bad
            else:
                h.nonfinite += bad
            if len(h.latencies) < 10_000:
                h.latencies.append(ms)
        return out

    def _request_caused_it(self, inputs: dict) -> bool:
        """A NaN/Inf input, or the previous model failing the same way on this input: the
        request is to blame, not the model on probation."""
        if TEXT_INPUT not in inputs and _nonfinite(np.asarray(v) for v in inputs.values()):
            return True
        ref = self._reference
        if ref is None:
            return False
        try:
            return _nonfinite(ref.infer(inputs).values()) > 0
        except Exception:  # the previous model cannot even run it (interface change, closed): not proof
            return False

    def golden_inputs(self, bundle: Bundle | None = None) -> list[dict] | None:
        """The bundle's golden inputs: real samples from the build, in the model's shapes. Read
        from the golden.npz extracted (hash-checked) next to the model, else from the bundle into
        memory: never through the system temp dir (a small RAM disk on many devices)."""
        g = self.manifest.golden
        if not g:
            return None
        if self._golden is None:
            if self.golden_path is not None:
                src = self.golden_path
            else:
                import io

                src = io.BytesIO((bundle or open_bundle(self.bundle_path)).read(g["file"]))
            with np.load(src, allow_pickle=False) as z:
                self._golden = {k: z[k] for k in z.files}
        return [{t.name: self._golden[f"input.{i}.{t.name}"] for t in self.manifest.inputs}
                for i in range(int(g["count"]))]

    def warm_up(self, runs: int = 3, bundle: Bundle | None = None) -> float:
        """Run the golden inputs (random ones only for a bundle without them) a few times, and each
        length bucket on its own; returns the main model's last latency in ms. Random values would
        crash models with ids or sample rates as inputs."""
        golden = self.golden_inputs(bundle)
        ms = self._warm(self.runtime, self.validate(golden[0]) if golden else self.runtime.sample_inputs(), runs)
        for length, rt in self.buckets.items():
            self._warm(rt, rt.prepare(self._bucket_golden(length, 0)[0]) if golden else rt.sample_inputs(), runs)
        return ms

    def _warm(self, rt: Runtime, feeds: dict, runs: int) -> float:
        ms = 0.0
        for _ in range(max(1, runs)):
            if self.pause:
                self.pause()
            t0 = time.perf_counter()
            with self._lock:
                rt.run(feeds)
            ms = (time.perf_counter() - t0) * 1000
        return ms

    def _bucket_golden(self, length: int, i: int) -> tuple[dict, dict]:
        pre = f"bucket.{length}."
        return ({t.name: self._golden[f"{pre}input.{i}.{t.name}"] for t in self.manifest.inputs},
                {t.name: self._golden[f"{pre}output.{i}.{t.name}"] for t in self.manifest.outputs})

    def check_golden(self, bundle: Bundle | None = None) -> dict:
        """Compare outputs on the bundle's golden inputs with the expected ones (each length bucket's
        on its own golden inputs: `buckets`, by length)."""
        g = self.manifest.golden
        if not g:
            return {"checked": 0, "ok": True, "note": "bundle has no golden outputs"}
        self.golden_inputs(bundle)
        arrays, rtol = self._golden, float(g.get("rtol", 0))
        pairs = [({t.name: arrays[f"input.{i}.{t.name}"] for t in self.manifest.inputs},
                  {t.name: arrays[f"output.{i}.{t.name}"] for t in self.manifest.outputs})
                 for i in range(int(g["count"]))]
        worst = self._excess(self.runtime, pairs, rtol)
        res = {"checked": int(g["count"]), "ok": worst <= float(g["atol"]), "max_excess_error": worst,
               "atol": float(g["atol"])}
        for b in (self.manifest.text or {}).get("buckets") or ():
            n, atol = b["length"], float(b["atol"])
            w = self._excess(self.buckets[n], [self._bucket_golden(n, i) for i in range(b["golden"])], rtol)
            res.setdefault("buckets", {})[n] = {"checked": b["golden"], "ok": w <= atol, "max_excess_error": w,
                                                "atol": atol}
            res["ok"] = res["ok"] and w <= atol
        return res

    def _excess(self, rt: Runtime, pairs: list[tuple[dict, dict]], rtol: float) -> float:
        """The largest error beyond rtol of `rt`'s outputs on (inputs, expected outputs) pairs."""
        worst = 0.0
        for feeds, expected in pairs:
            if self.pause:
                self.pause()
            feeds = self.validate(feeds) if rt is self.runtime else rt.prepare(feeds)
            with self._lock:
                if self._closed:
                    raise ModelClosed(self.name)
                got = self._dequantized(rt.run(feeds), rt)
            for name, exp in expected.items():
                err = np.abs(np.asarray(got[name], np.float64) - exp) - rtol * np.abs(exp)
                worst = max(worst, float(np.max(err)))
        return worst

    def close(self) -> None:
        """Release the runtimes once requests running on them have finished (generations admitted
        before a swap finish on this model first)."""
        if self.generation is not None:
            self.generation.close()
        with self._lock:
            self._closed = True
            for rt in (self.runtime, *self.buckets.values()):
                rt.close()
        if self.owns_base and self.base is not None:
            self.base.close()
        if self.extracted is not None:
            extracted.release(self.extracted)
            self.extracted = None


def load_bundle(path: str | Path, *, model_dir: str | Path | None = None, threads: int | None = None,
                cache_dir: str | None = None, allow_cpu_fallback: bool | None = None, check_golden: bool = True,
                warmup: int = 3, bundle: Bundle | None = None, verified: bool = False,
                sha256: str | None = None, pause: Callable[[], None] | None = None, base: Model | None = None) -> Model:
    """Verify and load a bundle. One pass over the archive checks every member's hash and
    extracts the model file and golden.npz into `model_dir` (default: the user's extraction cache,
    device_agent/extracted.py, a folder keyed by the bundle's sha256, never beside the bundle, held while
    the model is loaded); the model is then warmed up and its golden outputs checked (a mismatch raises
    VerificationError). `bundle` + `verified=True`: the caller already ran that pass (Bundle.verify with
    extraction into `model_dir`), so nothing is hashed twice. `pause` runs
    before each warm-up and golden run: staging beside live models yields to their requests. An adapter
    bundle needs `base`, the loaded genai model (or an adapter on it) whose weights it is pinned to."""
    path = Path(path)
    bundle = bundle or open_bundle(path)
    m = bundle.manifest
    digest = sha256 or sha256_file(path)
    wanted = bundle_members_to_extract(m)
    if m.format == ADAPTER:  # refused before anything is hashed or loaded when the base is not its own
        base = base.base if base is not None and base.base is not None else base
        why = "an adapter bundle loads beside its base: none is loaded" if base is None else adapter_refusal(
            base.manifest, m)
        if why:
            raise BundleError(f"{path.name}: {why}", hint="push the adapter to the model running its base (push "
                                                           "--model BASE_NAME), or the base it was built for first")
    cached = model_dir is None
    model_dir = extracted.folder(digest) if cached else Path(model_dir)  # cached: held until Model.close
    try:
        if cached:  # room first, then the bundle's own bytes counted
            extracted.prune(keep=model_dir)
        if not verified:
            bundle.verify(extract_to=model_dir, extract=wanted)  # every file's hash, before anything is loaded
        if cached:
            extracted.prune(keep=model_dir)
        if m.format == ADAPTER:
            model = _adapted(base, m, model_dir, path, digest, check=check_golden, pause=pause)
        else:
            model = _loaded(m, model_dir, path, digest, cache_dir=cache_dir, threads=threads,
                            allow_cpu_fallback=allow_cpu_fallback, check_golden=check_golden, warmup=warmup,
                            pause=pause)
    except BaseException:
        if cached:
            extracted.release(model_dir)
        raise
    model.extracted = model_dir if cached else None
    return model


def _loaded(m: Manifest, model_dir: Path, path: Path, digest: str, *, cache_dir, threads, allow_cpu_fallback,
            check_golden: bool, warmup: int, pause) -> Model:
    target = model_dir / m.model_file
    golden = model_dir / m.golden["file"] if m.golden else None
    if golden is not None and golden.stat().st_size > MAX_GOLDEN_BYTES:
        raise VerificationError(f"{path.name}: {m.golden['file']} is {golden.stat().st_size} bytes; golden data "
                                f"over {MAX_GOLDEN_BYTES} bytes is refused (it is loaded into memory)")
    runtime = load_from_manifest(str(target), m, cache_dir=cache_dir, threads=threads,
                                 allow_cpu_fallback=allow_cpu_fallback)
    model = Model(manifest=m, runtime=runtime, bundle_sha256=digest, bundle_path=path, golden_path=golden)
    try:
        for b in (m.text or {}).get("buckets") or ():  # a model per length: no resize at request time
            if b.get("signature"):  # a signature of the model file: the weights are its buffers, held once
                rt = model.buckets[b["length"]] = _signature(runtime, b["signature"], path.name)
            else:  # bundles before 2026-12: a file of its own
                rt = model.buckets[b["length"]] = load_from_manifest(str(model_dir / b["file"]), m, cache_dir=cache_dir,
                                                                     threads=threads, allow_cpu_fallback=allow_cpu_fallback)
            if any(t.shape[-1:] != (b["length"],) for t in rt.inputs):
                raise BundleError(f"{path.name}: length bucket {b['file']} takes {[list(t.shape) for t in rt.inputs]}, "
                                  f"not sequence length {b['length']}", hint="rebuild the bundle")
        model.text = text_encoder(m, model_dir, path.name)
        model.pause = pause
        if m.format == GENAI:  # golden prompts instead of golden tensors; nothing to warm up
            model.generation = load_generative(runtime, m, model_dir, path.name, check=check_golden, pause=pause)
        else:
            model.warm_up(warmup)
            if check_golden:
                _check_golden(model, path.name)
        model.pause = None
    except BaseException:
        model.close()
        raise
    return model


def _signature(runtime: Runtime, key: str, bundle_name: str) -> Runtime:
    sibling = getattr(runtime, "signature", None)
    if sibling is None:
        raise BundleError(f"{bundle_name}: its length buckets are signatures of one model, which the "
                          f"{runtime.details.get('runtime')} runtime cannot select", hint="rebuild the bundle")
    try:
        return sibling(key)
    except RuntimeUnavailableError as e:
        raise BundleError(f"{bundle_name}: {e}", hint="the model file does not match its manifest: rebuild the bundle") from None


def _adapted(base: Model, m: Manifest, model_dir: Path, path: Path, digest: str, *, check: bool,
             pause: Callable[[], None] | None) -> Model:
    """An adapter bundle's model: the base's runtime seen through the adapter (the weights loaded once),
    its own generation queue with the base's chat template and defaults, its golden prompts checked."""
    view = base.runtime.with_adapter(str(model_dir / m.model_file), f"{m.name}-{m.version}-{digest[:12]}")
    model = Model(manifest=m, runtime=view, bundle_sha256=digest, bundle_path=path, base=base)
    try:
        model.generation = adapted_generation(base.generation, view, m, path.name, check=check, pause=pause)
    except BaseException:
        model.close()
        raise
    return model


def _check_golden(model: Model, bundle_name: str) -> None:
    res = model.check_golden()
    if res["ok"]:
        return
    hint = ("the model does not compute what it computed at build time on this runtime; "
            "check the runtime version, or rebuild the bundle")
    if res["max_excess_error"] > res["atol"]:
        raise VerificationError(f"{bundle_name}: golden outputs differ by {res['max_excess_error']:.4g} "
                                f"(> atol {res['atol']:.4g})", hint=hint)
    bad = ", ".join(f"{n} tokens by {r['max_excess_error']:.4g} (> atol {r['atol']:.4g})"
                    for n, r in res["buckets"].items() if not r["ok"])
    raise VerificationError(f"{bundle_name}: golden outputs of the length bucket model(s) differ: {bad}", hint=hint)


def bundle_members_to_extract(m: Manifest) -> list[str]:
    """What the device needs on disk: the model file (and a TFLite text bundle's length buckets), the
    golden data and a text model's tokenizer; every member of a generative bundle (weights, configuration,
    tokenizer and chat template sit beside the model file)."""
    if m.format in (GENAI, ADAPTER):
        return sorted(m.files)
    buckets = [b["file"] for b in (m.text or {}).get("buckets") or () if b["file"] != m.model_file]
    return ([m.model_file] + buckets + ([m.golden["file"]] if m.golden else [])
            + ([m.text["tokenizer"]] if m.text else []))


def _stacked(parts: list[np.ndarray]) -> np.ndarray:
    """Outputs of several runs as one batch; per-token outputs of shorter runs padded with zeros."""
    if len(parts) == 1:
        return parts[0]
    shape = tuple(max(p.shape[d] for p in parts) for d in range(1, parts[0].ndim))
    return np.concatenate([np.pad(p, [(0, 0)] + [(0, n - k) for n, k in zip(shape, p.shape[1:])]) for p in parts])
