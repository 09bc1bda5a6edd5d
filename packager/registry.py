"""One backend per output format, found through this registry.

A backend converts a source into a candidate of its format, lints the result for the
target, gives the graph view the sensitivity analysis reads, finishes the model for the
device (the Edge TPU compile step) and says what to try when a candidate fails. Adding a
format means one module that registers a Backend; the build and the CLI read this table.

A Bridge brings a source kind a backend does not read to one it does (ONNX -> SavedModel for
TFLite); the backend then runs its own path (calibration, quantizers, lint) unchanged."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.errors import InputError
from targets import CalibrationMethod, Format, Precision, TargetProfile


@dataclass(frozen=True)
class ConvertContext:
    source: object  # packager.sources.Source
    profile: TargetProfile
    candidate: object  # packager.candidates.Candidate
    out_dir: Path
    cache: object  # packager.cache.BuildCache
    calibration: object = None  # packager.data.Dataset, for int8/int16x8
    allow_flex: bool = False
    opset: int = 17
    per_channel: bool = True
    calibration_method: CalibrationMethod = CalibrationMethod.MINMAX
    sample: dict | None = None  # one validation sample (feeds), for converters that check their result

    @property
    def precision(self) -> Precision:
        return self.candidate.precision


@dataclass(frozen=True)
class Artifact:
    path: Path
    format: Format
    precision: Precision
    quantization: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Finished:
    """The model as it goes into the bundle, after any device compile step."""

    path: Path
    name: str  # file name inside the bundle
    compile_report: dict | None = None
    warnings: tuple[str, ...] = ()


class Backend(ABC):
    format: Format
    sources: tuple[str, ...]  # source kinds it converts from

    @abstractmethod
    def convert(self, ctx: ConvertContext) -> Artifact:
        """The candidate `ctx.candidate` of this format, written under `ctx.out_dir`."""

    @abstractmethod
    def fp32(self, ctx: ConvertContext) -> Path:
        """The float model of this format (computed once per build, kept in the cache)."""

    @abstractmethod
    def lint(self, art: Artifact, profile: TargetProfile, *, allow_flex: bool, inputs, outputs) -> list:
        """Findings on the converted model (packager.lint.Finding)."""

    @abstractmethod
    def graph_view(self, art: Artifact, ctx: ConvertContext, samples: list[dict]):
        """(sensitivity.GraphView, float tensors, candidate tensors) on `samples`."""

    def variant(self, ctx: ConvertContext) -> str:
        """The profile settings (besides format and precision) that change the converted file."""
        return ""

    def finish(self, art: Artifact, profile: TargetProfile, work: Path, *, name: str, version: str) -> Finished:
        return Finished(path=art.path, name=art.path.name)

    def gate_hint(self, profile: TargetProfile, precision: Precision) -> str:
        return "give more representative calibration data, or choose a higher precision with --quantize"

    def describe(self, path: Path):
        """(inputs, outputs) as runtime TensorInfo, for models no runtime here can load."""
        raise NotImplementedError(f"{self.format.value} models are described by their runtime")


class Bridge(ABC):
    """Converts a source of kind `kind` into the model file a `format` backend starts from."""

    kind: str
    format: Format

    def check(self) -> None:
        """Raise InputError, before any work, when the converter is not installed."""

    @abstractmethod
    def saved_model(self, ctx: ConvertContext) -> Path:
        """A SavedModel with the source's interface at its resolved shapes (once per build)."""

    def details(self, ctx: ConvertContext) -> dict:
        """What the bundle records about the conversion (converter, I/O layout)."""
        return {}


_BACKENDS: dict[Format, Backend] = {}
_BRIDGES: dict[tuple[str, Format], Bridge] = {}
# Pairs that cannot be built, with what to do instead.
_UNSUPPORTED: dict[tuple[str, Format], str] = {
    ("tflite", Format.ONNX): "a .tflite model can only be packaged for TFLite targets (arm-cpu, rpi5, coral); "
                             "build from the original model for ONNX targets",
}


def register(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.format] = cls()
    return cls


def register_bridge(cls: type[Bridge]) -> type[Bridge]:
    _BRIDGES[(cls.kind, cls.format)] = cls()
    return cls


def bridge(kind: str, fmt: Format) -> Bridge | None:
    """The bridge that brings `kind` sources to `fmt`, or None when the backend reads them itself."""
    import packager.formats  # noqa: F401

    return _BRIDGES.get((kind, fmt))


def backend(fmt: Format) -> Backend:
    import packager.formats  # noqa: F401  (fills the table)

    return _BACKENDS[fmt]


def check_pair(kind: str, fmt: Format) -> None:
    """Fail before any work when `kind` sources cannot become `fmt` models."""
    if (kind, fmt) in _UNSUPPORTED:
        raise InputError(_UNSUPPORTED[(kind, fmt)])
    if kind in backend(fmt).sources:
        return
    via = bridge(kind, fmt)
    if via is not None:
        via.check()
    else:
        raise InputError(f"no converter from {kind} to {fmt.value}")
