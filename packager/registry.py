"""Converters keyed by (source kind, output format, precision).

Adding a format or a quantization mode means one module that registers its
functions here; the build and the CLI's choices are driven by this table."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebundle.errors import ConversionError, InputError
from targets import Format, Precision, TargetProfile, CalibrationMethod


@dataclass(frozen=True)
class ConvertContext:
    source: object  # packager.sources.Source
    profile: TargetProfile
    precision: Precision
    out_dir: Path
    calibration: object = None  # packager.data.Dataset, for int8/int16x8
    allow_flex: bool = False
    opset: int = 17
    per_channel: bool = True
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    shared: dict = field(default_factory=dict)  # work shared by targets of one build (e.g. the fp32 ONNX graph)


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: Format
    precision: Precision
    quantization: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()


Converter = Callable[[ConvertContext], Artifact]
_CONVERTERS: dict[tuple[str, Format, Precision], Converter] = {}
# Pairs that cannot be built, with what to do instead.
_UNSUPPORTED: dict[tuple[str, Format], str] = {
    ("onnx", Format.TFLITE): "ONNX -> TFLite is not supported: build from the original TensorFlow/Keras model, "
                             "or use an ONNX target (jetson-gpu, x86-cpu). onnx2tf is a third-party route.",
    ("tflite", Format.ONNX): "a .tflite model can only be packaged for TFLite targets (arm-cpu, rpi5, coral); "
                             "build from the original model for ONNX targets",
}


def register(*, kinds, fmt: Format, precisions) -> Callable[[Converter], Converter]:
    def deco(fn: Converter) -> Converter:
        for kind in kinds:
            for prec in precisions:
                _CONVERTERS[(str(kind.value), fmt, prec)] = fn
        return fn

    return deco


def get_converter(kind: str, fmt: Format, precision: Precision) -> Converter:
    import packager.formats  # noqa: F401  (fills the table)

    fn = _CONVERTERS.get((kind, fmt, precision))
    if fn is not None:
        return fn
    if (kind, fmt) in _UNSUPPORTED:
        raise InputError(_UNSUPPORTED[(kind, fmt)])
    can = supported_precisions(kind, fmt)
    if not can:
        raise ConversionError(f"no converter from {kind} to {fmt.value}")
    raise InputError(f"{kind} -> {fmt.value} cannot produce precision {precision.value!r}",
                     hint=f"choose one of: {', '.join(p.value for p in can)}")


def supported_precisions(kind: str, fmt: Format) -> list[Precision]:
    import packager.formats  # noqa: F401

    return [p for (k, f, p) in _CONVERTERS if k == kind and f is fmt]


def all_precisions() -> list[str]:
    return [p.value for p in Precision]
