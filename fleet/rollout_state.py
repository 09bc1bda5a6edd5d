"""The rollout record, retained on `{root}/rollouts/{id}`: which wave, which devices, gate readings.

Any machine can read it (`rollout status`) and a new controller continues from it (`rollout
resume`). The controller lease (`.../lease`) and pause/abort requests (`.../control`) sit beside it."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from enum import Enum

from edgebundle.errors import InputError
from edgeproto.desired import Probation, Shadow
from fleet.gates import Gates

SCHEMA = "edgepack.rollout/1"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")  # update ids add "-w12-back" (at most 64 in all)


class RolloutStatus(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"  # a gate failed: the wave went back, the rest was never touched
    ABORTED = "aborted"
    DONE = "done"

    @classmethod
    def read(cls, value) -> "RolloutStatus | None":
        """A status as a retained record holds it; None for anything else (a damaged record, or
        one from a newer controller)."""
        try:
            return cls(value)
        except (ValueError, TypeError):
            return None


class WaveState(str, Enum):
    PENDING = "pending"
    UPDATING = "updating"
    SOAKING = "soaking"
    PASSED = "passed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


ACTIVE = (RolloutStatus.RUNNING, RolloutStatus.PAUSED)


def check_id(rollout_id: str) -> str:
    if not _ID.match(rollout_id or ""):
        raise InputError(f"rollout id {rollout_id!r} must be 1-48 letters, digits, '.', '_' or '-'")
    return rollout_id


@dataclass(frozen=True)
class RolloutSettings:
    waves: str = "1,10%,50%,100%"
    soak_s: float = 300.0
    wave_timeout_s: float = 900.0
    baseline_s: float = 60.0  # telemetry heard before a wave starts (each device's own pre-update p95)
    lease_s: float = 30.0
    gates: Gates = field(default_factory=Gates)
    probation: Probation = field(default_factory=Probation)
    allow_interface_change: bool = False
    shadow: Shadow | None = None  # each device's update runs a shadow phase first (a wave's failures count it)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gates"] = self.gates.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutSettings":
        return cls(waves=d["waves"], soak_s=float(d["soak_s"]), wave_timeout_s=float(d["wave_timeout_s"]),
                   baseline_s=float(d["baseline_s"]), lease_s=float(d["lease_s"]),
                   gates=Gates.from_dict(d["gates"]), probation=Probation(**d["probation"]),
                   allow_interface_change=bool(d.get("allow_interface_change")),
                   shadow=Shadow(**d["shadow"]) if d.get("shadow") else None)


@dataclass
class Wave:
    devices: list[str]
    state: WaveState = WaveState.PENDING
    update_id: str | None = None
    started: float | None = None  # wall time
    outcomes: dict = field(default_factory=dict)  # device -> final update state (or timed_out)
    readings: dict = field(default_factory=dict)  # device -> gate reading
    summary: str | None = None
    times: dict = field(default_factory=dict)  # phase -> seconds (update, soak, rollback)


def _wave(d: dict) -> Wave:
    w = Wave(**d)
    w.state = WaveState(w.state)
    return w


@dataclass
class RolloutRecord:
    id: str
    group: str
    bundle: dict  # name, version, sha256, size, interface, transfer, bundle_signature
    previous: dict | None  # the same for the version a failed wave goes back to
    settings: dict
    waves: list[Wave]
    status: RolloutStatus = RolloutStatus.RUNNING
    current: int = 0
    baseline: dict = field(default_factory=dict)  # device -> pre-update p95 ms
    reason: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    controller: str | None = None
    schema: str = SCHEMA
    model: str | None = None  # the model on the devices it updates; None: their own (old-style) topics

    def to_dict(self) -> dict:
        """The record as retained (JSON): statuses and states as their strings."""
        d = asdict(self)
        d["status"] = self.status.value
        for w, wave in zip(d["waves"], self.waves):
            w["state"] = wave.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutRecord":
        """A retained record read back, statuses and states as enums (ValueError for one this
        version does not know)."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise InputError(f"not a rollout record (schema {d.get('schema') if isinstance(d, dict) else None!r})")
        d = dict(d)
        d["waves"] = [_wave(w) for w in d["waves"]]
        rec = cls(**d)
        rec.status = RolloutStatus(rec.status)
        return rec

    @property
    def parsed_settings(self) -> RolloutSettings:
        """`settings` (the record's JSON dict) read back as RolloutSettings."""
        return RolloutSettings.from_dict(self.settings)

    def summary_lines(self) -> list[str]:
        b = self.bundle
        of = f" (model {self.model})" if self.model and self.model != b["name"] else ""
        lines = [f"rollout {self.id}: {b['name']} {b['version']}{of} to group {self.group}: {self.status.value}"
                 + (f" ({self.reason})" if self.reason else "")]
        for i, w in enumerate(self.waves):
            mark = ">" if i == self.current and self.status in ACTIVE else " "
            counts: dict[str, int] = {}
            for r in w.readings.values():
                counts[r.get("verdict", "?")] = counts.get(r.get("verdict", "?"), 0) + 1
            done = sum(1 for o in w.outcomes.values() if o == "committed")
            lines.append(f"{mark} wave {i + 1}: {len(w.devices)} device(s), {w.state.value}; committed {done}"
                         + (f"; gates {dict(sorted(counts.items()))}" if counts else "")
                         + (f"; {w.summary}" if w.summary else ""))
        return lines
