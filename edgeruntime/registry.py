"""Model format -> runtime adapter. Adding a runtime means adding one module and one line."""
from __future__ import annotations

from edgeruntime.base import LoadSpec, Runtime
from edgebundle.errors import BundleError

_RUNTIMES = {
    "tflite": ("edgeruntime.litert", "LiteRTRuntime"),
    "onnx": ("edgeruntime.onnxrt", "OnnxRuntime"),
    "genai": ("edgeruntime.genai", "GenAIRuntime"),
    "genai-adapter": ("edgeruntime.genai", "GenAIRuntime"),  # runs on its base's GenAIRuntime (with_adapter)
}


def runtime_for_format(fmt: str) -> type[Runtime]:
    import importlib

    try:
        module, cls = _RUNTIMES[fmt]
    except KeyError:
        raise BundleError(f"no runtime for model format {fmt!r}; known: {', '.join(_RUNTIMES)}") from None
    return getattr(importlib.import_module(module), cls)


def load_runtime(path: str, spec: LoadSpec) -> Runtime:
    """Load a model file with the adapter for its format (imports only that runtime)."""
    return runtime_for_format(spec.format).load(str(path), spec)


def load_from_manifest(path: str, manifest, *, cache_dir: str | None = None, threads: int | None = None,
                       allow_cpu_fallback: bool | None = None) -> Runtime:
    """Load a bundle's model with the runtime settings its manifest records."""
    rt = manifest.runtime
    return load_runtime(path, LoadSpec(
        format=manifest.format, threads=rt.threads if threads is None else threads, delegates=tuple(rt.delegates),
        providers=tuple(rt.providers), cache_dir=cache_dir, trt_fp16=rt.tensorrt_fp16,
        trt_cache=rt.tensorrt_engine_cache, trt_profile=rt.tensorrt_profile,
        allow_cpu_fallback=rt.cpu_fallback if allow_cpu_fallback is None else allow_cpu_fallback))


def slow_load(manifest, *, cache_dir: str | None = None) -> str | None:
    """Why loading this bundle's model will be slow on this device (None: it will not be)."""
    return runtime_for_format(manifest.format).slow_load(
        providers=manifest.runtime.providers, cache_dir=cache_dir, trt_cache=manifest.runtime.tensorrt_engine_cache)
