"""Typed views of what devices publish: status (retained), update events and telemetry windows.

Devices build these records; the fleet side reads them with `from_dict`, which is lenient on
purpose: a record from an older or newer agent, or a damaged one, gives None/defaults for what it
cannot read instead of raising, so one bad device never breaks a fleet-wide view."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum

FINAL_STATES = ("committed", "failed", "rolled_back", "removed")


class UpdateState(str, Enum):
    """The states an update event reports (the agent's update state machine)."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SHADOW = "shadow"  # the staged model runs beside the serving one on sampled live requests
    SWITCHING = "switching"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    REMOVED = "removed"  # a removal record unloaded the model and deleted its files


def _str(d: dict, key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def _num(d: dict, key: str) -> float | None:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(d: dict, key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _obj(d: dict, key: str) -> dict:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


@dataclass(frozen=True)
class ModelInfo:
    name: str | None = None
    version: str | None = None
    bundle_sha256: str | None = None
    provider: str | None = None
    interface: str | None = None  # hash of the model's input/output signature (interface safety)

    @classmethod
    def from_dict(cls, d) -> "ModelInfo | None":
        if not isinstance(d, dict):
            return None
        return cls(name=_str(d, "name"), version=_str(d, "version"), bundle_sha256=_str(d, "bundle_sha256"),
                   provider=_str(d, "provider"), interface=_str(d, "interface"))


@dataclass(frozen=True)
class UpdateSummary:
    state: str | None = None
    update_id: str | None = None
    version: str | None = None
    error: str | None = None
    issued: str | None = None

    @classmethod
    def from_dict(cls, d) -> "UpdateSummary | None":
        if not isinstance(d, dict):
            return None
        return cls(state=_str(d, "state"), update_id=_str(d, "update_id"), version=_str(d, "version"),
                   error=_str(d, "error"), issued=_str(d, "issued"))


@dataclass(frozen=True)
class ModelSlot:
    """One model of a device, as its status lists it under `models`."""

    model: ModelInfo | None = None
    update: UpdateSummary | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, d) -> "ModelSlot":
        d = d if isinstance(d, dict) else {}
        return cls(model=ModelInfo.from_dict(d.get("model")), update=UpdateSummary.from_dict(d.get("update")),
                   error=_str(d, "model_error"))


@dataclass(frozen=True)
class DeviceStatus:
    """The retained status record (`devices/{id}/status`). `models` is empty for agents that
    serve one model and predate the `models` section."""

    device_id: str
    online: bool | None = None
    groups: tuple[str, ...] = ()
    model: ModelInfo | None = None
    update: UpdateSummary | None = None
    signed_updates: bool | None = None
    key_serial: int | None = None
    ts: str | None = None
    reason: str | None = None
    models: dict = field(default_factory=dict)  # name -> ModelSlot

    def for_model(self, name: str | None) -> "DeviceStatus":
        """This status seen through one model: `model` and `update` become that model's. An agent
        without `models` serves one model, which answers for any name (old-style devices keep
        updating); a name the device does not have gives no model and no update."""
        if name is None or not self.models:
            return self
        slot = self.models.get(name, ModelSlot())
        return dataclasses.replace(self, model=slot.model, update=slot.update)

    @classmethod
    def from_dict(cls, device_id: str, d) -> "DeviceStatus":
        if not isinstance(d, dict):
            return cls(device_id=device_id)
        groups = d.get("groups")
        ota = _obj(d, "ota")
        online = d.get("online")
        return cls(device_id=device_id, online=online if isinstance(online, bool) else None,
                   groups=tuple(g for g in groups if isinstance(g, str)) if isinstance(groups, list) else (),
                   model=ModelInfo.from_dict(d.get("model")), update=UpdateSummary.from_dict(d.get("update")),
                   signed_updates=ota.get("signed_updates") if isinstance(ota.get("signed_updates"), bool) else None,
                   key_serial=_int(ota, "key_serial"), ts=_str(d, "ts"), reason=_str(d, "reason"),
                   models={k: ModelSlot.from_dict(v) for k, v in _obj(d, "models").items() if isinstance(k, str)})


@dataclass(frozen=True)
class UpdateEvent:
    """One update event (`devices/{id}/events`): a state change of one update_id."""

    update_id: str | None
    state: str | None
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    from_version: str | None = None
    progress: dict | None = None
    error: str | None = None
    note: str | None = None
    model: str | None = None  # the model on the device this update is for (None: an older agent)
    shadow: dict | None = None  # the shadow phase's figures (agreement, samples, dropped, latency)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def to_dict(self) -> dict:
        return {"update_id": self.update_id, "state": self.state, "model": self.model, "name": self.name,
                "version": self.version, "sha256": self.sha256, "from_version": self.from_version,
                "progress": self.progress, "error": self.error, "note": self.note, "shadow": self.shadow}

    @classmethod
    def from_dict(cls, d) -> "UpdateEvent | None":
        if not isinstance(d, dict):
            return None
        prog = d.get("progress")
        return cls(update_id=_str(d, "update_id"), state=_str(d, "state"), name=_str(d, "name"),
                   version=_str(d, "version"), sha256=_str(d, "sha256"), from_version=_str(d, "from_version"),
                   progress=prog if isinstance(prog, dict) else None, error=_str(d, "error"), note=_str(d, "note"),
                   model=_str(d, "model"), shadow=_obj(d, "shadow") or None)


@dataclass(frozen=True)
class TelemetryWindow:
    """One telemetry message: the inference window since the previous one, and the model serving.
    `nonfinite` counts inferences whose outputs held NaN/Inf (0 when an agent does not report it)."""

    device_id: str
    seq: int | None = None
    ts: str | None = None
    count: int = 0
    errors: int = 0  # the model failed on a valid request (agents before 2026-12-06: refused ones too)
    nonfinite: int = 0
    p95_ms: float | None = None
    window_s: float | None = None
    total_count: int | None = None
    total_errors: int | None = None
    model_version: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    rejected: int = 0  # requests refused before the model ran (bad input); 0 from older agents
    total_rejected: int | None = None

    def value(self, path: str) -> float | None:
        """A custom numeric field by dotted path ("inference.latency_ms.p99", "system.cpu_percent")."""
        cur = self.raw
        for part in path.split("."):
            if not isinstance(cur, dict):
                return None
            cur = cur.get(part)
        if isinstance(cur, bool) or not isinstance(cur, (int, float)) or not math.isfinite(cur):
            return None
        return float(cur)

    def for_model(self, name: str | None) -> "TelemetryWindow":
        """The window of one model (from `models`); an agent without `models` serves one model,
        whose window is the whole; a model the device does not report has an empty window."""
        models = self.raw.get("models")
        if name is None or not isinstance(models, dict):
            return self
        m = models.get(name)
        if not isinstance(m, dict):
            return TelemetryWindow(device_id=self.device_id, seq=self.seq, ts=self.ts)
        doc = {**self.raw, "inference": _obj(m, "inference"), "totals": _obj(m, "totals"),
               "model": {"name": name, "version": _str(m, "version")}, "drift": _obj(m, "drift"),
               "shadow": _obj(m, "shadow")}
        return TelemetryWindow.from_dict(self.device_id, doc)

    @classmethod
    def from_dict(cls, device_id: str, d) -> "TelemetryWindow":
        if not isinstance(d, dict):
            return cls(device_id=device_id)
        inf, tot, model = _obj(d, "inference"), _obj(d, "totals"), _obj(d, "model")
        return cls(device_id=device_id, seq=_int(d, "seq"), ts=_str(d, "ts"), count=_int(inf, "count") or 0,
                   errors=_int(inf, "errors") or 0, nonfinite=_int(inf, "nonfinite") or 0,
                   p95_ms=_num(_obj(inf, "latency_ms"), "p95"), window_s=_num(inf, "window_s"),
                   total_count=_int(tot, "count"), total_errors=_int(tot, "errors"),
                   model_version=_str(model, "version"), raw=d, rejected=_int(inf, "rejected") or 0,
                   total_rejected=_int(tot, "rejected"))


class JobState(str, Enum):
    """Where a profile job or a capture request is, as its result messages say (str values on the wire)."""

    ACCEPTED = "accepted"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"
    CANCELLED = "cancelled"


PROFILE_FINAL = (JobState.DONE, JobState.FAILED, JobState.REFUSED, JobState.CANCELLED)


@dataclass(frozen=True)
class ProfileResult:
    """One message on `devices/{id}/profile/result`: a profile job's progress (accepted, running
    with its phase) or its end (done, failed, refused, cancelled). `figures` holds the device's
    measurements once done (docs/mqtt-protocol.md#profile-jobs)."""

    device_id: str
    job_id: str | None = None
    state: str | None = None
    phase: str | None = None
    error: str | None = None
    bundle: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    ts: str | None = None

    @property
    def final(self) -> bool:
        return self.state in PROFILE_FINAL

    def value(self, path: str) -> float | None:
        """A numeric figure by dotted path ("latency_ms.p50", "load_ms")."""
        return TelemetryWindow(device_id=self.device_id, raw=self.figures).value(path)

    def to_dict(self) -> dict:
        return {"device_id": self.device_id, "job_id": self.job_id, "state": self.state, "phase": self.phase,
                "error": self.error, "bundle": self.bundle, "figures": self.figures, "ts": self.ts}

    @classmethod
    def from_dict(cls, device_id: str, d) -> "ProfileResult | None":
        if not isinstance(d, dict):
            return None
        return cls(device_id=device_id, job_id=_str(d, "job_id"), state=_str(d, "state"), phase=_str(d, "phase"),
                   error=_str(d, "error"), bundle=_obj(d, "bundle"), figures=_obj(d, "figures"), ts=_str(d, "ts"))


__all__ = ["FINAL_STATES", "UpdateState", "ModelInfo", "ModelSlot", "UpdateSummary", "DeviceStatus", "UpdateEvent",
           "TelemetryWindow", "PROFILE_FINAL", "ProfileResult"]
