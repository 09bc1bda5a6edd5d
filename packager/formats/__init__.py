"""One module per output format (and per accelerator); importing them fills the backend registry,
so the lookups are taken from here."""
from packager.formats import onnx as _onnx  # noqa: F401  (registers backends)
from packager.formats import tflite as _tflite  # noqa: F401
from packager.formats import edgetpu as _edgetpu  # noqa: F401  (the Coral Edge TPU, over TFLite)
from packager.formats import onnx_tflite as _onnx_tflite  # noqa: F401  (ONNX -> TFLite bridge)
from packager.registry import backend, backend_for, backends, bridge, check_pair

__all__ = ["backend", "backend_for", "backends", "bridge", "check_pair"]
