"""The fleet's device table, kept from retained status records and live telemetry.

`FleetTable` is the library part: feed it (topic, payload) from any MQTT client and read rows at
any time (thread-safe), so a long-running consumer (a web page, a rollout controller) keeps one
up to date; `FleetWatcher` connects and feeds one; `status()` is `edgepack fleet status`."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from edgeproto.broker import BrokerConfig
from edgeproto.records import DeviceStatus, TelemetryWindow
from edgeproto.topics import Topics
from fleet.conn import Collector, parse_json


@dataclass
class DeviceEntry:
    status: DeviceStatus
    telemetry: TelemetryWindow | None = None
    status_raw: dict | None = None
    updated: float = 0.0  # time.time() of the last message

    def row(self) -> dict:
        """The device: its first model (as one-model agents reported it), the whole device's p95 and
        errors, and `models`, one row per model."""
        st, tel = self.status, self.telemetry
        m, u = st.model, st.update
        return {"device_id": st.device_id, "online": st.online, "groups": list(st.groups),
                "model": m.name if m else None, "version": m.version if m else None,
                "provider": m.provider if m else None, "interface": m.interface if m else None,
                "update": u.state if u else None, "update_error": u.error if u else None,
                "update_issued": u.issued if u else None, "signed_updates": st.signed_updates,
                "key_serial": st.key_serial, "p95_ms": tel.p95_ms if tel else None,
                "errors": _errors(tel), "rejected": _errors(tel, "rejected"),
                "interval_s": tel.window_s if tel else None,
                "last_seen": (tel.ts if tel else None) or st.ts, "models": self.models()}

    def models(self) -> list[dict]:
        """Each model of the device, seen through it (`for_model`): version, update, and p95, errors
        and throughput from its own telemetry. An agent without `models` lists its one model."""
        st, tel = self.status, self.telemetry
        names = list(st.models) or ([st.model.name] if st.model and st.model.name else [])
        return [_model_row(name, st.for_model(name), tel.for_model(name) if tel else None,
                           error=st.models[name].error if name in st.models else None) for name in names]


def _errors(tel: TelemetryWindow | None, key: str = "errors") -> int | None:
    """Since the agent started: `errors` (the model failed) or `rejected` (refused as bad input; None
    from agents before 2026-12-06, whose errors counted both)."""
    totals = tel.raw.get("totals") if tel else None
    return totals.get(key) if isinstance(totals, dict) else None


def _model_row(name: str, st: DeviceStatus, tel: TelemetryWindow | None, *, error: str | None) -> dict:
    m, u = st.model, st.update
    inference = tel.raw.get("inference") if tel else None
    return {"name": name, "version": m.version if m else None, "provider": m.provider if m else None,
            "model_error": error, "update": u.state if u else None, "update_error": u.error if u else None,
            "update_id": u.update_id if u else None,
            "p95_ms": tel.p95_ms if tel else None, "errors": _errors(tel), "rejected": _errors(tel, "rejected"),
            "throughput_ips": inference.get("throughput_ips") if isinstance(inference, dict) else None,
            **_generation(inference), **_worst_drift(tel)}


def _generation(inference) -> dict:
    """A generative model's window: decode tokens/s and time to first token (p95); None for others."""
    gen = inference.get("generation") if isinstance(inference, dict) else None
    gen = gen if isinstance(gen, dict) else {}
    ttft = gen.get("ttft_ms") if isinstance(gen.get("ttft_ms"), dict) else {}
    return {"decode_tok_s": gen.get("decode_tokens_per_s"), "ttft_p95_ms": ttft.get("p95")}


def _worst_drift(tel: TelemetryWindow | None) -> dict:
    """The model's most drifted tensor in the window: its PSI and name (None without drift scores)."""
    drift = tel.raw.get("drift") if tel else None
    scores = [(v.get("psi"), name) for name, v in drift.items() if isinstance(v, dict)] if isinstance(drift, dict) else []
    scores = [(x, n) for x, n in scores if isinstance(x, (int, float)) and not isinstance(x, bool)]
    psi, name = max(scores) if scores else (None, None)
    return {"drift_psi": psi, "drift_tensor": name}


class FleetTable:
    """device id -> DeviceEntry, from `{root}/devices/+/status` and `.../telemetry` messages."""

    def __init__(self, topics: Topics = Topics()):
        self.topics = topics
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceEntry] = {}
        self.version = 0  # bumped on every change (cheap "anything new?" check for pollers)

    @property
    def subscriptions(self) -> list[str]:
        return [self.topics.status(), self.topics.telemetry()]

    def feed(self, topic: str, payload: bytes) -> str | None:
        """Take one message; returns the device id it updated, or None if it was not ours."""
        hit = self.topics.parse_device(topic)
        if hit is None or hit[1] not in ("status", "telemetry"):
            return None
        dev, kind = hit
        doc = parse_json(payload)
        with self._lock:
            e = self._devices.get(dev)
            if doc is None and kind == "status":  # a cleared retained status: the device was removed
                self._devices.pop(dev, None)
                self.version += 1
                return dev
            if not isinstance(doc, dict):
                return None
            if e is None:
                e = self._devices[dev] = DeviceEntry(status=DeviceStatus(device_id=dev))
            if kind == "status":
                e.status, e.status_raw = DeviceStatus.from_dict(dev, doc), doc
            else:
                e.telemetry = TelemetryWindow.from_dict(dev, doc)
            e.updated = time.time()
            self.version += 1
        return dev

    def get(self, device: str) -> DeviceEntry | None:
        with self._lock:
            return self._devices.get(device)

    def entries(self, *, group: str | None = None) -> list[DeviceEntry]:
        with self._lock:
            items = sorted(self._devices.items())
        return [e for _, e in items if group is None or group in e.status.groups]

    def rows(self, *, group: str | None = None) -> list[dict]:
        return [e.row() for e in self.entries(group=group)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._devices)


class FleetWatcher:
    """A connected FleetTable: subscribes to status and telemetry and keeps the table current
    until stop()."""

    def __init__(self, broker: BrokerConfig, *, name: str = "fleet", table: FleetTable | None = None,
                 telemetry: bool = True):
        self.table = table or FleetTable(Topics(broker.topic_prefix))
        subs = self.table.subscriptions if telemetry else [self.table.topics.status()]
        self._conn = Collector(broker, subs, name=name, on_message=self.table.feed)

    def settle(self, *, quiet_s: float = 0.3, max_s: float = 10.0) -> None:
        """Wait until retained records stop arriving (quiet for `quiet_s`), at most `max_s`."""
        deadline, last, seen = time.monotonic() + max_s, time.monotonic(), self.table.version
        while time.monotonic() < deadline:
            time.sleep(0.05)
            if self.table.version != seen:
                seen, last = self.table.version, time.monotonic()
            elif time.monotonic() - last >= quiet_s:
                return

    def stop(self) -> None:
        self._conn.stop()


def status(broker: BrokerConfig, *, group: str | None = None, listen_s: float = 2.0) -> list[dict]:
    """Retained status plus the telemetry that arrives within `listen_s`, one row per device."""
    w = FleetWatcher(broker)
    try:
        time.sleep(listen_s)
    finally:
        w.stop()
    return w.table.rows(group=group)


__all__ = ["DeviceEntry", "FleetTable", "FleetWatcher", "status"]
