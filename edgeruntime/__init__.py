"""Runtimes behind one adapter interface, chosen from the bundle's manifest."""
from edgeruntime.base import LoadSpec, Runtime, TensorInfo, dequantize, quantize
from edgeruntime.registry import load_runtime, runtime_for_format

__all__ = ["LoadSpec", "Runtime", "TensorInfo", "dequantize", "load_runtime", "quantize", "runtime_for_format"]
