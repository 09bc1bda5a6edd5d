"""One backend per output format (and per device accelerator), found through this registry.

A backend owns everything the build knows about its format: the precisions it can write, the
ladder `--quantize auto` walks, the rule for packaging a ready model as it is, the runtime
settings candidates run with on this host, the lint of converted models, the graph view the
sensitivity analysis reads, the device's finishing step and the hints when a candidate fails.
A backend for an accelerator (packager/formats/edgetpu.py) refines its format's backend and
serves the profiles that name its delegate. Adding a precision or a format means editing or
adding one module under packager/formats/; importing `packager.formats` fills this table.

A Bridge brings a source kind a backend does not read to one it does (ONNX -> SavedModel for
TFLite); the backend then runs its own path (calibration, quantizers, lint) unchanged."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebundle.errors import InputError
from edgeruntime import LoadSpec, Runtime, load_runtime
from edgeruntime.timing import ModelSpec, threads_for
from packager.cache import BuildCache
from packager.candidates import Candidate, Step
from packager.data import Dataset
from packager.lint import Finding
from packager.sources import Source
from targets import CalibrationMethod, Format, Precision, TargetProfile


@dataclass(frozen=True)
class ConvertContext:
    source: Source
    profile: TargetProfile
    candidate: Candidate
    out_dir: Path
    cache: BuildCache
    calibration: Dataset | None = None  # for the calibrated precisions
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
    cached: bool = False  # taken from the build cache (packager/store.py), not converted by this build


@dataclass(frozen=True)
class Finished:
    """The model as it goes into the bundle, after any device compile step."""

    path: Path
    name: str  # file name inside the bundle
    compile_report: dict | None = None
    compiled: bool | None = None  # None: the device has no compile step
    warnings: tuple[str, ...] = ()


class Backend(ABC):
    format: Format
    sources: tuple[str, ...]  # source kinds it converts from
    precisions: tuple[Precision, ...]  # what the format can do at all (profiles are checked against it)
    calibrated: tuple[Precision, ...] = ()  # precisions that need calibration data
    ladder_steps: tuple[Step, ...] = ()  # `--quantize auto`, in order of expected speed
    mixed_ok = True  # may a candidate keep nodes in float?
    delegate: str | None = None  # the accelerator delegate whose profiles this backend serves
    report_section: str | None = None  # the report page's section of this backend's own (its heading)
    lint_prefix: str = ""  # the lint codes that section shows

    @abstractmethod
    def convert(self, ctx: ConvertContext) -> Artifact:
        """The candidate `ctx.candidate` of this format, written under `ctx.out_dir`."""

    @abstractmethod
    def fp32(self, ctx: ConvertContext) -> Path:
        """The float model of this format (computed once per build, kept in the cache)."""

    @abstractmethod
    def lint(self, art: Artifact, profile: TargetProfile, *, allow_flex: bool, inputs, outputs) -> list[Finding]:
        """Findings on the converted model."""

    @abstractmethod
    def graph_view(self, art: Artifact, ctx: ConvertContext, samples: list[dict]):
        """(sensitivity.GraphView, float tensors, candidate tensors) on `samples`."""

    # ---- the ladder ----

    def ladder(self, profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
        """The steps to try: one for an explicit precision, else the profile's slice of the ladder."""
        if asked is not Precision.AUTO:
            return (Step(asked),)
        steps = self._allowed(profile)
        start = next(i for i, s in enumerate(steps) if s.precision is profile.default_precision)
        return tuple(steps[start:])

    def fallbacks(self, profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
        """After an explicit precision fails the gate: what the build tries to name one that passes."""
        steps = self._allowed(profile)
        after = [i for i, s in enumerate(steps) if s.precision is asked and not s.mixed]
        return tuple(steps[after[0] + 1:]) if after else ()

    def _allowed(self, profile: TargetProfile) -> list[Step]:
        return [s for s in self.ladder_steps if s.precision in profile.precisions and (self.mixed_ok or not s.mixed)]

    def skip(self, step: Step, slower: frozenset[Precision], profile: TargetProfile) -> str | None:
        """Why `auto` does not try `step` on `profile` (the precisions in `slower` were slower than fp32)."""
        return None

    def reads_calibration(self, precision: Precision) -> bool:
        """Does converting `precision` read the calibration data (part of its build-cache key)?"""
        return precision in self.calibrated

    # ---- sources packaged as they are ----

    def packages_as_is(self, source: Source) -> bool:
        """Is `source` already a model of this format, packaged unchanged (no ladder, no speed gate)?"""
        return False

    def plan(self, source: Source, profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
        """The steps for `source`; raises InputError for what cannot be built."""
        return self.ladder(profile, asked)

    def lint_source(self, source: Source, profile: TargetProfile) -> list[Finding]:
        """Before converting: what this backend's devices need of the source."""
        return []

    def needs_flex(self, art: Artifact) -> bool:
        """Does the converted model need ops no stock runtime has (TFLite's Flex delegate)? Such a
        model is packaged unvalidated under --allow-flex; formats without such ops say no."""
        return False

    # ---- this host and the device ----

    def host_spec(self, path: Path, profile: TargetProfile) -> ModelSpec:
        """The device's runtime settings, on this host: accelerators it lacks are left out."""
        return ModelSpec(path=str(path), format=self.format.value, threads=threads_for(profile.threads),
                         delegates=self.host_delegates(profile), providers=("CPUExecutionProvider",))

    def host_delegates(self, profile: TargetProfile) -> tuple[str, ...]:
        return profile.delegates

    def host_runtime(self, path: Path, profile: TargetProfile) -> Runtime:
        spec = self.host_spec(path, profile)
        return load_runtime(path, LoadSpec(format=spec.format, threads=spec.threads, delegates=spec.delegates,
                                           providers=spec.providers))

    def not_timed(self, profile: TargetProfile) -> str:
        """Why this host cannot time a model the device runs on an accelerator."""
        return (f"{profile.name} runs this model on {profile.accelerators[0]}; the host's CPU cannot say how fast "
                "it will be (measure on the device: edgepack-agent bench)")

    def variant(self, ctx: ConvertContext) -> str:
        """The profile settings (besides format and precision) that change the converted file."""
        return ""

    def finish(self, art: Artifact, profile: TargetProfile, work: Path, *, name: str, version: str) -> Finished:
        return Finished(path=art.path, name=art.path.name)

    def gate_hint(self, profile: TargetProfile, precision: Precision, *, lossy: Callable[[], list[str]]) -> str:
        """What to try after the accuracy gate failed; `lossy()` names the nodes that lose the most
        (a sensitivity analysis: a conversion and an inference each, so called only when used)."""
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


_BACKENDS: dict[tuple[Format, str | None], Backend] = {}
_BRIDGES: dict[tuple[str, Format], Bridge] = {}
# Pairs that cannot be built, with what to do instead.
_UNSUPPORTED: dict[tuple[str, Format], str] = {
    ("tflite", Format.ONNX): "a .tflite model can only be packaged for TFLite targets (arm-cpu, rpi5, coral); "
                             "build from the original model for ONNX targets",
}


def register(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[(cls.format, cls.delegate)] = cls()
    return cls


def register_bridge(cls: type[Bridge]) -> type[Bridge]:
    _BRIDGES[(cls.kind, cls.format)] = cls()
    return cls


def bridge(kind: str, fmt: Format) -> Bridge | None:
    """The bridge that brings `kind` sources to `fmt`, or None when the backend reads them itself."""
    return _BRIDGES.get((kind, fmt))


def backends() -> tuple[Backend, ...]:
    """Every registered backend."""
    return tuple(_BACKENDS.values())


def backend(fmt: Format) -> Backend:
    """The format's own backend (what it can do at all, what it converts from)."""
    return _BACKENDS[(fmt, None)]


def backend_for(profile: TargetProfile) -> Backend:
    """The backend that builds for `profile`: its accelerator's when one is registered, else its format's."""
    return next((_BACKENDS[(profile.format, d)] for d in profile.delegates if (profile.format, d) in _BACKENDS),
                backend(profile.format))


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
