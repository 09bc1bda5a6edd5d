"""The runtime adapter interface: load, describe inputs/outputs, infer."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from edgebundle.errors import InputError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # ints; -1 for a dynamic dimension
    dtype: str  # numpy dtype name
    scale: float | None = None  # affine quantization of integer tensors
    zero_point: int | None = None

    @property
    def quantized(self) -> bool:
        return self.scale is not None and self.scale > 0 and np.dtype(self.dtype).kind in "iu"


def quantize(x: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float -> the tensor's integer dtype with its scale and zero point."""
    dt = np.dtype(info.dtype)
    lim = np.iinfo(dt)
    q = np.round(np.asarray(x, np.float32) / info.scale) + info.zero_point
    return np.clip(q, lim.min, lim.max).astype(dt)


def dequantize(q: np.ndarray, info: TensorInfo) -> np.ndarray:
    return (q.astype(np.float32) - info.zero_point) * np.float32(info.scale)


@dataclass(frozen=True)
class LoadSpec:
    """How to load a model file: its format and the runtime settings the device runs it with."""

    format: str  # tflite | onnx
    threads: int = 0  # 0: the runtime's default
    delegates: tuple[str, ...] = ()  # LiteRT's
    providers: tuple[str, ...] = ()  # ONNX Runtime's, in order of preference
    cache_dir: str | None = None  # where TensorRT keeps its engines
    trt_fp16: bool = False
    trt_cache: bool = False
    trt_profile: dict | None = None  # a manifest's TensorRT optimisation profile
    allow_cpu_fallback: bool = False  # run on the CPU when a delegate cannot be loaded


@dataclass
class Runtime(ABC):
    """One loaded model. `run` takes and returns the model's native dtypes;
    `infer` lets callers use floats for quantized tensors."""

    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()
    details: dict = field(default_factory=dict)  # runtime name, version, provider/delegate in use

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on native-dtype tensors keyed by input name."""

    @classmethod
    def plain_delegates(cls, delegates: tuple[str, ...]) -> tuple[str, ...]:
        """The delegates a model file not compiled for the device's accelerator runs with."""
        return tuple(delegates)

    @classmethod
    def slow_load(cls, *, providers: tuple[str, ...] = (), cache_dir: str | None = None,
                  trt_cache: bool = False) -> str | None:
        """What makes loading slow this time (e.g. "TensorRT engines for this model"), or None.
        The agent shows it as its state so a start that takes minutes does not look hung."""
        return None

    def close(self) -> None:
        """Release the model (override where the runtime holds native resources)."""

    def infer(self, feeds: dict[str, np.ndarray], *, raw: bool = False) -> dict[str, np.ndarray]:
        """Run once. Float inputs to quantized tensors are quantized and quantized
        outputs dequantized, unless `raw` (integer tensors then pass through)."""
        out = self.run(self.prepare(feeds))
        if raw:
            return out
        return {o.name: dequantize(out[o.name], o) if o.quantized else out[o.name] for o in self.outputs}

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names and convert each input to the model's dtype (quantizing floats)."""
        prepared = {}
        for info in self.inputs:
            if info.name not in feeds:
                raise InputError(f"missing input {info.name!r}; the model takes {[i.name for i in self.inputs]}")
            x = np.asarray(feeds[info.name])
            if info.quantized and x.dtype.kind == "f":
                x = quantize(x, info)
            elif x.dtype != np.dtype(info.dtype):
                x = x.astype(info.dtype)
            prepared[info.name] = x
        return prepared

    def sample_inputs(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """Random inputs of the right shape (dynamic dims as 1) for warm-up and benchmarks."""
        rng = rng or np.random.default_rng(0)
        feeds = {}
        for info in self.inputs:
            shape = tuple(d if d and d > 0 else 1 for d in info.shape)
            dt = np.dtype(info.dtype)
            if dt.kind == "f":
                feeds[info.name] = rng.random(shape, dtype=np.float32).astype(dt)
            elif dt.kind in "iu":
                # Quantized tensors take their full range; plain ints are usually ids or counts.
                lo, hi = (max(np.iinfo(dt).min, -128), min(np.iinfo(dt).max, 127)) if info.quantized else (0, 2)
                feeds[info.name] = rng.integers(lo, hi, size=shape).astype(dt)
            else:
                feeds[info.name] = np.zeros(shape, dt)
        return feeds
