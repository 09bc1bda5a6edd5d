"""ONNX models: ONNX Runtime with the bundle's providers, in order, among those available."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from edgeruntime.base import LoadSpec, Runtime, TensorInfo
from edgebundle.errors import RuntimeUnavailableError

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
               "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool"}


def _info(arg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    return TensorInfo(name=arg.name, shape=shape, dtype=_ORT_DTYPES.get(arg.type, "float32"))


def provider_options(name: str, *, cache_dir: str | None, trt_fp16: bool, trt_cache: bool,
                     trt_profile: dict | None = None) -> dict:
    if name == "TensorrtExecutionProvider":
        opts = {"trt_fp16_enable": trt_fp16}
        if trt_cache and cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache_dir,
                        trt_timing_cache_enable=True, trt_timing_cache_path=cache_dir)
        if trt_profile:
            opts.update(profile_shapes(trt_profile))
        return opts
    return {}


def profile_shapes(profile: dict) -> dict[str, str]:
    """A manifest's TensorRT optimisation profile ({input: {"min", "opt", "max"}}) as the TensorRT EP's
    explicit-profile options, e.g. trt_profile_min_shapes="input_ids:1x1,attention_mask:1x1": the engine
    is built once for that range instead of being rebuilt for each new input shape."""
    return {f"trt_profile_{k}_shapes": ",".join(f"{name}:{'x'.join(map(str, r[k]))}" for name, r in profile.items())
            for k in ("min", "opt", "max")}


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


@dataclass
class OnnxRuntime(Runtime):
    _session: object = None
    _out_names: tuple = ()

    @classmethod
    def load(cls, path: str, spec: LoadSpec | None = None) -> "OnnxRuntime":
        spec = spec or LoadSpec(format="onnx")
        threads, providers = spec.threads, spec.providers
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailableError(
                "onnxruntime is not installed",
                hint="pip install onnxruntime (on Jetson: onnxruntime-gpu from NVIDIA's Jetson index)") from None
        available = ort.get_available_providers()
        wanted = list(providers) or ["CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise RuntimeUnavailableError(
                f"none of the bundle's providers {wanted} is available (this onnxruntime has {available})",
                hint="install the onnxruntime build for this device (onnxruntime-gpu for CUDA/TensorRT)")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        opts = [provider_options(p, cache_dir=spec.cache_dir, trt_fp16=spec.trt_fp16, trt_cache=spec.trt_cache,
                                 trt_profile=spec.trt_profile) for p in chosen]
        try:
            sess = ort.InferenceSession(str(path), sess_options=so, providers=chosen, provider_options=opts)
        except Exception as e:  # onnxruntime raises its own untyped exceptions (Fail, InvalidGraph, ...)
            raise RuntimeUnavailableError(f"onnxruntime could not load {path}: {e}") from None
        inputs = tuple(_info(a) for a in sess.get_inputs())
        outputs = tuple(_info(a) for a in sess.get_outputs())
        in_use = sess.get_providers()
        skipped = [p for p in wanted if p not in in_use]
        details = {"runtime": "onnxruntime", "version": ort.__version__, "providers": in_use,
                   "provider": in_use[0] if in_use else None, "requested": wanted,
                   "skipped": skipped, "threads": threads or None}
        if skipped and wanted[0] in skipped:  # a GPU bundle on a host without CUDA: say so, never silently
            details["notes"] = [f"{', '.join(skipped)} not available here: running on {in_use[0] if in_use else '?'}"]
        return cls(inputs=inputs, outputs=outputs, details=details, _session=sess,
                   _out_names=tuple(o.name for o in outputs))

    @classmethod
    def slow_load(cls, *, providers: tuple[str, ...] = (), cache_dir: str | None = None,
                  trt_cache: bool = False, **_ignored) -> str | None:
        """The TensorRT EP compiles engines while the session is created (minutes on a Jetson);
        with the engine cache on, only when the model's cache folder holds no engine yet."""
        if "TensorrtExecutionProvider" not in providers:
            return None
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        if "TensorrtExecutionProvider" not in ort.get_available_providers():
            return None
        if trt_cache and cache_dir and any(n.endswith(".engine") for n in _listdir(cache_dir)):
            return None
        return "TensorRT engines for this model" + (" (first start; cached afterwards)" if trt_cache and cache_dir
                                                    else " (engine cache off: every start)")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = self._session.run(self._out_names, feeds)
        return dict(zip(self._out_names, res))

    def close(self) -> None:
        self._session = None
