"""What a device writes: the status document (retained) and its Last Will, the telemetry window,
and the model section of the status. One writer each, used by the agent and the simulator alike;
the fleet side reads them with edgeproto.records. docs/mqtt-protocol.md and docs/schemas/ describe
them: keys, values and key order are the protocol, so they change here or nowhere."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from edgebundle.manifest import Manifest

STATUS_KEYS = ("device_id", "online", "reason", "ts", "state", "groups", "agent_version", "started", "model",
               "model_error", "previous_model", "update", "models", "ota", "buffer", "profile", "platform", "api", "sim")


def now_iso() -> str:
    """The documents' timestamps: UTC, ISO-8601, milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def last_will(device_id: str) -> dict:
    """The status the broker publishes when the device's connection drops (fixed at connect
    time, so no timestamp)."""
    return {"device_id": device_id, "online": False, "reason": "connection lost", "ts": None}


def model_section(manifest: Manifest, *, bundle_sha256: str, interface: str, runtime: str | None,
                  runtime_version: str | None, provider: str | None, notes: list[str]) -> dict:
    """The status's view of the model serving: the bundle, and the runtime that runs it."""
    return {"name": manifest.name, "version": manifest.version, "bundle_sha256": bundle_sha256,
            "interface": interface, "target": manifest.target.get("name"), "format": manifest.format,
            "precision": manifest.precision, "runtime": runtime, "runtime_version": runtime_version,
            "provider": provider, "notes": notes}


def model_entry(*, model: dict | None, error: str | None, update: dict | None, threads: int | None,
                memory: dict | None, capture: dict | None = None) -> dict:
    """One model of a device in the status's `models` (keyed by the model's name on the device):
    what it serves, why not, its update and the resources it was given."""
    return {"model": model, "model_error": error, "previous_model": (update or {}).get("previous"),
            "update": update, "threads": threads, "memory": memory, **({"capture": capture} if capture else {})}


@dataclass(frozen=True)
class AgentStatus:
    """The status sections only a real agent has (a simulated device has no lifecycle, disk
    queue, profiler, host or local API)."""

    state: dict
    started: str
    buffer: dict
    profile: dict | None
    platform: dict
    api: dict


@dataclass(frozen=True)
class StatusDocument:
    """The retained status (`devices/{id}/status`). `update` is the updater's summary; the
    previous model is read from it. `models` (model_entry per name) lists every model of the
    device; `model`, `model_error` and `update` repeat the first one's, as one-model agents wrote them."""

    device_id: str
    ts: str
    groups: tuple[str, ...]
    agent_version: str
    model: dict | None
    model_error: str | None
    update: dict | None
    ota: dict
    online: bool = True
    reason: str | None = None  # why offline
    agent: AgentStatus | None = None
    sim: dict | None = None  # a simulated device's faults and base latency
    models: dict | None = None  # name -> model_entry(); None: a writer that predates several models

    def to_dict(self) -> dict:
        d = {"device_id": self.device_id, "online": self.online, "reason": self.reason, "ts": self.ts,
             "groups": list(self.groups), "agent_version": self.agent_version, "model": self.model,
             "model_error": self.model_error, "previous_model": (self.update or {}).get("previous"),
             "update": self.update, "ota": self.ota}
        if self.models is not None:
            d["models"] = self.models
        if self.agent is not None:
            d.update(vars(self.agent))
        if self.sim is not None:
            d["sim"] = self.sim
        return {k: d[k] for k in STATUS_KEYS if k in d}


@dataclass(frozen=True)
class Totals:
    """Inferences since the device started. `nonfinite`, `rejected` None: not counted (a simulated device)."""

    count: int
    errors: int
    nonfinite: int | None = None
    rejected: int | None = None  # refused as bad input (HTTP 400); `errors` are the model's own failures

    def to_dict(self) -> dict:
        d = {"count": self.count, "errors": self.errors}
        for k in ("rejected", "nonfinite"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


@dataclass(frozen=True)
class AgentTelemetry:
    """The telemetry sections only a real agent has: its disk queue and its profiler."""

    buffer: dict
    profile: dict | None


@dataclass(frozen=True)
class TelemetryDocument:
    """One telemetry window (`devices/{id}/telemetry`): the inferences since the previous one
    (`inference`, InferenceStats.window()), the totals, the host, and the model serving.
    `models` holds the same window, totals and version per model (keyed by name); `inference`,
    `totals` and `model` stay the device's sum and its first model, as one-model agents wrote them."""

    device_id: str
    ts: str
    seq: int
    inference: dict
    totals: Totals
    system: dict
    model_name: str | None = None  # None: no model serving
    model_version: str | None = None
    agent: AgentTelemetry | None = None
    models: dict | None = None  # name -> {"version", "inference", "totals"}

    def to_dict(self) -> dict:
        d = {"device_id": self.device_id, "ts": self.ts, "seq": self.seq, "inference": self.inference,
             "totals": self.totals.to_dict(), "system": self.system}
        if self.agent is not None:
            d.update(vars(self.agent))
        d["model"] = None if self.model_name is None else {"name": self.model_name, "version": self.model_version}
        if self.models is not None:
            d["models"] = self.models
        return d
