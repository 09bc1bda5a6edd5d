"""TFLite models: LiteRT (ai_edge_litert), else tflite_runtime (needs numpy<2)."""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from edgeruntime.base import LoadSpec, Runtime, TensorInfo
from edgebundle.errors import RuntimeUnavailableError

EDGETPU = "edgetpu"  # the Coral Edge TPU's delegate, as profiles and manifests name it
EDGETPU_LIB = "libedgetpu.so.1"
EDGETPU_OP = "edgetpu-custom-op"
# LiteRT's one native log line at INFO (printed once per process, whatever TF_CPP_MIN_LOG_LEVEL says)
XNNPACK_INFO = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_fd2 = threading.Lock()


@contextlib.contextmanager
def without_xnnpack_info(*, chatter: bool = False):
    """The native stderr (fd 2) held while LiteRT sets up: everything it wrote is passed on but the
    XNNPACK INFO line (`chatter`: and every INFO and WARNING line, which CompiledModel's set-up writes
    by the dozen). Under a lock: fd 2 is the process's, and two loads must not swap it twice."""
    with _fd2:
        try:
            sys.stderr.flush()
            # in memory: the temp dir may be missing, or a small RAM disk on a device
            held = os.memfd_create("litert-stderr") if hasattr(os, "memfd_create") else None
            saved = os.dup(2) if held is not None else None
        except (OSError, ValueError):  # no fd 2 to hold (a closed stderr), or no memfd: nothing filtered
            held = saved = None
        if saved is None:
            if held is not None:
                os.close(held)
            yield
            return
        os.dup2(held, 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.lseek(held, 0, os.SEEK_SET)
            with os.fdopen(held, "rb") as f:
                rest = b"".join(ln for ln in f.read().splitlines(keepends=True) if not _noise(ln, chatter))
            if rest:
                os.write(2, rest)


def _noise(line: bytes, chatter: bool) -> bool:
    line = line.strip()
    return line == XNNPACK_INFO or chatter and line.startswith((b"INFO: ", b"WARNING: ", b"\xe2\x94\x94"))


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter as mod

        return mod, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as mod  # last release 2.14 needs numpy<2

        return mod, "tflite-runtime"
    except ImportError:
        raise RuntimeUnavailableError(
            "no TFLite runtime is installed",
            hint="pip install ai-edge-litert (Python 3.10-3.12, x86-64/aarch64); "
                 "on older devices: pip install tflite-runtime 'numpy<2'") from None


def _info(d: dict, name: str) -> TensorInfo:
    scale, zp = d.get("quantization", (0.0, 0))
    sig = d.get("shape_signature")
    shape = tuple(int(x) for x in (sig if sig is not None and len(sig) else d["shape"]))
    return TensorInfo(name=name, shape=shape, dtype=np.dtype(d["dtype"]).name,
                      scale=float(scale) if scale else None, zero_point=int(zp) if scale else None)


@dataclass
class LiteRTRuntime(Runtime):
    """Runs through the interpreter's tensor indices (not the signature runner's
    per-call dict plumbing) so the adapter adds next to nothing per inference."""

    _interp: object = None
    _in_idx: tuple = ()
    _out_idx: tuple = ()
    _key: str | None = None  # the signature it runs
    _runner: object = None  # set once a model's other signatures are in use (see signature())

    @classmethod
    def load(cls, path: str, spec: LoadSpec | None = None, *, interpreter_module=None) -> "LiteRTRuntime":
        # interpreter_module: the packager passes TensorFlow's (with the Flex delegate) for Flex models.
        spec = spec or LoadSpec(format="tflite")
        threads, delegates, allow_cpu_fallback = spec.threads, spec.delegates, spec.allow_cpu_fallback
        mod, dist = (interpreter_module, "tensorflow") if interpreter_module else _interpreter_module()
        compiled = _has(path, EDGETPU_OP.encode())
        loaded_delegates, notes = [], []
        if EDGETPU in delegates:
            try:
                # dlopen first: LiteRT's Delegate object raises from __del__ when the library is
                # missing, which prints "Exception ignored" noise on every fallback.
                ctypes.CDLL(EDGETPU_LIB)
                loaded_delegates.append(mod.load_delegate(EDGETPU_LIB))
            except (ValueError, OSError) as e:
                if compiled or not allow_cpu_fallback:
                    raise RuntimeUnavailableError(
                        f"the Edge TPU delegate {EDGETPU_LIB} could not be loaded ({e})",
                        hint="install libedgetpu1-std from Coral's apt repository and plug in the "
                             "Edge TPU; a compiled model cannot run without it") from None
                notes.append(f"Edge TPU delegate unavailable ({e}); running on the CPU")
        if not loaded_delegates and interpreter_module is None and dist == "ai-edge-litert":
            shared = _compiled(path, threads, compiled, notes)
            if shared is not None:
                return shared
        kwargs = {"num_threads": threads} if threads else {}
        model = open(path, "rb").read()
        try:
            with without_xnnpack_info():
                interp = mod.Interpreter(model_content=model, experimental_delegates=loaded_delegates or None,
                                         **kwargs)
                interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise RuntimeUnavailableError(f"{dist} could not load {path}: {e}") from None
        # Map signature names to tensor indices without keeping a SignatureRunner alive: a live
        # runner holds a reference to the interpreter, which then refuses to invoke().
        sigs = interp._get_full_signature_list() or {}
        by_index = {d["index"]: d for d in interp.get_input_details() + interp.get_output_details()}
        if sigs:
            key = "serving_default" if "serving_default" in sigs else sorted(sigs)[0]
            sig = sigs[key]
            ins, outs = sig["inputs"], sig["outputs"]
            in_names, out_names = sorted(ins), sorted(outs)
            inputs = tuple(_info(by_index[ins[n]], n) for n in in_names)
            outputs = tuple(_info(by_index[outs[n]], n) for n in out_names)
            in_idx = tuple(ins[n] for n in in_names)
            out_idx = tuple(outs[n] for n in out_names)
        else:  # e.g. older edgetpu_compiler output: fall back to tensor names
            key = None
            ins, outs = interp.get_input_details(), interp.get_output_details()
            inputs = tuple(_info(d, d["name"]) for d in ins)
            outputs = tuple(_info(d, d["name"]) for d in outs)
            in_idx = tuple(d["index"] for d in ins)
            out_idx = tuple(d["index"] for d in outs)
        delegate = EDGETPU if loaded_delegates else ("xnnpack" if "xnnpack" in delegates else "cpu")
        details = {"runtime": "litert", "package": dist, "version": getattr(mod, "__version__", None) or _dist_version(dist),
                   "delegate": delegate, "edgetpu_compiled": compiled, "threads": threads or None, "notes": notes}
        return cls(inputs=inputs, outputs=outputs, details=details, _interp=interp,
                   _in_idx=in_idx, _out_idx=out_idx, _key=key)

    def signature(self, key: str) -> "LiteRTRuntime":
        """Another signature of the same model (a text bundle's length bucket: its weights are this model's
        buffers, held once). From then on both run through signature runners: the interpreter's raw API
        refuses to invoke while a runner lives."""
        sigs = self._interp.get_signature_list()
        if key not in sigs or self._key is None:
            raise RuntimeUnavailableError(f"the model has no signature {key!r} (it has {sorted(sigs)})")
        runner = self._interp.get_signature_runner(key)
        inputs, outputs = _described(runner)
        other = LiteRTRuntime(inputs=inputs, outputs=outputs,
                              details=dict(self.details, signature=key), _interp=self._interp, _key=key, _runner=runner)
        if self._runner is None:
            self._runner = self._interp.get_signature_runner(self._key)
        return other

    @classmethod
    def plain_delegates(cls, delegates: tuple[str, ...]) -> tuple[str, ...]:
        """The Edge TPU runs only models its compiler wrote: a plain .tflite goes without it."""
        return tuple(d for d in delegates if d != EDGETPU)

    def __post_init__(self) -> None:
        self._in_pairs = tuple((i.name, idx) for i, idx in zip(self.inputs, self._in_idx))
        self._out_pairs = tuple((o.name, idx) for o, idx in zip(self.outputs, self._out_idx))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is not None:
            return self._runner(**{i.name: feeds[i.name] for i in self.inputs})
        it = self._interp
        set_tensor, get_tensor = it.set_tensor, it.get_tensor
        for name, idx in self._in_pairs:
            set_tensor(idx, feeds[name])
        it.invoke()
        return {name: get_tensor(idx) for name, idx in self._out_pairs}

    def ops(self) -> list[str]:
        """Op names in execution order (used by lint and reports)."""
        return [d["op_name"] for d in self._interp._get_ops_details()]

    def close(self) -> None:
        self._interp = self._runner = None


def _described(runner) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """A signature runner's inputs and outputs, sorted by name."""
    ins, outs = runner.get_input_details(), runner.get_output_details()
    return tuple(_info(ins[n], n) for n in sorted(ins)), tuple(_info(outs[n], n) for n in sorted(outs))


def _has(path: str, needle: bytes) -> bool:
    """Whether the file holds `needle`, read through a map (not a copy of a model of hundreds of MB)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(needle) >= 0
    except (OSError, ValueError):  # an empty file cannot be mapped; the load says what is wrong with it
        return False


def _compiled(path: str, threads: int, edgetpu_compiled: bool, notes: list[str]) -> Runtime | None:
    """A model with several signatures through CompiledModel (litert_compiled.py: each weight packed once
    for all of them), when this LiteRT has it and the signatures' tensors suit it; else None (and, when
    CompiledModel refused it, a note: the Interpreter runs it, each signature with its own packed weights)."""
    from edgeruntime import litert_compiled

    if not litert_compiled.available():
        return None
    try:
        meta = litert_compiled.metadata_interpreter(path)
    except (ValueError, RuntimeError):
        return None  # the Interpreter's load says why
    sigs = meta.get_signature_list()
    if len(sigs) < 2:
        return None
    infos = {}
    for key in sigs:
        infos[key] = _described(meta.get_signature_runner(key))
    del meta
    if not litert_compiled.runnable(infos):
        return None
    key = "serving_default" if "serving_default" in infos else sorted(infos)[0]
    details = {"runtime": "litert", "package": "ai-edge-litert", "version": _dist_version("ai-edge-litert"),
               "delegate": "xnnpack", "edgetpu_compiled": edgetpu_compiled, "threads": threads or None,
               "notes": list(notes)}
    try:
        with without_xnnpack_info(chatter=True):
            return litert_compiled.CompiledRuntime.load(path, infos, key, threads=threads, details=details)
    except RuntimeUnavailableError as e:
        notes.append(f"{e}; loaded with the Interpreter, which holds the weights once per signature")
        return None


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
