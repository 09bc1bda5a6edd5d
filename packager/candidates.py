"""Candidates for one target and the ladder `--quantize auto` walks.

A ladder is the format's precisions in order of expected speed, cut to what the profile
allows, starting at the profile's default. A *mixed* step keeps the nodes that lose the
most accuracy in float; it is only tried right after its plain step failed the accuracy
gate (if the plain one was too slow, keeping nodes in float will not make it faster)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from targets import Precision, TargetProfile

CALIBRATED = (Precision.INT8, Precision.INT16X8)
QUANTIZED = (Precision.DYNAMIC, Precision.INT8, Precision.INT16X8)


class Search(str, Enum):
    FIRST = "first"  # the first candidate that passes both gates
    THOROUGH = "thorough"  # try every candidate, keep the fastest that passes


@dataclass(frozen=True)
class Step:
    precision: Precision
    mixed: bool = False  # keep the most sensitive nodes in float

    @property
    def label(self) -> str:
        return f"{self.precision.value}-mixed" if self.mixed else self.precision.value


@dataclass(frozen=True)
class Candidate:
    precision: Precision
    keep_float: tuple[str, ...] = ()  # node names left in float (fp32)

    @property
    def label(self) -> str:
        return f"{self.precision.value}+{len(self.keep_float)}f" if self.keep_float else self.precision.value


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
    # Not reported: what the build needs to package or analyse this candidate.
    artifact: object = None  # registry.Artifact
    outputs: list = field(default_factory=list)  # its outputs on the validation set
    specs: tuple = ((), ())  # (inputs, outputs) as manifest TensorSpecs
    findings: list = field(default_factory=list)  # lint findings on the converted model
    blamed: list = field(default_factory=list)  # sensitivity.Blame, worst first

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
                "latency": self.latency, "device_latency": self.device_latency, "seconds": round(self.seconds, 2)}


# Order of expected speed on CPUs and accelerators alike; each format keeps what it can do.
LADDERS = {
    "tflite": (Step(Precision.INT8), Step(Precision.INT8, mixed=True), Step(Precision.INT16X8),
               Step(Precision.FP16), Step(Precision.FP32)),
    "onnx": (Step(Precision.INT8), Step(Precision.INT8, mixed=True), Step(Precision.FP16),
             Step(Precision.FP16, mixed=True), Step(Precision.FP32)),
}


def ladder(profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
    """The steps to try: one for an explicit precision, else the profile's slice of the ladder."""
    if asked is not Precision.AUTO:
        return (Step(asked),)
    steps = _allowed(profile)
    start = next(i for i, s in enumerate(steps) if s.precision is profile.default_precision)
    return tuple(steps[start:])


def _allowed(profile: TargetProfile) -> list[Step]:
    # On the Edge TPU a node kept in float runs on the CPU, and so does everything after it.
    mixed_ok = "edgetpu" not in profile.delegates
    return [s for s in LADDERS[profile.format.value] if s.precision in profile.precisions and (mixed_ok or not s.mixed)]


def fallbacks(profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
    """After an explicit precision fails the gate: what the build tries to name one that passes."""
    steps = _allowed(profile)
    after = [i for i, s in enumerate(steps) if s.precision is asked and not s.mixed]
    return tuple(steps[after[0] + 1:]) if after else ()
