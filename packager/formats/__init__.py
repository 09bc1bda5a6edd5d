"""One module per output format; importing them fills the converter registry."""
from packager.formats import onnx as _onnx  # noqa: F401  (registers converters)
from packager.formats import tflite as _tflite  # noqa: F401
from packager.formats import onnx_tflite as _onnx_tflite  # noqa: F401  (ONNX -> TFLite bridge)
