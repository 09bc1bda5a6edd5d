"""Runtimes behind one adapter interface, chosen from the bundle's manifest."""
from device_agent.runtimes.base import Runtime, TensorInfo, dequantize, quantize
from device_agent.runtimes.registry import load_runtime, runtime_for_format

__all__ = ["Runtime", "TensorInfo", "dequantize", "load_runtime", "quantize", "runtime_for_format"]
