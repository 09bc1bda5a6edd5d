"""Rollout gates: judge one wave's devices from their update outcomes and telemetry.

Pure functions over plain data (no MQTT), so the rules are unit-tested directly. A device gets
one verdict: `ok`, `failed` (update failed, rolled back or timed out), `breach` (a model KPI out
of bounds: p95 against its own pre-update p95, error rate, NaN/Inf outputs, a custom telemetry
field) or `too_little_traffic` (fewer than `min_requests` inferences on the new model during the
soak: reported, not held against the wave). The wave fails when failed + breach devices exceed
`max_failed` (a count, or a fraction of the wave)."""
from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from enum import Enum

from edgebundle.errors import InputError


class Verdict(str, Enum):
    OK = "ok"
    FAILED = "failed"
    BREACH = "breach"
    TOO_LITTLE_TRAFFIC = "too_little_traffic"
    PENDING = "pending"


@dataclass(frozen=True)
class FieldGate:
    """A custom telemetry field (dotted path into the telemetry message) and its bound, e.g.
    `inference.latency_ms.p99<=40` or `system.memory_mb<=300`; judged on the soak windows' median."""

    path: str
    op: str  # "<=" or ">="
    limit: float

    @classmethod
    def parse(cls, text: str) -> "FieldGate":
        m = re.fullmatch(r"\s*([A-Za-z0-9_.]+)\s*(<=|>=)\s*(-?[0-9.eE+]+)\s*", text or "")
        if not m:
            raise InputError(f"--gate-field {text!r} is not PATH<=NUMBER or PATH>=NUMBER",
                             hint="e.g. --gate-field inference.latency_ms.p99<=40")
        try:
            limit = float(m.group(3))
        except ValueError:
            raise InputError(f"--gate-field {text!r}: {m.group(3)!r} is not a number") from None
        return cls(path=m.group(1), op=m.group(2), limit=limit)

    def ok(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def __str__(self) -> str:
        return f"{self.path}{self.op}{self.limit:g}"


@dataclass(frozen=True)
class Gates:
    max_failed: str = "0"  # devices per wave that may fail or breach: "2" or "10%"
    max_latency_ratio: float = 1.25
    max_error_rate: float = 0.02
    max_nonfinite: int = 0
    min_requests: int = 20
    fields: tuple[FieldGate, ...] = ()

    def allowed_failures(self, wave_size: int) -> int:
        text = str(self.max_failed).strip()
        try:
            if text.endswith("%"):
                pct = float(text[:-1])
                if not 0 <= pct <= 100:
                    raise ValueError
                return int(math.floor(wave_size * pct / 100))
            n = int(text)
            if n < 0:
                raise ValueError
            return n
        except ValueError:
            raise InputError(f"--max-failed {text!r} is not a count or a percentage (e.g. 0, 2, 10%)") from None

    def to_dict(self) -> dict:
        return {"max_failed": self.max_failed, "max_latency_ratio": self.max_latency_ratio,
                "max_error_rate": self.max_error_rate, "max_nonfinite": self.max_nonfinite,
                "min_requests": self.min_requests, "fields": [str(f) for f in self.fields]}

    @classmethod
    def from_dict(cls, d: dict) -> "Gates":
        return cls(max_failed=str(d.get("max_failed", "0")), max_latency_ratio=float(d.get("max_latency_ratio", 1.25)),
                   max_error_rate=float(d.get("max_error_rate", 0.02)), max_nonfinite=int(d.get("max_nonfinite", 0)),
                   min_requests=int(d.get("min_requests", 20)),
                   fields=tuple(FieldGate.parse(f) for f in d.get("fields") or ()))


@dataclass
class Window:
    """What the controller keeps of one telemetry message."""

    count: int
    errors: int
    nonfinite: int
    p95_ms: float | None
    fields: dict = field(default_factory=dict)  # custom gate path -> value
    rejected: int = 0  # requests refused for bad input: counted as failed in a wave, since an update that
    # changed the interface makes every client's request bad


def baseline_p95(windows: list[Window]) -> float | None:
    """A device's own p95 before the update: the median of its recent windows' p95 (windows with traffic)."""
    vals = [w.p95_ms for w in windows if w.count > 0 and w.p95_ms is not None]
    return statistics.median(vals) if vals else None


def judge_device(*, outcome: str | None, baseline: float | None, windows: list[Window], gates: Gates) -> dict:
    """One device's reading and verdict. `outcome` is the update's final state (None: not final)."""
    reading: dict = {"update": outcome, "baseline_p95_ms": baseline}
    if outcome != "committed":
        reading["verdict"] = (Verdict.PENDING if outcome is None else Verdict.FAILED).value
        reading["reasons"] = [] if outcome is None else [f"update {outcome}"]
        return reading
    count = sum(w.count for w in windows)
    errors = sum(w.errors for w in windows)
    rejected = sum(w.rejected for w in windows)
    nonfinite = sum(w.nonfinite for w in windows)
    p95s = [w.p95_ms for w in windows if w.count > 0 and w.p95_ms is not None]
    p95 = statistics.median(p95s) if p95s else None
    reading.update(requests=count, errors=errors, rejected=rejected, nonfinite=nonfinite, p95_ms=p95)
    reasons = []
    if nonfinite > gates.max_nonfinite:
        reasons.append(f"{nonfinite} inference(s) with NaN/Inf outputs (at most {gates.max_nonfinite})")
    failed = errors + rejected
    if count + failed > 0 and failed / (count + failed) > gates.max_error_rate:
        parts = [f"{n} {what}" for n, what in ((errors, "model error(s)"), (rejected, "refused as bad input"))
                 if n]
        reasons.append(f"error rate {failed}/{count + failed} over {gates.max_error_rate:.1%} ({', '.join(parts)})")
    if count < gates.min_requests:
        reading["verdict"] = (Verdict.BREACH if reasons else Verdict.TOO_LITTLE_TRAFFIC).value
        reading["reasons"] = reasons or [f"{count} request(s) during the soak, fewer than {gates.min_requests} "
                                         "needed to judge latency"]
        return reading
    if p95 is not None and baseline:
        ratio = p95 / baseline
        reading["latency_ratio"] = round(ratio, 3)
        if ratio > gates.max_latency_ratio:
            reasons.append(f"p95 {p95:.2f} ms is {ratio:.2f}x its own {baseline:.2f} ms before the update "
                           f"(at most {gates.max_latency_ratio:g}x)")
    elif baseline is None:
        reading["notes"] = ["no pre-update p95 (no traffic before the update): latency ratio not judged"]
    for g in gates.fields:
        vals = [w.fields[g.path] for w in windows if w.fields.get(g.path) is not None]
        if vals:
            v = statistics.median(vals)
            reading.setdefault("fields", {})[g.path] = v
            if not g.ok(v):
                reasons.append(f"{g.path} = {v:g}, not {g.op} {g.limit:g}")
    reading["verdict"] = (Verdict.BREACH if reasons else Verdict.OK).value
    reading["reasons"] = reasons
    return reading


def judge_wave(readings: dict[str, dict], gates: Gates) -> tuple[bool, str]:
    """(passed, summary) for a wave whose devices all have a verdict."""
    bad = {d: r for d, r in readings.items() if r["verdict"] in (Verdict.FAILED.value, Verdict.BREACH.value)}
    thin = [d for d, r in readings.items() if r["verdict"] == Verdict.TOO_LITTLE_TRAFFIC.value]
    allowed = gates.allowed_failures(len(readings))
    note = f"; {len(thin)} device(s) sent too little traffic to judge ({', '.join(sorted(thin)[:5])})" if thin else ""
    if len(bad) > allowed:
        first = sorted(bad)[:5]
        why = "; ".join(f"{d}: {', '.join(bad[d]['reasons']) or bad[d]['verdict']}" for d in first)
        return False, f"{len(bad)} of {len(readings)} device(s) failed the gates (at most {allowed}): {why}{note}"
    return True, f"{len(readings) - len(bad) - len(thin)} ok, {len(bad)} failed (at most {allowed}){note}"


def plan_waves(devices: list[str], spec: str) -> list[list[str]]:
    """Split `devices` into waves: each item of `spec` ("1,10%,50%,100%") is a cumulative count
    or fraction of the fleet; empty waves are dropped and the last one always reaches everyone."""
    n = len(devices)
    cums = []
    for item in (spec or "").split(","):
        item = item.strip()
        try:
            if item.endswith("%"):
                pct = float(item[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                c = math.ceil(n * pct / 100)
            else:
                c = int(item)
                if c < 1:
                    raise ValueError
        except ValueError:
            raise InputError(f"--waves item {item!r} is not a device count or a percentage",
                             hint="e.g. --waves 1,10%,50%,100%") from None
        cums.append(min(c, n))
    if not cums:
        raise InputError("--waves is empty", hint="e.g. --waves 1,10%,50%,100%")
    cums.append(n)
    waves, done = [], 0
    for c in cums:
        if c > done:
            waves.append(devices[done:c])
            done = c
    return waves
