"""One simulated device: the agent's real update path over a stand-in runtime.

What runs for real, per device: its own MQTT session (edgeproto.mqtt.MqttClient on a shared
NetLoop) with a Last Will; the RecordGate (strict parsing, signature and replay checks) and
desired-state resolution (the agent's precedence for its one model: the model's device record, its
groups' records, then the device's and groups' old-style records); the Updater state
machine with its MqttChunkFetcher (every chunk and the whole file hash-checked, written to the
device's own data directory) and bundle verification (every member's sha256, the signature
when keys are configured); status, update events and telemetry windows (device_agent.stats).

What is stood in: the runtime. `SimModel` loads nothing and runs nothing; its "inferences" are
drawn at a configured rate with a latency drawn around the device's own base latency. A
misbehaving device's model fails staging, runs slower or returns errors once it is on another
bundle than the one it started with.

A simulated device serves one model, named after the bundle it starts on (as the agent names a
model); a removal record for it unloads the model and deletes its files."""
from __future__ import annotations

import os
import random
import threading
import time
from enum import Enum
from pathlib import Path

from device_agent.ota.gate import RecordGate, SourcePolicy
from device_agent.ota.keyring import Keyring
from device_agent.ota.updater import Updater, UpdaterSettings
from device_agent.stats import InferenceStats
from device_agent.store import Store
from edgebundle.archive import open_bundle, sha256_file
from edgebundle.interface import interface_hash
from edgeproto.desired import Desired, Limits, RecordError, Removal
from edgeproto.documents import (StatusDocument, TelemetryDocument, Totals, last_will, model_entry, model_section,
                                 now_iso)
from edgeproto.mqtt import MqttClient, MqttError, Will, dumps
from edgeproto.records import UpdateState
from edgeproto.topics import DeviceTopics

MAX_SAMPLES_PER_CATCH_UP = 5000  # after a stall, do not draw minutes of traffic in one go


class Fault(str, Enum):
    FAIL_STAGING = "fail_staging"  # any new bundle fails to load
    SLOW = "slow"  # runs `slow_factor` x slower on any bundle but its first
    ERRORS = "errors"  # `error_rate` of requests fail on any bundle but its first
    DROP = "drop"  # loses its network link for `drop_s` when an update starts


class BundlePool:
    """One copy of each bundle for the whole simulated fleet: a device's verified download is
    replaced by a hard link to the pooled copy (each device still downloads and checks its own)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def link(self, src: Path, digest: str, dest: Path, *, move: bool) -> None:
        pooled = self.root / f"{digest}.edgepack"
        with self._lock:
            if not pooled.exists():
                if move:
                    os.replace(src, pooled)
                else:
                    os.link(src, pooled) if src.stat().st_dev == self.root.stat().st_dev else \
                        pooled.write_bytes(src.read_bytes())
        if move and src.exists():
            src.unlink()
        if not dest.exists():
            os.link(pooled, dest)


class PooledStore(Store):
    """The agent's Store, with bundle files shared through a BundlePool."""

    def __init__(self, data_dir: Path, pool: BundlePool):
        super().__init__(data_dir)
        self.pool = pool
        self.digests: dict[str, str] = {}  # file name in bundles/ -> sha256

    def add(self, bundle, *, move: bool = False, sha256: str | None = None, name: str | None = None):
        src = Path(bundle)
        open_bundle(src)
        digest = sha256 or sha256_file(src)
        dest = self.bundles / f"{digest[:16]}-{name or src.name}"
        self.pool.link(src, digest, dest, move=move)
        self.digests[dest.name] = digest
        return dest, digest


class SimModel:
    """The stand-in runtime: what the updater and the status need of a Model, nothing loaded."""

    def __init__(self, manifest, sha256: str, *, latency_ms: float, error_rate: float):
        self.manifest, self.bundle_sha256 = manifest, sha256
        self.name, self.version = manifest.name, manifest.version
        self.latency_ms, self.error_rate = latency_ms, error_rate
        self._lock = threading.Lock()
        self._requests = self._errors = 0
        self._lat: list[float] = []
        self._p95: float | None = None
        self._interface = interface_hash(manifest)
        self.base, self.base_slot = None, None  # what an adapter model has (the updater asks): none here

    def version_of(self, name: str) -> str | None:
        """The version an update must not go below (the updater asks a Model): a simulated model has no
        LoRA adapters, so one line of versions."""
        return self.version

    def describe(self) -> dict:
        return model_section(self.manifest, bundle_sha256=self.bundle_sha256, interface=self._interface,
                             runtime="sim", runtime_version=None, provider="sim",
                             notes=["simulated device: nothing is loaded"])

    def observe(self, ms: float, ok: bool) -> None:
        with self._lock:
            if ok:
                self._requests += 1
                if len(self._lat) < 10_000:
                    self._lat.append(ms)
                    self._p95 = None
            else:
                self._errors += 1

    # ---- what the updater calls ----
    def watch(self, on: bool, reference=None) -> None:
        with self._lock:
            self._requests = self._errors = 0
            self._lat, self._p95 = [], None

    def health_snapshot(self) -> dict:
        with self._lock:
            if self._p95 is None and self._lat:
                s = sorted(self._lat)
                self._p95 = s[min(len(s) - 1, int(0.95 * len(s)))]
            return {"requests": self._requests + self._errors, "errors": self._errors, "nonfinite": 0,
                    "p95_ms": self._p95}

    def check_golden(self) -> dict:
        return {"ok": True, "max_excess_error": 0.0}

    def golden_inputs(self) -> list:
        return [{}]

    def infer(self, feeds) -> dict:
        time.sleep(self.latency_ms / 1000)
        return {}

    def close(self) -> None:
        pass


class SimDevice:
    """The updater's Host (device_agent.ota.updater.Host) for one simulated device."""

    def __init__(self, device_id: str, *, sim, model: str | None, faults: frozenset = frozenset(),
                 base_ms: float = 10.0):
        """`model`: the name of the model it serves (None: the bundle's name is not a model name,
        so only the old-style topics address it)."""
        self.device_id, self.sim, self.faults, self.base_ms = device_id, sim, faults, base_ms
        self.model_name = model
        s = sim.settings
        self.topics = DeviceTopics(sim.broker.topic_prefix, device_id)
        self.data = sim.data_dir / device_id
        self.store = PooledStore(self.data, sim.pool)
        self.stats = InferenceStats()
        self.keyring = Keyring(direct=list(sim.trusted), roots=[], state_path=None)
        self.gate = RecordGate(keyring=self.keyring, limits=Limits(), topic_prefix=self.topics.prefix,
                               sources=SourcePolicy(), state_path=None)
        mine = [self.topics.model_desired(model), *(self.topics.group_model_desired(g, model) for g in s.groups)]
        # the order a record wins in (docs/mqtt-protocol.md): its model's topics, then the old-style ones
        self._record_topics = (mine if model else []) + [self.topics.desired] + [self.topics.group_desired(g)
                                                                                  for g in s.groups]
        self._desired: dict[str, Desired | Removal | None] = {}
        self._removed: str | None = None  # update_id of the removal acted on
        self._rng = random.Random(f"{s.seed}-{device_id}")  # str seeds are stable across runs
        self._lock = threading.Lock()
        self._traffic_t = time.monotonic()
        self._carry = 0.0
        self._seq = 0
        self._dropped = False
        self._backlog: list[tuple[str, bytes]] = []  # events published while the link was down
        self.model: SimModel | None = None
        self.switched = 0  # times it began serving a bundle other than its first (rollback excluded)
        self.initial_sha: str | None = None
        will = Will(self.topics.status, dumps(last_will(device_id)))
        self.mqtt = MqttClient(sim.broker, client_id=f"edgepack-sim-{device_id}", will=will,
                               on_connect=self._on_connect, on_message=self._on_message, loop=sim.net)
        self.updater = Updater(self, self.data, settings=UpdaterSettings(max_attempts=s.max_attempts))

    def start(self, initial: Path) -> None:
        self.updater.recover()
        path = self.store.active()
        if path is None:
            path, sha = self.store.add(initial)
            self.store.activate(path, sha)
        self.initial_sha = self.store.read_state().get("sha256")
        self.model = self.load(path)
        self.mqtt.start()
        self.updater.start()

    def stop(self) -> None:
        self.updater.stop()
        self.mqtt.stop()

    # ---- the updater's host interface ----
    def active_model(self) -> SimModel | None:
        return self.model

    def swap(self, model):
        self.catch_up()  # traffic so far belongs to the model that served it
        old, self.model = self.model, model
        if model is not None and model.bundle_sha256 != self.initial_sha:
            self.switched += 1
        self.status_changed()
        return old

    def verify(self, path: Path, *, sha256: str):
        b = open_bundle(path)
        if self.keyring.enabled:
            self.keyring.verify_bundle(b.manifest_bytes, b.signature)
        b.verify()  # every member's size and sha256 (nothing extracted: nothing is loaded)
        return b

    def load(self, path: Path, *, verified=None) -> SimModel:
        path = Path(path)
        sha = self.store.digests.get(path.name) or sha256_file(path)
        first = sha == self.initial_sha or self.initial_sha is None
        if Fault.FAIL_STAGING in self.faults and not first:
            raise RuntimeError("simulated staging failure (the stand-in runtime refuses this bundle)")
        manifest = (verified or open_bundle(path)).manifest
        m = self.sim.misbehave
        slow = Fault.SLOW in self.faults and not first
        return SimModel(manifest, sha, latency_ms=self.base_ms * (m.slow_factor if slow else 1.0),
                        error_rate=m.error_rate if Fault.ERRORS in self.faults and not first else 0.0)

    def event(self, doc: dict) -> None:
        doc = {**doc, "model": doc.get("model") or self.model_name}
        self._send(self.topics.events, dumps({"device_id": self.device_id, "ts": now_iso(), **doc}))
        if (Fault.DROP in self.faults and not self._dropped and doc.get("state") == UpdateState.DOWNLOADING
                and not doc.get("progress")):
            self._dropped = True
            self.sim.net.drop(self.mqtt.paho, self.sim.misbehave.drop_s)

    def status_changed(self) -> None:
        if self.mqtt.connected.is_set():
            self._send(self.topics.status, dumps(self.status()), retain=True)

    def say_offline(self):
        """The retained status says offline (as an agent's does when it stops): a clean disconnect
        sends no Last Will, and the fleet page would show the device online for good. The publish's
        handle (wait on it), None when the link is down (then the will covers it)."""
        if not self.mqtt.connected.is_set():
            return None
        try:
            return self.mqtt.publish(self.topics.status, dumps(dict(self.status(), online=False, reason="stopped")),
                                     qos=1, retain=True)
        except MqttError:
            return None

    # ---- MQTT ----
    def status(self) -> dict:
        model = self.model.describe() if self.model else None
        error, update = None if self.model else "no model", self.updater.summary()
        models = None if self.model_name is None else {} if self.model is None else {
            self.model_name: model_entry(model=model, error=error, update=update, threads=None, memory=None)}
        return StatusDocument(
            device_id=self.device_id, ts=now_iso(), groups=tuple(self.sim.settings.groups), agent_version="sim",
            model=model, model_error=error, update=update, ota={**self.keyring.describe(), "allowed_urls": []},
            sim={"faults": sorted(f.value for f in self.faults), "base_ms": round(self.base_ms, 3)},
            models=models).to_dict()

    def _send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            self.mqtt.publish(topic, payload, qos=1, retain=retain)
        except MqttError:  # link down: events are kept (in memory) and sent on reconnect
            if not retain:
                with self._lock:
                    self._backlog = (self._backlog + [(topic, payload)])[-1000:]

    def _on_connect(self) -> None:
        self._send(self.topics.status, dumps(self.status()), retain=True)
        for topic in self._record_topics:
            self.mqtt.subscribe(topic, qos=1)
        with self._lock:
            backlog, self._backlog = self._backlog, []
        for topic, payload in backlog:
            self._send(topic, payload)

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic in self._record_topics:
            try:
                self._desired[topic] = self.gate.accept(payload, topic)
            except RecordError as e:
                self.event({"update_id": e.update_id, "state": "failed", "error": str(e).split("\n")[0]})
                return
            d = next((r for r in map(self._desired.get, self._record_topics) if r is not None), None)
            self.updater.set_desired(d if isinstance(d, Desired) else None)
            if isinstance(d, Removal):
                self._remove(d)
        else:
            self.updater.on_message(topic, payload)

    def _remove(self, r: Removal) -> None:
        """Unload the model and delete its files, once per removal record."""
        if r.update_id == self._removed:
            return
        self._removed = r.update_id
        old = self.swap(None)
        self.store.deactivate()
        self.store.prune(set())
        self.event({"update_id": r.update_id, "state": "removed",
                    "from_version": old.version if old else None, "note": "unloaded; its files deleted"})

    # ---- traffic and telemetry ----
    def catch_up(self) -> None:
        """Draw the requests served since the last call (rate x elapsed) on the active model."""
        s = self.sim.settings
        with self._lock:
            now = time.monotonic()
            want = (now - self._traffic_t) * s.rate + self._carry
            self._traffic_t = now
            n = int(want)
            self._carry = want - n
            m = self.model
            if m is None:
                return
            rng = self._rng
            for _ in range(min(n, MAX_SAMPLES_PER_CATCH_UP)):
                ms = m.latency_ms * rng.lognormvariate(0.0, s.jitter)
                ok = rng.random() >= m.error_rate
                self.stats.record(ms if ok else None, ok=ok)
                m.observe(ms, ok)

    def emit_telemetry(self) -> bool:
        """One telemetry window (the agent's format); False when the link is down (the window keeps
        growing and goes out with the next one, so `seq` has no gaps)."""
        if not self.mqtt.connected.is_set():
            return False
        self.catch_up()
        m = self.model
        self._seq += 1
        window, totals = self.stats.window(), Totals(count=self.stats.total, errors=self.stats.total_errors)
        models = None if self.model_name is None else {} if m is None else {
            self.model_name: {"version": m.version, "inference": window, "totals": totals.to_dict()}}
        doc = TelemetryDocument(device_id=self.device_id, ts=now_iso(), seq=self._seq, inference=window,
                                totals=totals, system={}, model_name=m.name if m else None,
                                model_version=m.version if m else None, models=models).to_dict()
        try:
            self.mqtt.publish(self.topics.telemetry, dumps(doc), qos=1)
            return True
        except MqttError:
            self._seq -= 1
            return False

    @property
    def version(self) -> str | None:
        m = self.model
        return m.version if m else None
