"""A fleet in one process: N SimDevices on one network thread (edgeproto.netloop), one telemetry
scheduler, and an update thread per device (the agent's own Updater). See edgepack/sim/device.py
for what is real and what is stood in, and docs/ota.md ("A fleet on one box")."""
from __future__ import annotations

import collections
import heapq
import logging
import random
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.archive import open_bundle
from edgebundle.errors import InputError
from edgebundle.signing import load_public_key
from edgeproto.broker import BrokerConfig
from edgeproto.bundleref import MODEL_NAME
from edgeproto.netloop import NetLoop
from edgepack.sim.device import BundlePool, Fault, SimDevice

log = logging.getLogger("edgepack.sim")


@dataclass(frozen=True)
class Misbehaviour:
    """Fractions of the fleet (0..1) that misbehave, and how much. Devices are picked at random
    (seeded) for each fault independently; `pinned` names devices that get a fault whatever the
    fractions say ({"sim-0001": ("slow",)})."""

    fail_staging: float = 0.0
    slow: float = 0.0
    errors: float = 0.0
    drop: float = 0.0
    slow_factor: float = 2.0
    error_rate: float = 0.1
    drop_s: float = 30.0
    pinned: dict = field(default_factory=dict)

    def check(self) -> "Misbehaviour":
        for f in Fault:
            v = getattr(self, f.value)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"--{f.value.replace('_', '-')} {v} is not a fraction between 0 and 1")
        if self.slow_factor <= 0 or not 0 <= self.error_rate <= 1 or self.drop_s < 0:
            raise InputError("--slow-factor must be > 0, --error-rate within 0..1, --drop-seconds >= 0")
        return self


@dataclass(frozen=True)
class SimSettings:
    devices: int = 100
    id_prefix: str = "sim"
    groups: tuple[str, ...] = ("sim",)
    latency_ms: float = 10.0  # devices' base latencies are spread over 0.5x..1.5x of this
    jitter: float = 0.1  # sigma of the lognormal noise on each request's latency
    rate: float = 10.0  # requests per second per device
    telemetry_s: float = 5.0
    max_attempts: int = 3
    seed: int = 0
    data_dir: Path | None = None  # default: a fresh directory on /dev/shm (removed at stop)
    trusted_keys: tuple[Path, ...] = ()

    def check(self) -> "SimSettings":
        if not 1 <= self.devices <= 100_000:
            raise InputError(f"--devices {self.devices}: between 1 and 100000")
        if self.rate < 0 or self.latency_ms <= 0 or self.telemetry_s <= 0 or self.jitter < 0:
            raise InputError("--rate must be >= 0; --latency-ms, --telemetry-interval > 0; --jitter >= 0")
        return self


class Simulator:
    def __init__(self, broker: BrokerConfig, bundle: Path, settings: SimSettings = SimSettings(),
                 misbehave: Misbehaviour = Misbehaviour()):
        self.broker, self.bundle = broker, Path(bundle)
        self.settings, self.misbehave = settings.check(), misbehave.check()
        self.trusted = [load_public_key(p) for p in settings.trusted_keys]
        self._own_dir = settings.data_dir is None
        shm = Path("/dev/shm")
        self.data_dir = Path(settings.data_dir) if settings.data_dir else Path(
            tempfile.mkdtemp(prefix="edgepack-sim-", dir=shm if shm.is_dir() else None))
        self.pool = BundlePool(self.data_dir / "_pool")
        self.net: NetLoop | None = None
        self.devices: list[SimDevice] = []
        self._stop = threading.Event()
        self._telemetry: threading.Thread | None = None

    def faults_for(self, ids: list[str]) -> dict[str, set[Fault]]:
        rng = random.Random(self.settings.seed)
        out: dict[str, set[Fault]] = {d: set() for d in ids}
        for f in Fault:
            k = round(getattr(self.misbehave, f.value) * len(ids))
            for d in rng.sample(ids, k):
                out[d].add(f)
        for d, fs in self.misbehave.pinned.items():
            if d in out:
                out[d] |= {Fault(f) for f in fs}
        return out

    def start(self) -> "Simulator":
        s = self.settings
        ids = [f"{s.id_prefix}-{i:04d}" for i in range(s.devices)]
        faults = self.faults_for(ids)
        rng = random.Random(s.seed + 1)
        name = open_bundle(self.bundle).manifest.name
        model = name if MODEL_NAME.match(name) else None  # the agent names a model after its bundle
        self.net = NetLoop()
        for d in ids:
            dev = SimDevice(d, sim=self, model=model, faults=frozenset(faults[d]),
                            base_ms=s.latency_ms * rng.uniform(0.5, 1.5))
            dev.start(self.bundle)
            self.devices.append(dev)
        self._telemetry = threading.Thread(target=self._telemetry_loop, name="sim-telemetry", daemon=True)
        self._telemetry.start()
        return self

    def wait_connected(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.connected() < len(self.devices):
            time.sleep(0.1)
        return self.connected()

    def connected(self) -> int:
        return sum(1 for d in self.devices if d.mqtt.connected.is_set())

    def versions(self) -> dict[str, str | None]:
        return {d.device_id: d.version for d in self.devices}

    def summary(self) -> dict:
        """Connected devices, devices per version and per update state."""
        return {"devices": len(self.devices), "connected": self.connected(),
                "versions": dict(collections.Counter(d.version or "-" for d in self.devices)),
                "updates": dict(collections.Counter(d.updater.record.state.value for d in self.devices)),
                "ever_switched": sorted(d.device_id for d in self.devices if d.switched)[:20],
                "ever_switched_count": sum(1 for d in self.devices if d.switched),
                "faulty": {f.value: sum(1 for d in self.devices if f in d.faults) for f in Fault}}

    def _telemetry_loop(self) -> None:
        """Each device sends a window every telemetry_s, spread evenly over the interval."""
        period = self.settings.telemetry_s
        t0 = time.monotonic()
        n = max(len(self.devices), 1)
        heap = [(t0 + period * (i + 1) / n, i) for i in range(len(self.devices))]
        heapq.heapify(heap)
        while heap and not self._stop.is_set():
            due, i = heap[0]
            wait = due - time.monotonic()
            if wait > 0:
                self._stop.wait(min(wait, 0.5))
                continue
            heapq.heapreplace(heap, (due + period, i))
            try:
                self.devices[i].emit_telemetry()
            except Exception:
                log.exception("telemetry of %s failed", self.devices[i].device_id)

    def stop(self) -> None:
        self._stop.set()
        if self._telemetry:
            self._telemetry.join(5)
        for d in self.devices:
            d.updater._stop.set()  # all at once: stop() joins one by one
            d.updater._wake.set()
        for d in self.devices:
            d.updater.stop()
        sent = [h for h in (d.say_offline() for d in self.devices) if h is not None]
        deadline = time.monotonic() + 10
        for h in sent:  # all published at once, then acknowledged (bounded: the broker may be gone)
            try:
                h.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):  # the link dropped meanwhile: the Last Will says it
                pass
        for d in self.devices:
            d.mqtt.stop()
        if self.net:
            self.net.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> "Simulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def synthetic_bundle(dest: Path, *, version: str, size: int = 1 << 20, name: str = "simmodel", seed: int = 0) -> Path:
    """A valid, unsigned bundle of about `size` bytes (random model bytes: nothing runs it), for
    simulated fleets. Same interface for every version."""
    import numpy as np

    from edgebundle.archive import write_bundle
    from edgebundle.manifest import Manifest, TensorSpec

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model = dest.with_suffix(".bin")
    model.write_bytes(np.random.default_rng([seed, *map(int, version.split("."))]).bytes(size))
    m = Manifest(name=name, version=version, target={"name": "sim"}, format="tflite", precision="fp32",
                 model_file="model.tflite", inputs=(TensorSpec("x", (1, 4), "float32"),),
                 outputs=(TensorSpec("y", (1, 2), "float32"),), runtime={"name": "sim"})
    write_bundle(dest, m, {"model.tflite": model})
    model.unlink()
    return dest


__all__ = ["Misbehaviour", "SimSettings", "Simulator", "synthetic_bundle"]
