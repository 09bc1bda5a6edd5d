"""What a candidate measured, as values: its latency against fp32 on this host (Timing) and on the
device (DeviceTiming), and its outputs against the float reference (Accuracy).

The build hands these between its steps; they become JSON only at the report's edge (`to_dict`), in
exactly the keys and order of the edgepack.build-report/2 format, and the pages that render a report
read them back with `from_dict` (which takes what older bundles' reports hold: a missing key reads
as None)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Mapping

from edgeruntime.timing import Speed

__all__ = ["Accuracy", "Crowd", "DeviceRatio", "DeviceTiming", "DropMetric", "OutputAccuracy", "Speed", "Spread",
           "Timing"]


class DropMetric(str, Enum):
    """What an accuracy drop is measured in: accuracy against the labels, or top-1 agreement with fp32."""

    ACCURACY = "accuracy"
    TOP1 = "top1_agreement"

    @property
    def text(self) -> str:
        return "accuracy" if self is DropMetric.ACCURACY else "top-1 agreement"


def _speed(v) -> Speed | None:
    try:
        return None if v is None else Speed(v)
    except ValueError:  # a verdict this edgepack does not know: no verdict
        return None


@dataclass(frozen=True)
class Spread:
    """The candidate's latency over fp32's, over interleaved rounds (edgeruntime.timing.Ratio, as timed)."""

    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    verdict: Speed | None = None
    resolved: bool | None = None  # False: the rounds disagree too much for the median to mean anything
    q1_low: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "Spread":
        return cls(median=d.get("median"), q1=d.get("q1"), q3=d.get("q3"), verdict=_speed(d.get("verdict")),
                   resolved=d.get("resolved"), q1_low=d.get("q1_low"))

    def to_dict(self) -> dict:
        return {"median": self.median, "q1": self.q1, "q3": self.q3,
                "verdict": None if self.verdict is None else self.verdict.value, "resolved": self.resolved,
                "q1_low": self.q1_low}


@dataclass(frozen=True)
class Crowd:
    """What else ran on the host while it timed (cores the other processes used)."""

    others_before: float | None = None
    others: float | None = None
    threads: int | None = None
    crowded: bool = False

    @classmethod
    def from_dict(cls, d: Mapping) -> "Crowd":
        return cls(others_before=d.get("others_cores_before"), others=d.get("others_cores"), threads=d.get("threads"),
                   crowded=bool(d.get("crowded")))

    def to_dict(self) -> dict:
        return {"others_cores_before": self.others_before, "others_cores": self.others, "threads": self.threads,
                "crowded": self.crowded}


@dataclass(frozen=True)
class Timing:
    """A candidate's host latency against fp32 (`ratio`), fp32's own (`baseline`), or why it was not
    timed (`not_timed`). a_ms is fp32's per-call milliseconds, b_ms the candidate's."""

    a_ms: float | None = None
    b_ms: float | None = None
    ratio: Spread | None = None
    rounds: int | None = None
    calls_per_block: int | None = None
    seconds: float | None = None
    stable: bool | None = None
    host_load: Crowd | None = None
    baseline: bool = False
    threads: tuple = ()  # each model's, as timed
    host_cores: int | None = None
    runtime: tuple[Mapping, ...] = ()  # each model's runtime details, as its adapter gives them
    question: str | None = None
    rss_bytes: tuple = ()  # each model's memory growth when loaded (None: not known)
    source: str | None = None  # fp32 timed beside a candidate: which comparison gave its figure
    profile_threads: int | None = None  # the target profile's threads (0: the runtime's default)
    not_timed: str | None = None  # why there are no figures

    @classmethod
    def untimed(cls, why: str) -> "Timing":
        return cls(not_timed=why)

    @property
    def median(self) -> float | None:
        """The candidate's latency over fp32's (None: not compared)."""
        return None if self.ratio is None else self.ratio.median

    @property
    def memory(self) -> int | None:
        """The last model's RSS growth in the timing worker, when known."""
        last = self.rss_bytes[-1] if self.rss_bytes else None
        return last if isinstance(last, int) and last > 0 else None

    def own(self, *, label: str) -> "Timing":
        """fp32's own latency, from its side of this comparison (same worker, same rounds)."""
        return Timing(a_ms=self.a_ms, b_ms=self.a_ms, baseline=True, threads=self.threads[:1],
                      host_cores=self.host_cores, runtime=self.runtime[:1], rss_bytes=(self.rss_bytes or (None,))[:1],
                      source=f"fp32's side of {self.rounds} interleaved rounds against {label}")

    def for_profile(self, threads: int) -> "Timing":
        return replace(self, profile_threads=threads)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Timing":
        ratio, load = d.get("ratio"), d.get("host_load")
        return cls(a_ms=d.get("a_ms"), b_ms=d.get("b_ms"), ratio=Spread.from_dict(ratio) if ratio else None,
                   rounds=d.get("rounds"), calls_per_block=d.get("calls_per_block"), seconds=d.get("seconds"),
                   stable=d.get("stable"), host_load=Crowd.from_dict(load) if load else None,
                   baseline=bool(d.get("baseline")), threads=tuple(d.get("threads") or ()),
                   host_cores=d.get("host_cores"), runtime=tuple(d.get("runtime") or ()), question=d.get("question"),
                   rss_bytes=tuple(d.get("rss_bytes") or ()), source=d.get("from"),
                   profile_threads=d.get("profile_threads"), not_timed=d.get("not_timed"))

    def to_dict(self) -> dict:
        if self.not_timed is not None:
            return {"not_timed": self.not_timed}
        d: dict = {"a_ms": self.a_ms, "b_ms": self.b_ms}
        if self.baseline:
            d.update(baseline=True, threads=list(self.threads), host_cores=self.host_cores,
                     runtime=list(self.runtime), rss_bytes=list(self.rss_bytes))
            if self.source is not None:
                d["from"] = self.source
        else:
            d.update(ratio=self.ratio.to_dict() if self.ratio else None, rounds=self.rounds,
                     calls_per_block=self.calls_per_block, seconds=self.seconds, stable=self.stable)
            if self.host_load is not None:
                d["host_load"] = self.host_load.to_dict()
            d.update(threads=list(self.threads), host_cores=self.host_cores, runtime=list(self.runtime),
                     question=self.question, rss_bytes=list(self.rss_bytes))
        if self.profile_threads is not None:
            d["profile_threads"] = self.profile_threads
        return d


@dataclass(frozen=True)
class DeviceRatio:
    """The candidate's device p50 over fp32's, and what the device's spread says of it."""

    median: float | None = None
    q1_vs_q3: float | None = None  # the candidate's p25 over fp32's p75
    verdict: Speed | None = None
    of: str = "p50"

    @classmethod
    def from_dict(cls, d: Mapping) -> "DeviceRatio":
        return cls(median=d.get("median"), q1_vs_q3=d.get("q1_vs_q3"), verdict=_speed(d.get("verdict")),
                   of=d.get("of", "p50"))

    def to_dict(self) -> dict:
        return {"median": self.median, "q1_vs_q3": self.q1_vs_q3,
                "verdict": None if self.verdict is None else self.verdict.value, "of": self.of}


@dataclass(frozen=True)
class DeviceTiming:
    """A candidate against fp32, each profiled on the user's device (--profile-on)."""

    device: str
    a_ms: float | None
    b_ms: float | None
    ratio: DeviceRatio
    fp32: Mapping = field(default_factory=dict)  # the profile job's figures, as the device reported them
    candidate: Mapping = field(default_factory=dict)

    @property
    def median(self) -> float | None:
        return self.ratio.median

    @classmethod
    def from_dict(cls, d: Mapping) -> "DeviceTiming":
        return cls(device=d.get("device", "?"), a_ms=d.get("a_ms"), b_ms=d.get("b_ms"),
                   ratio=DeviceRatio.from_dict(d.get("ratio") or {}), fp32=d.get("fp32") or {},
                   candidate=d.get("candidate") or {})

    def to_dict(self) -> dict:
        return {"device": self.device, "a_ms": self.a_ms, "b_ms": self.b_ms, "ratio": self.ratio.to_dict(),
                "fp32": dict(self.fp32), "candidate": dict(self.candidate)}


@dataclass(frozen=True)
class OutputAccuracy:
    """One output against the reference (packager/evaluate.py says what each figure means)."""

    kind: str  # class_scores | integers | embeddings | values
    nan_or_inf: int = 0
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    cosine_similarity: float | None = None
    relative_error: float | None = None
    top1_agreement: float | None = None  # class scores
    agreement: float | None = None  # integers: samples that match exactly
    neighbour_agreement: float | None = None  # embeddings: samples that keep their nearest neighbour

    @classmethod
    def from_dict(cls, d: Mapping) -> "OutputAccuracy":
        return cls(kind=d.get("kind", "values"), nan_or_inf=d.get("nan_or_inf") or 0,
                   max_abs_error=d.get("max_abs_error"), mean_abs_error=d.get("mean_abs_error"),
                   cosine_similarity=d.get("cosine_similarity"), relative_error=d.get("relative_error"),
                   top1_agreement=d.get("top1_agreement"), agreement=d.get("agreement"),
                   neighbour_agreement=d.get("neighbour_agreement"))

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "nan_or_inf": self.nan_or_inf, "max_abs_error": self.max_abs_error,
             "mean_abs_error": self.mean_abs_error}
        for key in ("top1_agreement", "agreement", "neighbour_agreement"):  # the one its kind has
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d.update(cosine_similarity=self.cosine_similarity, relative_error=self.relative_error)
        return d


@dataclass(frozen=True)
class Accuracy:
    """A model's outputs on the validation samples against the float reference's; the top-level
    figures are the primary (first) output's."""

    samples: int | None = None
    primary_output: str | None = None
    outputs: Mapping[str, OutputAccuracy] = field(default_factory=dict)
    top1_agreement: float | None = None
    cosine_similarity: float | None = None
    accuracy_reference: float | None = None  # with labels
    accuracy_bundle: float | None = None
    accuracy_drop_points: float | None = None  # accuracy (labels) or top-1 agreement lost, in points
    drop_metric: DropMetric | None = None

    @property
    def primary(self) -> OutputAccuracy | None:
        return self.outputs.get(self.primary_output)

    @property
    def loss(self) -> float:
        """How far from the reference, for comparing candidates of one precision: the drop in points,
        else 1 - the worst output's cosine."""
        if self.accuracy_drop_points is not None:
            return self.accuracy_drop_points
        cosines = [m.cosine_similarity for m in self.outputs.values() if m.cosine_similarity is not None]
        return 1 - min(cosines) if cosines else float("inf")

    @classmethod
    def from_dict(cls, d: Mapping) -> "Accuracy":
        """A report's accuracy section, or a candidate row (which holds the top-level figures only)."""
        return cls(samples=d.get("samples"), primary_output=d.get("primary_output"),
                   outputs={k: OutputAccuracy.from_dict(v) for k, v in (d.get("outputs") or {}).items()},
                   top1_agreement=d.get("top1_agreement"), cosine_similarity=d.get("cosine_similarity"),
                   accuracy_reference=d.get("accuracy_reference"), accuracy_bundle=d.get("accuracy_bundle"),
                   accuracy_drop_points=d.get("accuracy_drop_points"),
                   drop_metric=DropMetric(d["drop_metric"]) if d.get("drop_metric") else None)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "primary_output": self.primary_output,
                "outputs": {k: m.to_dict() for k, m in self.outputs.items()}, "top1_agreement": self.top1_agreement,
                "cosine_similarity": self.cosine_similarity, "accuracy_reference": self.accuracy_reference,
                "accuracy_bundle": self.accuracy_bundle, "accuracy_drop_points": self.accuracy_drop_points,
                "drop_metric": self.drop_metric.value if self.drop_metric else None}
