"""What a build hands on: each candidate tried (Trial), the one a target keeps (Chosen, handed to
packaging), and each target's outcome (TargetResult) in the build's report (BuildResult)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.errors import EdgepackError
from edgebundle.manifest import TensorSpec
from packager.candidates import Candidate, Step
from packager.formats.sensitivity import Blame
from packager.lint import Finding
from packager.registry import Artifact, Finished
from targets import TargetProfile


@dataclass
class Trial:
    """One candidate tried for one target, as the report's candidate table shows it."""

    step: Step
    candidate: Candidate | None = None
    verdict: str = "not tried"  # chosen | passed | accuracy | slower | no gain | error | skipped | not tried
    why: str = ""
    size_bytes: int | None = None
    accuracy: dict | None = None
    latency: dict | None = None  # edgeruntime.timing comparison vs fp32
    device_latency: dict | None = None  # the same on the device (--profile-on): decides the speed gate
    sensitivity: list = field(default_factory=list)  # the nodes that lose the most, when computed
    seconds: float = 0.0
    cached: bool = False  # the converted model came from the build cache
    # Not reported: what the build needs to package or analyse this candidate.
    artifact: Artifact | None = None
    outputs: list = field(default_factory=list)  # its outputs on the validation set
    specs: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] = ((), ())  # (inputs, outputs)
    findings: list[Finding] = field(default_factory=list)  # lint findings on the converted model
    blamed: list[Blame] = field(default_factory=list)  # worst first

    @property
    def passed(self) -> bool:
        return self.verdict in ("passed", "chosen")

    def to_dict(self) -> dict:
        acc = self.accuracy or {}
        return {"candidate": self.candidate.label if self.candidate else self.step.label,
                "precision": self.step.precision.value, "float_nodes": list(self.candidate.keep_float)
                if self.candidate else [], "verdict": self.verdict, "why": self.why, "size_bytes": self.size_bytes,
                "accuracy_drop_points": acc.get("accuracy_drop_points"), "drop_metric": acc.get("drop_metric"),
                "top1_agreement": acc.get("top1_agreement"), "cosine_similarity": acc.get("cosine_similarity"),
                "latency": self.latency, "device_latency": self.device_latency, "seconds": round(self.seconds, 2),
                "cached": self.cached}


def sensitivity_of(trials: list[Trial]) -> list:
    """The report's sensitivity table: the last analysis the target ran."""
    return next((t.sensitivity for t in reversed(trials) if t.sensitivity), [])


@dataclass(frozen=True)
class Chosen:
    """The candidate a target keeps, finished for its device: everything packaging needs."""

    profile: TargetProfile
    trial: Trial
    trials: tuple[Trial, ...]
    finished: Finished
    latency: dict  # measured against fp32, its own (fp32 chosen), or {"not_timed": why}
    fp32: Path  # the format's float model, which sizes are compared with
    calibrated: bool  # did its precision need calibration data?
    work: Path  # the target's work folder


@dataclass
class TargetResult:
    target: str
    ok: bool
    bundle: Path | None = None
    report: dict = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    exc: EdgepackError | None = None  # for callers that map errors (the CLI's exit codes)

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
        return {"schema": "edgepack.build-report/2", "model": self.model, "source_format": self.source_format,
                "ok": self.ok, "seconds": round(self.seconds, 2), "shared": self.shared,
                "targets": [r.to_dict() for r in self.results]}
