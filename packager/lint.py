"""Findings: what a target cannot run or should watch. Format-independent checks live here;
each format backend lints the source for its devices and its converted models (packager/formats/)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from targets import TargetProfile


class Level(str, Enum):
    ERROR = "error"  # the target fails
    WARNING = "warning"  # the bundle is built; the report says what to watch
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level"] = self.level.value
        return d


def lint_source(source, profile: TargetProfile) -> list[Finding]:
    """Before converting: shapes a static-shape target freezes, and its batch size.

    An axis is a batch axis only when the model marks it dynamic at position 0 (a state
    input such as (2, ?, 128) has none), so only such inputs are held to the profile's batch."""
    out = []
    for s in source.inputs:
        if s.dynamic and profile.static_shapes:
            out.append(Finding(Level.INFO, "static-shape",
                               f"input {s.name!r} {s.signature} fixed to {s.shape} for {profile.name}"))
        batch_axis = bool(s.signature) and s.signature[0] is None
        if profile.static_shapes and profile.batch and batch_axis and s.shape[0] != profile.batch:
            out.append(Finding(Level.ERROR, "batch-size",
                               f"{profile.name} runs batch {profile.batch}; input {s.name!r} would be frozen at "
                               f"batch {s.shape[0]} (shape {s.shape})"))
    return out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level is Level.ERROR]
