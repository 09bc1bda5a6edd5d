"""The update flow as explicit states, persisted so that a crash resumes or rolls back.

      new desired record (update_id not seen, bundle differs from the active one)
   IDLE ──────────────► DOWNLOADING ──► VERIFYING ──► STAGING ──► SWITCHING ──► PROBATION ──► COMMITTED
                           │   ▲            │            │            │             │
                           │   └ transient  │            │            │             └──► ROLLED_BACK
                           └────────────────┴────────────┴──► FAILED  └ crash ─────────────► ROLLED_BACK

- DOWNLOADING: MQTT chunks or URL into DATA/downloads/<sha>; transient errors retry with back-off,
  chunks already stored are kept (a restart resumes); a bad chunk or hash is fatal.
- VERIFYING: every hash, the signature against the trusted keys (when any are configured), the
  record's sha256, and anti-rollback (lower version refused unless allow_downgrade).
- STAGING: a second runtime instance loads the bundle, warms up, must reproduce the golden
  outputs and meet the latency budget. The old model keeps serving throughout.
- SWITCHING: the record is persisted, active.json replaced atomically, then one reference swap:
  requests in flight finish on the old model, new ones go to the new one.
- PROBATION: error rate, NaN/Inf outputs, p95 latency and periodic golden probes on the new model
  for N seconds or M requests. The old model stays loaded, so a rollback is one swap back.
- Crash or power loss: DOWNLOADING/VERIFYING/STAGING resume (the old model serves meanwhile);
  SWITCHING/PROBATION roll back to the previous bundle, which stays on disk.
COMMITTED, ROLLED_BACK and FAILED end an update_id: it is not retried; a new push is.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import numpy as np

from device_agent.ota.desired import Desired
from device_agent.ota.transfer import Cancelled, MqttChunkFetcher, TransferError, TransientError, fetch_url
from device_agent.store import Store, atomic_write
from edgebundle.errors import EdgepackError
from edgebundle.manifest import parse_version

log = logging.getLogger("edgepack.agent.ota")
RECORD_SCHEMA = 1


class State(str, Enum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SWITCHING = "switching"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


ENDED = (State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED)
RESUMABLE = (State.DOWNLOADING, State.VERIFYING, State.STAGING)


@dataclass
class Record:
    """What is persisted in DATA/update.json (replaced atomically at every transition)."""

    state: State = State.IDLE
    update_id: str | None = None
    desired: dict | None = None
    previous: dict | None = None  # {"bundle": rel path, "sha256", "version"} of the model before the switch
    candidate: dict | None = None
    error: str | None = None
    since: float = 0.0
    ended: dict = field(default_factory=dict)  # update_id -> final state (never retried)
    schema: int = RECORD_SCHEMA

    def to_json(self) -> bytes:
        d = asdict(self)
        d["state"] = self.state.value
        return json.dumps(d, indent=2).encode()

    @classmethod
    def load(cls, path: Path) -> "Record":
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls()
        if d.get("schema") != RECORD_SCHEMA:
            log.warning("update record schema %s is unknown; starting from idle", d.get("schema"))
            return cls()
        d["state"] = State(d["state"])
        return cls(**d)


class Host(Protocol):
    """What the updater needs from the agent (injected, so tests can drive it with fakes)."""

    store: Store
    mqtt: object
    trusted_keys: list

    def active_model(self): ...
    def swap(self, model): ...
    def load(self, path: Path): ...
    def event(self, doc: dict) -> None: ...
    def status_changed(self) -> None: ...


class UpdateFailed(EdgepackError):
    pass


class Updater:
    def __init__(self, host: Host, data_dir: Path):
        self.host = host
        self.path = Path(data_dir) / "update.json"
        self.downloads = Path(data_dir) / "downloads"
        self.record = Record.load(self.path)
        self.fetcher = MqttChunkFetcher(host.mqtt) if host.mqtt is not None else None
        self._desired: Desired | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._candidate_model = None
        self._previous_model = None
        self._last_progress = 0.0
        self._thread: threading.Thread | None = None
        self._fault = _fault_delays()

    # ---- lifecycle ----
    def recover(self) -> None:
        """Before the agent loads its model: an update cut off while switching or on probation
        is rolled back, so the agent starts on the previous (verified) bundle."""
        r = self.record
        if r.state in (State.SWITCHING, State.PROBATION):
            prev = r.previous
            if prev and (self.host.store.root / prev["bundle"]).is_file():
                self.host.store.activate(self.host.store.root / prev["bundle"], prev["sha256"])
            self._end(State.ROLLED_BACK, f"the agent restarted during {r.state.value}; rolled back to "
                                         f"{(prev or {}).get('version')}")
        elif r.state in (State.VERIFYING, State.STAGING):
            self._set(State.VERIFYING)  # the downloaded file is re-checked from scratch

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ota", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def set_desired(self, d: Desired | None) -> None:
        self._desired = d
        self._wake.set()

    def on_message(self, topic: str, payload: bytes) -> bool:
        return self.fetcher.on_message(topic, payload) if self.fetcher else False

    def summary(self) -> dict:
        r = self.record
        d = r.desired or {}
        return {"state": r.state.value, "update_id": r.update_id, "version": d.get("version"), "error": r.error,
                "previous": r.previous}

    # ---- the loop ----
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # never let the update thread die: the agent must keep serving
                log.exception("update step failed")
                time.sleep(2)
            self._wake.wait(1.0)
            self._wake.clear()

    def _step(self) -> None:
        r = self.record
        d = self._desired
        if r.state in RESUMABLE:
            if d is not None and d.update_id != r.update_id and not self._stop.is_set():
                self._abandon(f"superseded by update {d.update_id}")
            else:
                self._run(Desired.parse(json.dumps(r.desired).encode(), source="update.json"))
                return
        if d is None or d.update_id in r.ended:
            return
        active = self.host.active_model()
        if active is not None and active.bundle_sha256 == d.sha256:
            self.record.update_id, self.record.desired = d.update_id, d.to_dict()
            self._end(State.COMMITTED, None, note="already running this bundle")
            return
        self.record = Record(state=State.DOWNLOADING, update_id=d.update_id, desired=d.to_dict(),
                             since=time.time(), ended=r.ended)
        self._persist()
        self._event(State.DOWNLOADING)
        self._run(d)

    def _run(self, d: Desired) -> None:
        handlers = {State.DOWNLOADING: self._downloading, State.VERIFYING: self._verifying,
                    State.STAGING: self._staging, State.SWITCHING: self._switching, State.PROBATION: self._probation}
        while self.record.state in handlers and not self._stop.is_set():
            state = self.record.state
            self._inject_fault(state)
            try:
                nxt = handlers[state](d)
            except UpdateFailed as e:
                self._cleanup_candidate()
                self._end(State.FAILED, str(e).split("\n")[0])
                return
            if nxt is None:  # transient: stay in this state, try again later
                return
            if nxt in ENDED:
                return
            self._set(nxt)

    # ---- state handlers: each returns the next state (None = retry later) ----
    def _downloading(self, d: Desired) -> State | None:
        work = self.downloads / d.sha256[:16]
        work.mkdir(parents=True, exist_ok=True)
        try:
            if d.transfer["method"] == "mqtt":
                if self.fetcher is None:
                    raise UpdateFailed("MQTT transfer needs a broker connection")
                self.fetcher.fetch(d, work, progress=self._progress, cancelled=self._superseded)
            else:
                fetch_url(d, work, progress=self._progress, cancelled=self._superseded)
        except TransientError as e:
            log.warning("download paused: %s", e)
            self._event(State.DOWNLOADING, error=f"retrying: {e}")
            time.sleep(2)
            return None
        except Cancelled:
            self._abandon(f"superseded by update {self._desired.update_id if self._desired else '?'}")
            return None
        except TransferError as e:
            shutil.rmtree(work, ignore_errors=True)  # nothing half-written stays behind
            raise UpdateFailed(str(e)) from None
        return State.VERIFYING

    def _verifying(self, d: Desired) -> State:
        from edgebundle import signing
        from edgebundle.archive import verify_bundle

        work = self.downloads / d.sha256[:16]
        path = work / "bundle.edgepack"
        cand = self.record.candidate
        stored = self.host.store.root / cand["bundle"] if cand and cand.get("sha256") == d.sha256 else None
        if not path.is_file():
            if stored is None or not stored.is_file():
                return State.DOWNLOADING
            path = stored  # resumed after a restart: the file already moved into the store
        try:
            bundle = verify_bundle(path)
            if self.host.trusted_keys:
                signing.verify(bundle.manifest_bytes, bundle.signature, self.host.trusted_keys)
        except EdgepackError as e:
            shutil.rmtree(work, ignore_errors=True)
            raise UpdateFailed(f"verification failed: {str(e).splitlines()[0]}") from None
        m = bundle.manifest
        if (m.name, m.version) != (d.name, d.version):
            shutil.rmtree(work, ignore_errors=True)
            raise UpdateFailed(f"the bundle is {m.name} {m.version}, the desired record says {d.name} {d.version}")
        active = self.host.active_model()
        if active is not None and parse_version(m.version) < parse_version(active.version) and not d.allow_downgrade:
            shutil.rmtree(work, ignore_errors=True)
            raise UpdateFailed(f"downgrade refused: {m.version} is lower than the running {active.version} "
                               "(push with --allow-downgrade to roll back on purpose)")
        if path != stored:
            stored, _ = self.host.store.add(path, move=True, sha256=d.sha256,
                                            name=f"{m.name}-{m.version}-{m.target.get('name')}.edgepack")
        shutil.rmtree(work, ignore_errors=True)
        self.record.candidate = {"bundle": str(stored.relative_to(self.host.store.root)), "sha256": d.sha256,
                                 "version": m.version}
        return State.STAGING

    def _staging(self, d: Desired) -> State:
        cand = self.record.candidate
        try:
            model = self.host.load(self.host.store.root / cand["bundle"])  # verify, warm up, golden check
        except Exception as e:  # a model that cannot load or raises in warm-up is never activated
            raise UpdateFailed(f"staging failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        budget = d.staging_max_p95_ms
        if budget:
            feeds = model.runtime.sample_inputs()
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                model.infer(feeds)
                times.append((time.perf_counter() - t0) * 1000)
            p95 = float(np.percentile(times, 95))
            if p95 > budget:
                model.close()
                raise UpdateFailed(f"staging: p95 latency {p95:.2f} ms over the budget of {budget} ms")
        self._candidate_model = model
        return State.SWITCHING

    def _switching(self, d: Desired) -> State:
        if self._candidate_model is None:  # resumed after a restart: stage again
            return State.STAGING
        old = self.host.active_model()
        st = self.host.store.read_state()
        self.record.previous = ({"bundle": st.get("bundle"), "sha256": st.get("sha256"),
                                 "version": old.version if old else None} if st.get("bundle") else None)
        self._persist()
        cand = self.record.candidate
        self.host.store.activate(self.host.store.root / cand["bundle"], cand["sha256"])
        self._candidate_model.watch(True)
        self._previous_model = self.host.swap(self._candidate_model)  # one reference swap
        self._candidate_model = None
        return State.PROBATION

    def _probation(self, d: Desired) -> State:
        model = self.host.active_model()
        if model is None or self._previous_model is None and self.record.previous:
            # resumed without the old model in memory: recover() handles restarts; be safe
            return self._rollback("probation lost its previous model")
        p = d.probation
        self.host.status_changed()
        t0 = time.monotonic()
        next_probe = t0
        while not self._stop.is_set():
            h = model.health_snapshot()
            if h["nonfinite"]:
                return self._rollback(f"{h['nonfinite']} output(s) with NaN/Inf during probation")
            if h["requests"] >= 5 and h["errors"] / h["requests"] > p.max_error_rate:
                return self._rollback(f"error rate {h['errors']}/{h['requests']} over {p.max_error_rate:.0%}")
            if p.max_p95_ms and h["p95_ms"] is not None and h["requests"] >= 20 and h["p95_ms"] > p.max_p95_ms:
                return self._rollback(f"p95 latency {h['p95_ms']:.2f} ms over the budget of {p.max_p95_ms} ms")
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + 1.0
                try:
                    res = model.check_golden()
                except Exception as e:
                    return self._rollback(f"golden probe raised {type(e).__name__}: {e}")
                if not res["ok"]:
                    return self._rollback(f"golden probe off by {res['max_excess_error']:.4g}")
            if time.monotonic() - t0 >= p.seconds or h["requests"] >= p.requests:
                break
            time.sleep(0.1)
        model.watch(False)
        old, self._previous_model = self._previous_model, None
        if old is not None:
            old.close()  # waits for requests still running on it
        self._prune()
        self._end(State.COMMITTED, None)
        return State.COMMITTED

    def _rollback(self, reason: str) -> State:
        prev = self.record.previous
        bad = self.host.active_model()
        if prev:
            self.host.store.activate(self.host.store.root / prev["bundle"], prev["sha256"])
        if self._previous_model is not None:
            self.host.swap(self._previous_model)
            self._previous_model = None
        elif prev:
            self.host.swap(self.host.load(self.host.store.root / prev["bundle"]))
        else:  # the device had no model before this update: it goes back to serving none
            self.host.store.write_state({})
            self.host.swap(None)
        if bad is not None:
            bad.close()
        self._end(State.ROLLED_BACK, reason)
        return State.ROLLED_BACK

    # ---- helpers ----
    def _superseded(self) -> bool:
        d = self._desired
        return self._stop.is_set() or (d is not None and d.update_id != self.record.update_id)

    def _abandon(self, reason: str) -> None:
        self._cleanup_candidate()
        self._end(State.FAILED, f"abandoned: {reason}")

    def _cleanup_candidate(self) -> None:
        if self._candidate_model is not None:
            self._candidate_model.close()
            self._candidate_model = None

    def _prune(self) -> None:
        """Keep the active bundle and the previous one (the rollback slot); drop the rest."""
        store = self.host.store
        keep = {Path(store.read_state().get("bundle", "")).name}
        if self.record.previous:
            keep.add(Path(self.record.previous["bundle"]).name)
        for p in store.bundles.glob("*.edgepack"):
            if p.name not in keep:
                p.unlink(missing_ok=True)
                shutil.rmtree(store.model_dir(p.name.split("-")[0]), ignore_errors=True)

    def _progress(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last_progress >= 0.5 or done >= total:
            self._last_progress = now
            self._event(State.DOWNLOADING, progress={"bytes": done, "total": total,
                                                     "percent": round(100 * done / max(total, 1), 1)})

    def _set(self, state: State) -> None:
        self.record.state, self.record.since = state, time.time()
        self._persist()
        self._event(state)

    def _end(self, state: State, error: str | None, note: str | None = None) -> None:
        r = self.record
        r.state, r.error, r.since = state, error, time.time()
        if r.update_id:
            r.ended[r.update_id] = state.value
        self._persist()
        self._event(state, error=error, note=note)
        (log.info if state is State.COMMITTED else log.warning)(
            "update %s %s%s", r.update_id, state.value, f": {error}" if error else "")
        self.host.status_changed()

    def _persist(self) -> None:
        atomic_write(self.path, self.record.to_json())

    def _event(self, state: State, *, error: str | None = None, progress: dict | None = None,
               note: str | None = None) -> None:
        r = self.record
        d = r.desired or {}
        self.host.event({"update_id": r.update_id, "state": state.value, "name": d.get("name"),
                         "version": d.get("version"), "sha256": d.get("sha256"),
                         "from_version": (r.previous or {}).get("version"), "progress": progress,
                         "error": error, "note": note})

    def _inject_fault(self, state: State) -> None:
        delay = self._fault.get(state.value)
        if delay:
            log.warning("fault injection: pausing %.1f s before %s", delay, state.value)
            time.sleep(delay)


def _fault_delays() -> dict[str, float]:
    """EDGEPACK_AGENT_FAULT_DELAY="staging=5,probation=2": pause before entering a state, so
    crash-recovery tests (and operators rehearsing one) can kill the agent at a known point."""
    out = {}
    for item in os.environ.get("EDGEPACK_AGENT_FAULT_DELAY", "").split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            try:
                out[k.strip()] = float(v)
            except ValueError:
                pass
    return out
