"""What a build hands on: each candidate tried (Trial, with its Verdict), the one a target keeps
(Chosen, handed to packaging) or why none (Failed), what packaging reports of it (TargetReport,
complete before the bundle is written), and each target's outcome (TargetResult) in the build's
report (BuildResult). JSON only at the edge: `to_dict`, in the edgepack.build-report/2 format."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from pathlib import Path

from edgebundle.errors import EdgepackError
from edgebundle.manifest import TensorSpec
from packager.candidates import Candidate, Step
from packager.evaluate import Gate
from packager.figures import Accuracy, DeviceTiming, Timing
from packager.formats.sensitivity import Blame
from packager.lint import Finding
from packager.registry import Artifact, Finished
from targets import Format, Precision, TargetProfile

SCHEMA = "edgepack.build-report/2"
COMPILE_REPORT = "edgetpu"  # the report's key for the device's compile step (the Edge TPU's, the one there is)


class Verdict(str, Enum):
    """What became of one candidate, as the report's candidate table shows it."""

    CHOSEN = "chosen"  # the one the target keeps
    PASSED = "passed"  # passed both gates, not kept
    ACCURACY = "accuracy"  # failed the accuracy gate
    SLOWER = "slower"  # slower than fp32 (the speed gate)
    NO_GAIN = "no gain"  # no smaller than fp32 and not faster
    ERROR = "error"  # did not convert, or the runtime cannot load it
    SKIPPED = "skipped"  # not tried, and why
    NOT_TRIED = "not tried"

    @property
    def passed(self) -> bool:
        return self in (Verdict.PASSED, Verdict.CHOSEN)


@dataclass(frozen=True)
class Trial:
    """One candidate tried for one target, as the report's candidate table shows it."""

    step: Step
    candidate: Candidate | None = None
    verdict: Verdict = Verdict.NOT_TRIED
    why: str = ""
    size_bytes: int | None = None
    accuracy: Accuracy | None = None
    latency: Timing | None = None  # against fp32 on this host
    device_latency: DeviceTiming | None = None  # the same on the device (--profile-on): decides the speed gate
    sensitivity: tuple[dict, ...] = ()  # the nodes that lose the most, when computed
    seconds: float = 0.0
    cached: bool = False  # the converted model came from the build cache
    # Not reported: what the build needs to package or analyse this candidate.
    artifact: Artifact | None = None
    outputs: tuple = ()  # its outputs on the validation set
    specs: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] = ((), ())  # (inputs, outputs)
    findings: tuple[Finding, ...] = ()  # lint findings on the converted model
    blamed: tuple[Blame, ...] = ()  # worst first

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", Verdict(self.verdict))  # its JSON string reads as the verdict too

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def label(self) -> str:
        return self.candidate.label if self.candidate else self.step.label

    def to_dict(self) -> dict:
        acc = self.accuracy or Accuracy()
        return {"candidate": self.label, "precision": self.step.precision.value,
                "float_nodes": list(self.candidate.keep_float) if self.candidate else [],
                "verdict": self.verdict.value, "why": self.why, "size_bytes": self.size_bytes,
                "accuracy_drop_points": acc.accuracy_drop_points, "drop_metric": acc.drop_metric,
                "top1_agreement": acc.top1_agreement, "cosine_similarity": acc.cosine_similarity,
                "latency": self.latency.to_dict() if self.latency else None,
                "device_latency": self.device_latency.to_dict() if self.device_latency else None,
                "seconds": round(self.seconds, 2), "cached": self.cached}


def sensitivity_of(trials: tuple[Trial, ...] | list[Trial]) -> list:
    """The report's sensitivity table: the last analysis the target ran."""
    return list(next((t.sensitivity for t in reversed(trials) if t.sensitivity), ()))


@dataclass(frozen=True)
class Chosen:
    """The candidate a target keeps, finished for its device: everything packaging needs."""

    profile: TargetProfile
    trial: Trial
    trials: tuple[Trial, ...]
    finished: Finished
    latency: Timing  # measured against fp32, its own (fp32 chosen), or why not timed
    fp32: Path  # the format's float model, which sizes are compared with
    calibrated: bool  # did its precision need calibration data?
    work: Path  # the target's work folder


@dataclass(frozen=True)
class Failed:
    """A target's search that kept no candidate: why, and every candidate it tried."""

    error: EdgepackError
    trials: tuple[Trial, ...]


@dataclass(frozen=True)
class TargetReport:
    """A built target's part of the build report, complete before its bundle is written: the
    manifest carries it as `to_dict()` gives it, the build report with the written bundle's size."""

    format: Format
    precision: Precision
    candidate: str
    choice: str  # why this candidate
    model_bytes: int  # every model file the bundle carries: the main model and each length bucket's
    fp32_bytes: int
    latency: Timing
    device_latency: DeviceTiming | None
    accuracy: Accuracy | None
    gate: Gate
    trials: tuple[Trial, ...]
    lint: tuple[Finding, ...]
    warnings: tuple[str, ...]
    quantization: dict  # what the converter did, as the backend says it
    compile_report: dict | None  # the device's compile step, as its backend reports it
    fp32_sha256: str
    sequence: dict | None  # text models: length buckets and TensorRT profile (packager/package.py)
    signed: bool
    bucket_bytes: int = 0  # of model_bytes, the length buckets' models

    def to_dict(self, *, bundle_bytes: int | None = None) -> dict:
        """The JSON; with the written bundle's size, as the build report has it (size and signature)."""
        size = {"model": self.model_bytes, "fp32_model": self.fp32_bytes}
        if self.bucket_bytes:
            size["buckets"] = self.bucket_bytes
        if bundle_bytes is not None:
            size["bundle"] = bundle_bytes
        d = {"format": self.format.value, "precision": self.precision.value, "candidate": self.candidate,
             "choice": self.choice, "size_bytes": size, "size_ratio": round(self.model_bytes / self.fp32_bytes, 4),
             "latency_ms": self.latency.to_dict(),
             "device_latency": self.device_latency.to_dict() if self.device_latency else None,
             "accuracy": self.accuracy.to_dict() if self.accuracy else None, "gate": self.gate.to_dict(),
             "candidates": [t.to_dict() for t in self.trials], "lint": [f.to_dict() for f in self.lint],
             "warnings": list(self.warnings), "quantization": self.quantization, COMPILE_REPORT: self.compile_report,
             "sensitivity": sensitivity_of(self.trials), "fp32_sha256": self.fp32_sha256}
        if self.sequence is not None:
            d["sequence"] = self.sequence
        if bundle_bytes is not None:
            d["signed"] = self.signed
        return d


@dataclass(frozen=True)
class TargetResult:
    """One target's outcome: its bundle and report, or what failed and the candidates it tried."""

    target: str
    ok: bool
    format: Format
    bundle: Path | None = None
    built: TargetReport | None = None
    bundle_bytes: int | None = None
    trials: tuple[Trial, ...] = ()  # a failed target's candidates
    error: str | None = None
    error_kind: str | None = None
    exc: EdgepackError | None = None  # for callers that map errors (the CLI's exit codes)

    @property
    def tried(self) -> tuple[Trial, ...]:
        """Every candidate the target tried, built or failed."""
        return self.built.trials if self.built is not None else self.trials

    @cached_property
    def report(self) -> dict:
        """This target's part of the build report, as JSON."""
        if self.built is not None:
            return self.built.to_dict(bundle_bytes=self.bundle_bytes)
        return {"format": self.format.value, "candidates": [t.to_dict() for t in self.trials],
                "sensitivity": sensitivity_of(self.trials)}

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "bundle": str(self.bundle) if self.bundle else None,
                "error": self.error, "error_kind": self.error_kind, **self.report}


@dataclass
class BuildResult:
    model: str
    source_format: str
    results: list[TargetResult]
    seconds: float
    shared: dict
    name: str = ""
    version: str = ""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "source_format": self.source_format,
                "ok": self.ok, "seconds": round(self.seconds, 2), "shared": self.shared,
                "targets": [r.to_dict() for r in self.results]}
