"""The update flow as explicit states, persisted so that a crash resumes or rolls back.

      new desired record (accepted by the gate, update_id not seen, bundle differs from the active one)
   IDLE ──────────────► DOWNLOADING ──► VERIFYING ──► STAGING ──► SWITCHING ──► PROBATION ──► COMMITTED
                           │   ▲            │   ▲        │   ▲        │             │
                           │   └ transient  │   └ retry  │   └ retry  │             └──► ROLLED_BACK
                           └────────────────┴────────────┴──► FAILED  └ crash/raise ─────► ROLLED_BACK

   Resume edges after an agent restart (from DATA/update.json): docs/ota.md.
   A pass of the loop that raises (not a handler: the loop itself, or a host call) is retried with
   back-off and an event per attempt; at max_attempts the update in hand ends (FAILED, or
   ROLLED_BACK when live).

What each state does and how it fails (deterministic: FAILED at once; transient or unexpected before
SWITCHING: retried with back-off up to `max_attempts`, a restart counting as one; any failure in
SWITCHING/PROBATION: rolled back, the previous bundle kept on disk): docs/ota.md, "States".
COMMITTED, ROLLED_BACK and FAILED end an update_id through `_end`, the one terminal exit; it is
not retried; a new push is. Clock and host are injected (tests drive every edge with fakes).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from device_agent.ota.delta import fetch_delta
from device_agent.ota.policy import Clock, Host, UpdaterSettings, backoff_delay, parse_fault_delays
from device_agent.ota.record import ENDED, LIVE, RESUMABLE, Record, State
from device_agent.shadow import ShadowRun
from device_agent.ota.transfer import (Cancelled, ChunkFetcher, MqttChunkFetcher, TransferError, TransientError,
                                      fetch_url)
from device_agent.store import atomic_write
from edgebundle.errors import EdgepackError
from edgebundle.interface import interface_diff
from edgebundle.manifest import parse_version
from edgeproto.desired import CdcTransfer, Desired, MqttTransfer
from edgeproto.records import UpdateEvent

__all__ = ["Clock", "Host", "State", "Record", "UpdateFailed", "Updater", "UpdaterSettings", "parse_fault_delays"]
log = logging.getLogger("edgepack.agent.ota")


class UpdateFailed(EdgepackError):
    """Deterministic: retrying this update cannot succeed."""


class Updater:
    def __init__(self, host: Host, data_dir: Path, *, settings: UpdaterSettings = UpdaterSettings(),
                 clock: Clock = Clock(), fetcher: ChunkFetcher | None = None):
        """`fetcher` pulls MQTT transfers: the agent injects the one its MQTT session feeds; without
        one, the updater builds it on `host.mqtt` (None: MQTT transfers fail, URL ones still work)."""
        self.host, self.settings, self.clock = host, settings, clock
        self.path = Path(data_dir) / "update.json"
        self.downloads = Path(data_dir) / "downloads"
        self.record = Record.load(self.path)
        if fetcher is None and host.mqtt is not None:
            fetcher = MqttChunkFetcher(host.mqtt, policy=settings.transfer)
        self.fetcher = fetcher
        self._desired: Desired | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._candidate_model = None
        self._previous_model = None
        self.shadow_run: ShadowRun | None = None  # the shadow phase running now (telemetry reads it)
        self._shadow_figures: dict | None = None  # the last shadow phase's figures, for this update's events
        self._verified = None  # the Bundle VERIFYING checked (staging trusts it: verify once)
        self._retry_at = 0.0
        self._dirty = False  # the record in memory is newer than the one on disk (disk full)
        self._last_progress = 0.0
        self._step_failures = 0  # consecutive passes of the loop that raised
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----
    def recover(self) -> None:
        """Before the agent loads its model: an update cut off while switching or on probation is
        rolled back, so the agent starts on the previous (verified) bundle; one cut off while
        verifying or staging counts an attempt; downloads of other updates are removed. Never raises."""
        r = self.record
        try:
            if r.state in LIVE:
                try:
                    outcome = self._restore_previous()
                except OSError as e:  # disk full: the loop rolls back in memory once the agent runs
                    log.error("cannot restore the previous bundle in active.json: %s", e)
                    return
                self._end(State.ROLLED_BACK, f"the agent restarted during {r.state.value}; {outcome}")
            elif r.state in (State.VERIFYING, State.STAGING, State.SHADOW):
                r.attempts += 1
                if r.attempts >= self.settings.max_attempts:
                    self._fail(f"gave up after {r.attempts} attempts: the agent restarted during {r.state.value} "
                               "each time (does the model crash the runtime?)")
                else:
                    self._set(State.VERIFYING)  # the downloaded file is re-checked from scratch
        except Exception:  # the agent must start whatever the record says
            log.exception("recovering the update record failed")
        self._remove_stale_downloads()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # one loop per updater, however often the agent asks
        self._thread = threading.Thread(target=self._loop, name="ota", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def alive(self) -> bool:
        """For the agent's watchdog: False once the loop's thread has ended (not before it starts)."""
        return self._thread is None or self._thread.is_alive()

    def held(self) -> tuple:
        """The models this update holds besides the serving one (staged candidate, previous model)."""
        return tuple(m for m in (self._candidate_model, self._previous_model) if m is not None)

    def discard(self, wait_s: float = 300.0) -> None:
        """For a removed model: stop, wait for the loop to end (a step in progress finishes), and
        close the models it held."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=wait_s)
        for m in self.held():
            m.close()
        self._candidate_model = self._previous_model = None

    def set_desired(self, d: Desired | None) -> None:
        self._desired = d
        self._wake.set()

    def on_message(self, topic: str, payload: bytes) -> bool:
        return self.fetcher.on_message(topic, payload) if self.fetcher else False

    def summary(self) -> dict:
        r = self.record
        d = r.desired or {}
        return {"state": r.state.value, "update_id": r.update_id, "version": d.get("version"), "error": r.error,
                "previous": r.previous, "attempts": r.attempts, "issued": d.get("issued")}

    # ---- the loop ----
    def _loop(self) -> None:
        while not self._stop.is_set():
            pause = self.tick()
            if pause:
                self._stop.wait(pause)
            self._wake.wait(1.0)
            self._wake.clear()

    def tick(self) -> float:
        """One pass of the loop; returns seconds to pause first (back-off after a raising step).
        A step that keeps raising (a bug, a host call failing every time) is retried with back-off
        and an event each time, and after `max_attempts` the update in hand ends through `_end`."""
        try:
            if self._dirty:
                self._persist_quietly()
            self._step()
            self._step_failures = 0
            return 0.0
        except Exception as e:  # a bug in the loop itself: never let the update thread die
            self._step_failures += 1
            n = self._step_failures
            log.exception("update step failed (%d of %d)", n, self.settings.max_attempts)
            msg = f"the update step raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            try:
                self._step_failed(msg, n)
            except Exception:  # reporting must not take the loop down either
                log.exception("reporting the failed step failed")
            return min(self.settings.backoff_s * 2 ** (n - 1), self.settings.max_backoff_s)

    def _step_failed(self, msg: str, n: int) -> None:
        r, d = self.record, self._desired
        if n < self.settings.max_attempts:
            uid = r.update_id if r.state not in ENDED else (d.update_id if d else None)
            if uid is not None:
                self.host.event(UpdateEvent(update_id=uid, state=r.state.value if r.state not in ENDED else "idle",
                                            error=f"{msg} (attempt {n} of {self.settings.max_attempts})").to_dict())
            return
        self._step_failures = 0
        if r.state in LIVE:
            self._rollback(f"gave up after {n} attempts: {msg}")
        elif r.state in RESUMABLE:
            self._fail(f"gave up after {n} attempts: {msg}")
        elif d is not None and d.update_id not in r.ended:  # it raised before the update even started
            self.record = dataclasses.replace(r, update_id=d.update_id, desired=d.to_dict(), attempts=n)
            self._end(State.FAILED, f"gave up after {n} attempts: {msg}")

    def _step(self) -> None:
        r = self.record
        d = self._desired
        if r.state in LIVE:  # only after a handler failed to finish the live phase: never skip it
            self._rollback(f"the update was interrupted during {r.state.value}")
            return
        if r.state in RESUMABLE:
            if d is not None and d.update_id != r.update_id and not self._stop.is_set():
                self._abandon(f"superseded by update {d.update_id}")
            elif self.clock.mono() >= self._retry_at:
                try:
                    current = Desired.from_dict(r.desired, source="update.json")
                except EdgepackError as e:
                    self._fail(f"the stored update record is unreadable: {str(e).splitlines()[0]}")
                    return
                self._run(current)
            return
        if d is None or d.update_id in r.ended:
            return
        active = self.host.active_model()
        if active is not None and active.bundle_sha256 == d.sha256:
            self.record = dataclasses.replace(r, update_id=d.update_id, desired=d.to_dict(), attempts=0)
            self._end(State.COMMITTED, None, note="already running this bundle")
            return
        new = Record(state=State.DOWNLOADING, update_id=d.update_id, desired=d.to_dict(), since=self.clock.wall(),
                     ended=r.ended)
        try:
            self._write(new)
        except OSError as e:
            log.error("cannot start update %s: %s", d.update_id, e)
            self.record = new
            self._fail(f"cannot write the update record: {e}")
            return
        self.record = new
        self._event(State.DOWNLOADING)
        self._run(d)

    def _run(self, d: Desired) -> None:
        handlers = {State.DOWNLOADING: self._downloading, State.VERIFYING: self._verifying,
                    State.STAGING: self._staging, State.SHADOW: self._shadow, State.SWITCHING: self._switching,
                    State.PROBATION: self._probation}
        while self.record.state in handlers and not self._stop.is_set():
            state = self.record.state
            self._inject_fault(state)
            try:
                nxt = handlers[state](d)
                if nxt is None or nxt in ENDED:  # waiting (superseded, stopping) or already ended
                    return
                self._set(nxt)
            except UpdateFailed as e:
                if state in LIVE:
                    self._rollback(str(e).split("\n")[0])
                else:
                    self._fail(str(e).split("\n")[0])
                return
            except Exception as e:  # transient (broker away, disk full) or unexpected: bounded, never skipped
                transient = isinstance(e, (TransientError, OSError))
                if not transient:
                    log.exception("update %s: %s raised", self.record.update_id, state.value)
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if state in LIVE:
                    self._rollback(f"{state.value} failed ({msg})")
                else:
                    self._retry(str(e).splitlines()[0] if transient and str(e) else msg)
                return

    # ---- state handlers: each returns the next state (None = wait) ----
    def _downloading(self, d: Desired) -> State | None:
        self._refuse_downgrade(d.version, d)  # on the record's word, before the first byte
        work = self._workdir(d.sha256)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if isinstance(d.transfer, (MqttTransfer, CdcTransfer)) and self.fetcher is None:
                raise UpdateFailed("MQTT transfer needs a broker connection")
            if isinstance(d.transfer, CdcTransfer):  # a delta: what the slot's bundles hold is copied
                fetch_delta(self.fetcher, d, work, local=self.host.store, progress=self._progress,
                            cancelled=self._superseded, policy=self.settings.transfer)
            elif isinstance(d.transfer, MqttTransfer):
                self.fetcher.fetch(d, work, progress=self._progress, cancelled=self._superseded)
            else:
                fetch_url(d, work, progress=self._progress, cancelled=self._superseded, policy=self.settings.transfer)
        except Cancelled:
            if not self._stop.is_set():
                self._abandon(f"superseded by update {self._desired.update_id if self._desired else '?'}")
            return None
        except TransferError as e:
            shutil.rmtree(work, ignore_errors=True)  # nothing half-written stays behind
            raise UpdateFailed(str(e)) from None
        return State.VERIFYING

    def _refuse_downgrade(self, version: str, d: Desired) -> None:
        active = self.host.active_model()
        running = active.version_of(d.name) if active is not None else None
        if running is not None and parse_version(version) < parse_version(running) and not d.allow_downgrade:
            raise UpdateFailed(f"downgrade refused: {version} is lower than the running {running} "
                               "(push with --allow-downgrade to roll back on purpose)")

    def _verifying(self, d: Desired) -> State:
        work = self._workdir(d.sha256)
        path = work / "bundle.edgepack"
        cand = self.record.candidate
        stored = self.host.store.path(cand["bundle"]) if cand and cand.get("sha256") == d.sha256 else None
        if not path.is_file():
            if stored is None or not stored.is_file():
                return State.DOWNLOADING
            path = stored  # resumed after a restart: the file already moved into the store
        try:
            bundle = self.host.verify(path, sha256=d.sha256)
        except EdgepackError as e:
            shutil.rmtree(work, ignore_errors=True)
            raise UpdateFailed(f"verification failed: {str(e).splitlines()[0]}") from None
        m = bundle.manifest
        why = d.mismatch(m, named_by="the desired record")
        if why:
            shutil.rmtree(work, ignore_errors=True)
            raise UpdateFailed(why)
        try:
            self._refuse_downgrade(m.version, d)  # the manifest's own word (it matches the record's)
        except UpdateFailed:
            shutil.rmtree(work, ignore_errors=True)
            raise
        if path != stored:
            stored, _ = self.host.store.add(path, move=True, sha256=d.sha256,
                                            name=f"{m.name}-{m.version}-{m.target.get('name')}.edgepack")
            bundle = dataclasses.replace(bundle, path=stored)
        shutil.rmtree(work, ignore_errors=True)
        self.record.candidate = {"bundle": self.host.store.ref(stored), "sha256": d.sha256, "version": m.version}
        self._verified = bundle
        return State.STAGING

    def _staging(self, d: Desired) -> State:
        cand = self.record.candidate
        if not cand:
            return State.VERIFYING
        if self._candidate_model is not None:  # staged before, then the step failed: not twice in memory
            self._candidate_model.close()
            self._candidate_model = None
        verified = self._verified if self._verified is not None and self._verified.path.name == Path(
            cand["bundle"]).name else None
        try:
            model = self.host.load(self.host.store.path(cand["bundle"]), verified=verified)  # warm-up, golden check
        except Exception as e:  # a model that cannot load or raises in warm-up is never activated
            raise UpdateFailed(f"staging failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        active = self.host.active_model()
        changes = interface_diff(active.manifest, model.manifest) if active is not None else []
        if changes and not d.allow_interface_change:  # clients of the running model would break
            model.close()
            raise UpdateFailed(f"interface change refused: {'; '.join(changes)} (clients of {active.version} would "
                               "fail; push with --allow-interface-change once they are ready)")
        if changes:
            log.warning("update %s changes the model interface (allowed by the record): %s", d.update_id,
                        "; ".join(changes))
        budget = d.staging_max_p95_ms
        if budget:  # timed on the build's own samples: random values crash models taking ids or rates
            golden = model.golden_inputs()
            feeds = golden[0] if golden else model.runtime.sample_inputs()
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
        return State.SHADOW if d.shadow is not None and active is not None else State.SWITCHING

    def _shadow(self, d: Desired) -> State | None:
        """The candidate answers a sampled share of live requests beside the serving model, off the
        request path, for `shadow.seconds`; it is switched in only if it agrees (never served a request)."""
        if self._candidate_model is None:  # resumed after a restart or a retry: stage again
            return State.STAGING
        active = self.host.active_model()
        if active is None or d.shadow is None:
            return State.SWITCHING
        run = ShadowRun(self._candidate_model, d.shadow, output=active.manifest.outputs[0].name,
                        labelled=active.manifest.labels_file is not None,
                        threads=getattr(self.host, "threads", None) or os.cpu_count() or 1).start()
        self.shadow_run, active.tap = run, run.offer
        try:
            end = self.clock.mono() + d.shadow.seconds
            while self.clock.mono() < end and not self._superseded():
                self._stop.wait(0.2)
        finally:
            active.tap = None
            run.stop()
            self.shadow_run = None
        if self._superseded():
            return None  # stopping (a restart stages and shadows again) or a newer update
        self._shadow_figures = run.summary()
        why = run.verdict()
        if why:
            raise UpdateFailed(why)
        log.info("update %s: the candidate agrees in shadow", d.update_id, extra={"fields": self._shadow_figures})
        return State.SWITCHING

    def _switching(self, d: Desired) -> State:
        if self._candidate_model is None:  # resumed after a restart or a retry: stage again
            return State.STAGING
        old = self.host.active_model()
        slot = self.host.store.active_slot()
        self.record.previous = {**slot, "version": old.version if old else None} if slot else None
        self._write(self.record)  # before active.json changes: a crash from here on rolls back
        cand = self.record.candidate
        self.host.store.activate(self.host.store.path(cand["bundle"]), cand["sha256"],
                                 base=self._candidate_model.base_slot)  # an adapter: the bundle it runs on
        self._candidate_model.watch(True, reference=old)
        self._previous_model = self.host.swap(self._candidate_model)  # one reference swap
        self._candidate_model = None
        return State.PROBATION

    def _probation(self, d: Desired) -> State:
        model = self.host.active_model()
        if model is None or self._previous_model is None and self.record.previous:
            return self._rollback("probation lost its previous model")
        p = d.probation
        self.host.status_changed()
        t0 = self.clock.mono()
        next_probe = t0
        while not self._stop.is_set():
            h = model.health_snapshot()
            if h["nonfinite"]:
                return self._rollback(f"{h['nonfinite']} output(s) with NaN/Inf during probation")
            if h["requests"] >= 5 and h["errors"] / h["requests"] > p.max_error_rate:
                return self._rollback(f"error rate {h['errors']}/{h['requests']} over {p.max_error_rate:.0%}")
            if p.max_p95_ms and h["p95_ms"] is not None and h["requests"] >= 20 and h["p95_ms"] > p.max_p95_ms:
                return self._rollback(f"p95 latency {h['p95_ms']:.2f} ms over the budget of {p.max_p95_ms} ms")
            if self.clock.mono() >= next_probe:
                next_probe = self.clock.mono() + 1.0
                try:
                    res = model.check_golden()
                except Exception as e:
                    return self._rollback(f"golden probe raised {type(e).__name__}: {e}")
                if not res["ok"]:
                    return self._rollback(f"golden probe off by {res['max_excess_error']:.4g}")
            if self.clock.mono() - t0 >= p.seconds or h["requests"] >= p.requests:
                break
            self._stop.wait(0.1)
        if self._stop.is_set():
            return None  # stopping: a restart finds PROBATION and rolls back
        model.watch(False)
        old, self._previous_model = self._previous_model, None
        if old is not None:
            old.close()  # waits for requests still running on it
        self._prune()
        self._end(State.COMMITTED, None)
        return State.COMMITTED

    def _rollback(self, reason: str) -> State:
        """Back to the previous model (or none, when the device had none before). Never raises.
        If the switch never happened (it failed half-way), the old model is still serving and
        only the staged candidate is closed."""
        active = self.host.active_model()
        cand = (self.record.candidate or {}).get("sha256")
        switched = active is not None and cand is not None and active.bundle_sha256 == cand
        self._cleanup_candidate()
        try:
            self._restore_previous()
        except Exception as e:  # active.json could not be written (disk full): a restart rolls back again
            log.error("rollback could not restore active.json: %s", e)
        if switched or (active is None and self.record.previous):
            try:
                prev = self.record.previous
                if self._previous_model is not None:
                    self.host.swap(self._previous_model)
                    self._previous_model = None
                elif prev:
                    self.host.swap(self.host.load(self.host.store.path(prev["bundle"])))
                else:  # the device had no model before this update: it goes back to serving none
                    self.host.swap(None)
                if active is not None and active is not self.host.active_model():
                    active.close()
            except Exception as e:
                log.exception("rollback could not swap models back")
                reason = f"{reason}; rolling back failed too ({type(e).__name__}: {e})"
        self._end(State.ROLLED_BACK, reason)
        return State.ROLLED_BACK

    def _restore_previous(self) -> str:
        """active.json back to the record's previous bundle, or empty when the device had none;
        untouched when it does not name the candidate (the switch never reached it). Says which."""
        prev = self.record.previous
        store = self.host.store
        cand = (self.record.candidate or {}).get("sha256")
        if cand is None or store.active_sha256() != cand:
            return "the switch had not happened: the previous model stays"
        if prev and store.path(prev["bundle"]).is_file():
            store.activate(store.path(prev["bundle"]), prev["sha256"], base=prev.get("base"))
            return f"rolled back to {prev.get('version')}"
        store.deactivate()
        return "rolled back to no model (the device had none before)"

    # ---- terminal and intermediate transitions ----
    def _fail(self, reason: str) -> None:
        self._cleanup_candidate()
        if self.record.desired and isinstance(self.record.desired.get("sha256"), str):
            shutil.rmtree(self._workdir(self.record.desired["sha256"]), ignore_errors=True)
        self._end(State.FAILED, reason)

    def _retry(self, error: str) -> None:
        """A transient failure: try again after a back-off, at most max_attempts times in all."""
        r = self.record
        r.attempts += 1
        if r.attempts >= self.settings.max_attempts:
            self._fail(f"gave up after {r.attempts} attempts: {error}")
            return
        delay = backoff_delay(r.attempts, base_s=self.settings.backoff_s, cap_s=self.settings.max_backoff_s)
        self._retry_at = self.clock.mono() + delay
        self._persist_quietly()
        log.warning("update %s: %s (attempt %d of %d; retrying in %.0f s)", r.update_id, error, r.attempts,
                    self.settings.max_attempts, delay)
        self._event(r.state, error=f"retrying in {delay:.0f} s (attempt {r.attempts} of "
                                   f"{self.settings.max_attempts}): {error}")

    def _abandon(self, reason: str) -> None:
        self._fail(f"abandoned: {reason}")

    def _end(self, state: State, error: str | None, note: str | None = None) -> None:
        """The one exit of an update: COMMITTED, ROLLED_BACK or FAILED."""
        r = self.record
        r.state, r.error, r.since = state, error, self.clock.wall()
        if r.update_id:
            r.end(r.update_id, state)
        self._persist_quietly()
        self._event(state, error=error, note=note)
        (log.info if state is State.COMMITTED else log.warning)(
            "update %s %s%s", r.update_id, state.value, f": {error}" if error else "")
        self.host.status_changed()

    def _set(self, state: State) -> None:
        """Persist the next state first; only then is it the state (a failed write changes nothing)."""
        new = dataclasses.replace(self.record, state=state, since=self.clock.wall())
        self._write(new)
        self.record = new
        self._event(state)

    def _write(self, record: Record) -> None:
        atomic_write(self.path, record.to_json())
        self._dirty = False

    def _persist_quietly(self) -> None:
        try:
            self._write(self.record)
        except OSError as e:  # disk full: the loop writes it again; the agent keeps serving
            self._dirty = True
            log.error("cannot write %s: %s (will retry)", self.path, e)

    # ---- helpers ----
    def _workdir(self, sha256: str) -> Path:
        return self.downloads / sha256[:16]

    def _remove_stale_downloads(self) -> None:
        """Downloads that belong to no update in progress (superseded, failed before a restart)."""
        keep = None
        if self.record.state in (State.DOWNLOADING, State.VERIFYING) and self.record.desired:
            keep = str(self.record.desired.get("sha256", ""))[:16]
        try:
            for p in self.downloads.iterdir() if self.downloads.is_dir() else ():
                if p.name != keep:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        except OSError as e:
            log.warning("cannot clean %s: %s", self.downloads, e)

    def _superseded(self) -> bool:
        d = self._desired
        return self._stop.is_set() or (d is not None and d.update_id != self.record.update_id)

    def _cleanup_candidate(self) -> None:
        if self._candidate_model is not None:
            self._candidate_model.close()
            self._candidate_model = None
        self._verified = None

    def _prune(self) -> None:
        """Keep the active bundle and the previous one (the rollback slot), and the bases adapters among them
        run on; drop the rest."""
        slots = [s for s in (self.host.store.active_slot(), self.record.previous) if s]
        self.host.store.prune({ref for s in slots for ref in (s["bundle"], (s.get("base") or {}).get("bundle")) if ref})

    def _progress(self, done: int, total: int, transfer: dict | None = None) -> None:
        """A downloading event at most every 0.5 s, and the last one always: `transfer` (a delta)
        says how many of the bytes were fetched and how many the device already had."""
        now = self.clock.mono()
        if now - self._last_progress >= 0.5 or done >= total:
            self._last_progress = now
            self._event(State.DOWNLOADING, progress={"bytes": done, "total": total,
                                                     "percent": round(100 * done / max(total, 1), 1),
                                                     **(transfer or {})})

    def _event(self, state: State, *, error: str | None = None, progress: dict | None = None,
               note: str | None = None) -> None:
        r = self.record
        d = r.desired or {}
        fig = self._shadow_figures if state in (State.SWITCHING, *ENDED) else None
        self.host.event(UpdateEvent(update_id=r.update_id, state=state.value, name=d.get("name"),
                                    version=d.get("version"), sha256=d.get("sha256"),
                                    from_version=(r.previous or {}).get("version"), progress=progress,
                                    error=error, note=note, shadow=fig).to_dict())
        if state in ENDED:
            self._shadow_figures = None

    def _inject_fault(self, state: State) -> None:
        delay = self.settings.fault_delays.get(state.value)
        if delay:
            log.warning("fault injection: pausing %.1f s before %s", delay, state.value)
            self._stop.wait(delay)
