"""Staged rollouts: a bundle goes to a group in waves, each soaked and judged by gates on the
wave's devices (update failures, and model KPIs from telemetry against each device's own
pre-update readings). A failing gate stops the rollout: the wave goes back to the previous
version, the rest of the group is never touched.

Mechanics, all over the existing protocol (agents need nothing new): a wave's devices get
per-device desired records (device beats group); a failed wave's devices that switched get a
per-device record for the previous version (allow_downgrade); at the end the group's record
holds the new version and the per-device records are cleared (devices joining later get it).
The rollout record is retained (fleet.rollout_state); one controller drives it at a time, holding
a lease that it renews; a controller that dies leaves the lease to expire and `resume` goes on."""
from __future__ import annotations

import collections
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from edgeproto.broker import BrokerConfig
from edgeproto.desired import parse_transfer
from edgeproto.mqtt import dumps
from edgeproto.records import FINAL_STATES, TelemetryWindow
from edgeproto.topics import Topics
from fleet.conn import Collector, parse_json
from fleet.errors import RolloutError, RolloutStopped
from fleet.gates import Window, baseline_p95, judge_device, judge_wave, plan_waves
from fleet.push import (Prepared, Signer, interface_warnings, make_record, prepare, publish_chunks,
                        publish_record)
from fleet.rollout_state import (ACTIVE, RolloutRecord, RolloutSettings, RolloutStatus, Wave, WaveState,
                                 check_id)
from fleet.status import FleetTable

Say = Callable[[str], None]
HISTORY = 32  # telemetry windows kept per device


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _bundle_dict(p: Prepared) -> dict:
    return {"name": p.name, "version": p.version, "sha256": p.sha256, "size": p.size, "interface": p.interface,
            "transfer": p.transfer.to_dict(), "bundle_signature": p.bundle_signature}


def _prepared(d: dict) -> Prepared:
    return Prepared(path=Path("-"), name=d["name"], version=d["version"], sha256=d["sha256"], size=d["size"],
                    transfer=parse_transfer(d["transfer"], sha256=d["sha256"], size=d["size"]),
                    interface=d.get("interface") or "", bundle_signature=d.get("bundle_signature"))


class Controller:
    """One connection that watches status, telemetry, events and the rollout's own topics, and
    drives one rollout. Use start() for a new rollout, or resume(); both return the final record
    or raise RolloutStopped when a gate stopped it."""

    def __init__(self, broker: BrokerConfig, rollout_id: str, *, signer: Signer = Signer(), say: Say = lambda _m: None,
                 holder: str | None = None, mono: Callable[[], float] = time.monotonic):
        self.broker, self.id, self.signer, self.say, self.mono = broker, check_id(rollout_id), signer, say, mono
        self.topics = Topics(broker.topic_prefix)
        self.holder = holder or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.table = FleetTable(self.topics)
        self._lock = threading.Lock()
        self.windows: dict[str, collections.deque] = {}  # device -> (received mono, version, Window)
        self.outcomes: dict[str, dict[str, str]] = {}  # update_id -> device -> final state
        self.remote: dict | None = None
        self.lease: dict | None = None
        self.control: dict | None = None
        self.group_desired: dict | None = None
        self._group_topic: str | None = None
        self._lease_renewed = 0.0
        self.record: RolloutRecord | None = None
        self.connected_at = mono()
        subs = [self.topics.status(), self.topics.telemetry(), self.topics.events(), self.topics.rollout(self.id),
                self.topics.rollout_lease(self.id), self.topics.rollout_control(self.id)]
        self.conn = Collector(broker, subs, name=f"rollout-{self.id}"[:40], on_message=self._on)

    # ---- what arrives ----
    def _on(self, topic: str, payload: bytes) -> None:
        t = self.topics
        if topic == t.rollout(self.id):
            self.remote = parse_json(payload)
        elif topic == t.rollout_lease(self.id):
            self.lease = parse_json(payload)
        elif topic == t.rollout_control(self.id):
            self.control = parse_json(payload)
        elif topic == self._group_topic:
            self.group_desired = parse_json(payload)
        else:
            dev = self.table.feed(topic, payload)
            hit = t.parse_device(topic)
            if dev is None or hit is None:
                if hit and hit[1] == "events":
                    self._event(hit[0], payload)
                return
            if hit[1] == "telemetry":
                tel = TelemetryWindow.from_dict(dev, parse_json(payload))
                w = Window(count=tel.count, errors=tel.errors, nonfinite=tel.nonfinite, p95_ms=tel.p95_ms,
                           fields={g: tel.value(g) for g in self._field_paths()})
                with self._lock:
                    self.windows.setdefault(dev, collections.deque(maxlen=HISTORY)).append(
                        (self.mono(), tel.model_version, w))
            elif hit[1] == "status":
                e = self.table.get(dev)
                u = e.status.update if e else None
                if u and u.update_id and u.state in FINAL_STATES:
                    with self._lock:
                        self.outcomes.setdefault(u.update_id, {})[dev] = u.state

    def _event(self, dev: str, payload: bytes) -> None:
        doc = parse_json(payload)
        if isinstance(doc, dict) and doc.get("state") in FINAL_STATES and isinstance(doc.get("update_id"), str):
            with self._lock:
                self.outcomes.setdefault(doc["update_id"], {})[dev] = doc["state"]

    def _field_paths(self) -> list[str]:
        r = self.record
        return [g.path for g in r.settings_obj.gates.fields] if r is not None else []

    # ---- lease and record ----
    def _publish(self, topic: str, doc: dict | None) -> None:
        if not self.conn.client.publish_wait(topic, dumps(doc) if doc is not None else b"", qos=1, retain=True,
                                             timeout=30):
            raise RolloutError(f"the broker did not acknowledge {topic}")

    def save(self) -> None:
        r = self.record
        r.updated, r.controller = time.time(), self.holder
        self._publish(self.topics.rollout(self.id), r.to_dict())

    def acquire(self, *, wait_s: float) -> None:
        """Take the lease: free, expired, or ours. Waits up to `wait_s` for a dead controller's lease
        to expire. Retained messages carry no compare-and-set: after writing, the lease is read back
        once more so that two controllers starting together see one winner."""
        deadline = self.mono() + wait_s
        ttl = self.record.settings_obj.lease_s if self.record else 30.0
        time.sleep(0.3)  # the retained lease follows the SUBACK
        while True:
            cur = self.lease
            if not cur or cur.get("holder") == self.holder or float(cur.get("expires", 0)) < time.time():
                self._publish(self.topics.rollout_lease(self.id), {"holder": self.holder, "expires": time.time() + ttl})
                time.sleep(0.5)
                if (self.lease or {}).get("holder") == self.holder:
                    self._lease_renewed = self.mono()
                    return
            left = float((self.lease or {}).get("expires", 0)) - time.time()
            if self.mono() > deadline:
                raise RolloutError(f"rollout {self.id} is driven by {(self.lease or {}).get('holder')} (lease for "
                                   f"another {max(left, 0):.0f} s)",
                                   hint="a controller that died leaves its lease to expire; run resume again then")
            self.say(f"waiting for the lease of {(self.lease or {}).get('holder')} to expire ({max(left, 0):.0f} s)")
            time.sleep(min(max(left, 0.5), 2.0))

    def _renew(self) -> None:
        ttl = self.record.settings_obj.lease_s
        if self.mono() - self._lease_renewed >= ttl / 3:
            holder = (self.lease or {}).get("holder")
            if holder not in (None, self.holder) and float(self.lease.get("expires", 0)) > time.time():
                raise RolloutError(f"rollout {self.id}: the lease was taken over by {holder}; this controller stops")
            self._publish(self.topics.rollout_lease(self.id), {"holder": self.holder, "expires": time.time() + ttl})
            self._lease_renewed = self.mono()

    def release(self) -> None:
        try:
            if (self.lease or {}).get("holder") == self.holder:
                self._publish(self.topics.rollout_lease(self.id), None)
        finally:
            self.conn.stop()

    def load(self, *, timeout: float = 5.0) -> RolloutRecord:
        deadline = self.mono() + timeout
        while self.remote is None and self.mono() < deadline:
            time.sleep(0.05)
        if self.remote is None:
            raise RolloutError(f"no rollout {self.id!r} on the broker", hint="list them with: edgepack rollout status")
        self.record = RolloutRecord.from_dict(self.remote)
        return self.record

    # ---- start ----
    def create(self, bundle: Path, *, group: str, settings: RolloutSettings, previous_bundle: Path | None = None,
               chunk_size: int = 1 << 20, settle_s: float = 5.0) -> RolloutRecord:
        """Plan the waves from the group's devices (their retained status), publish the chunks,
        and write the record. Nothing is sent to any device yet."""
        self._group_topic = self.topics.group_desired(group)
        self.conn.client.subscribe_wait(self._group_topic)
        self._settle(settle_s)
        if self.remote is not None and self.remote.get("status") in [s.value for s in ACTIVE]:
            raise RolloutError(f"rollout {self.id} exists and is {self.remote.get('status')}",
                               hint=f"edgepack rollout resume {self.id}, or abort it first")
        devices = sorted(e.status.device_id for e in self.table.entries(group=group))
        if not devices:
            raise RolloutError(f"no device of group {group!r} has reported a status",
                               hint="check the group name and that the devices are connected")
        p = prepare(bundle, self.topics, chunk_size=chunk_size)
        prev = self._previous(p, group, previous_bundle, chunk_size)
        waves = plan_waves(devices, settings.waves)
        for msg in interface_warnings(self.table, p, devices=devices, allowed=settings.allow_interface_change):
            self.say(f"warning: {msg}")
        publish_chunks(self.conn.client, p)
        self.record = RolloutRecord(id=self.id, group=group, bundle=_bundle_dict(p), previous=prev,
                                    settings=settings.to_dict(), waves=[Wave(devices=w) for w in waves])
        self.acquire(wait_s=0)
        self._publish(self.topics.rollout_control(self.id), None)
        self.save()
        self.say(f"rollout {self.id}: {p.name} {p.version} to {len(devices)} device(s) of {group} in waves of "
                 f"{[len(w) for w in waves]}")
        return self.record

    def _previous(self, p: Prepared, group: str, previous_bundle: Path | None, chunk_size: int) -> dict:
        if previous_bundle is not None:
            prev = prepare(previous_bundle, self.topics, chunk_size=chunk_size)
            publish_chunks(self.conn.client, prev)
            return _bundle_dict(prev)
        g = self.group_desired
        if isinstance(g, dict) and g.get("sha256") and g.get("sha256") != p.sha256:
            return {k: g.get(k) for k in ("name", "version", "sha256", "size", "transfer")} | {
                "interface": None, "bundle_signature": g.get("signature")}
        if isinstance(g, dict) and g.get("sha256") == p.sha256:
            raise RolloutError(f"group {group!r} already has {p.name} {p.version} as its desired model")
        raise RolloutError(f"group {group!r} has no desired record to go back to if a wave fails",
                           hint="pass --previous BUNDLE (the bundle the group runs now)")

    def _settle(self, max_s: float) -> None:
        deadline, last, seen = self.mono() + max_s, self.mono(), self.table.version
        while self.mono() < deadline:
            time.sleep(0.05)
            if self.table.version != seen:
                seen, last = self.table.version, self.mono()
            elif self.mono() - last >= 0.3:
                return

    # ---- drive ----
    def run(self) -> RolloutRecord:
        """Drive the record from where it stands to done, stopped, paused or aborted."""
        r = self.record
        if r.status == RolloutStatus.PAUSED.value:
            r.status = RolloutStatus.RUNNING.value
        if self._group_topic is None:
            self._group_topic = self.topics.group_desired(r.group)
            self.conn.client.subscribe_wait(self._group_topic)
        s = r.settings_obj
        while r.current < len(r.waves):
            w = r.waves[r.current]
            if self._control_requested():
                return r
            if w.state == WaveState.PENDING.value:
                self._start_wave(r, w, s)
            if w.state == WaveState.UPDATING.value:
                if not self._wait_updates(r, w, s):
                    return r
            if w.state == WaveState.SOAKING.value:
                if not self._soak(r, w, s):
                    return r
            if w.state == WaveState.ROLLING_BACK.value:
                self._rollback_wave(r, w, s)
                return self._stop(r, RolloutStatus.STOPPED, r.reason or "a gate failed")
            if w.state == WaveState.PASSED.value:
                r.current += 1
                self.save()
        self._finish(r, s)
        return r

    def _start_wave(self, r: RolloutRecord, w: Wave, s: RolloutSettings) -> None:
        n = r.current + 1
        left = s.baseline_s - (self.mono() - self.connected_at)
        if left > 0:  # each device's own p95 before the update needs some telemetry
            self.say(f"wave {n}: listening {left:.0f} s for pre-update telemetry")
            self._sleep(left)
        version = r.bundle["version"]
        with self._lock:
            for dev in w.devices:
                pre = [win for _t, v, win in self.windows.get(dev, ()) if v != version]
                r.baseline[dev] = baseline_p95(pre[-10:])
        w.update_id, w.started, w.state = f"{r.id}-w{n}", time.time(), WaveState.UPDATING.value
        self.save()  # before the records: a controller killed now resumes by re-sending them
        p, issued = _prepared(r.bundle), _now_iso()
        for dev in w.devices:
            target = f"devices/{dev}"
            doc = make_record(p, target=target, update_id=w.update_id, issued=issued, signer=self.signer,
                              allow_interface_change=s.allow_interface_change, probation=s.probation)
            publish_record(self.conn.client, self.topics.target_desired(target), doc)
        self.say(f"wave {n}: {len(w.devices)} device(s) updating to {version}")

    def _wait_updates(self, r: RolloutRecord, w: Wave, s: RolloutSettings) -> bool:
        n, t0 = r.current + 1, self.mono()
        deadline = t0 + max(s.wave_timeout_s - (time.time() - (w.started or time.time())), 0)
        allowed = s.gates.allowed_failures(len(w.devices))
        while True:
            with self._lock:
                got = dict(self.outcomes.get(w.update_id, {}))
            w.outcomes = {d: got[d] for d in w.devices if d in got}
            bad = [d for d, o in w.outcomes.items() if o != "committed"]
            if len(bad) > allowed:
                return self._fail(r, w, f"wave {n}: {len(bad)} device(s) did not update ("
                                  + ", ".join(f"{d}: {w.outcomes[d]}" for d in sorted(bad)[:5]) + f"; at most {allowed})")
            if len(w.outcomes) == len(w.devices) or self.mono() > deadline:
                break
            if self._control_requested():
                return False
            self._renew()
            time.sleep(0.2)
        for d in w.devices:
            w.outcomes.setdefault(d, "timed_out")
        w.times["update_s"] = round(self.mono() - t0, 2)
        bad = [d for d, o in w.outcomes.items() if o != "committed"]
        if len(bad) > allowed:
            return self._fail(r, w, f"wave {n}: {len(bad)} device(s) did not update in time or failed ("
                              + ", ".join(f"{d}: {w.outcomes[d]}" for d in sorted(bad)[:5]) + f"; at most {allowed})")
        w.state = WaveState.SOAKING.value
        self.save()
        return True

    def _soak(self, r: RolloutRecord, w: Wave, s: RolloutSettings) -> bool:
        """Soak from now (a resumed controller soaks the wave again: telemetry is not retained)."""
        n, start = r.current + 1, self.mono()
        self.say(f"wave {n}: soaking {s.soak_s:.0f} s")
        while self.mono() - start < s.soak_s:
            if self._control_requested():
                return False
            self._renew()
            time.sleep(min(0.5, max(s.soak_s - (self.mono() - start), 0.01)))
        version = r.bundle["version"]
        with self._lock:
            for dev in w.devices:
                wins = [win for t, v, win in self.windows.get(dev, ()) if v == version and t >= start]
                w.readings[dev] = judge_device(outcome=w.outcomes.get(dev), baseline=r.baseline.get(dev),
                                               windows=wins, gates=s.gates)
        w.times["soak_s"] = round(self.mono() - start, 2)
        ok, summary = judge_wave(w.readings, s.gates)
        w.summary = summary
        if not ok:
            return self._fail(r, w, f"wave {n}: {summary}")
        w.state = WaveState.PASSED.value
        self.save()
        self.say(f"wave {n}: passed ({summary})")
        return True

    def _fail(self, r: RolloutRecord, w: Wave, reason: str) -> bool:
        self.say(f"stopping: {reason}")
        r.reason, w.state = reason, WaveState.ROLLING_BACK.value
        self.save()
        self._rollback_wave(r, w, r.settings_obj)
        self._stop(r, RolloutStatus.STOPPED, reason)
        return False

    def _rollback_wave(self, r: RolloutRecord, w: Wave, s: RolloutSettings) -> None:
        """Devices of the wave that run the new version get a record for the previous one; then the
        wave's per-device records are cleared (they fall back to the group's record)."""
        self._send_back(r, w.devices, f"{w.update_id or r.id}-back", s)
        w.state = WaveState.ROLLED_BACK.value
        self.save()

    def _send_back(self, r: RolloutRecord, devices: list[str], update_id: str, s: RolloutSettings) -> None:
        t0, new = self.mono(), r.bundle["sha256"]
        switched = [d for d in devices if (e := self.table.get(d)) and e.status.model
                    and e.status.model.bundle_sha256 == new]
        if switched and r.previous:
            p, issued = _prepared(r.previous), _now_iso()
            for dev in switched:
                target = f"devices/{dev}"
                doc = make_record(p, target=target, update_id=update_id, issued=issued, signer=self.signer,
                                  allow_downgrade=True, allow_interface_change=True, probation=s.probation)
                publish_record(self.conn.client, self.topics.target_desired(target), doc)
            self.say(f"rolling back {len(switched)} device(s) to {p.version}")
            deadline = self.mono() + s.wave_timeout_s
            while self.mono() < deadline:
                with self._lock:
                    got = self.outcomes.get(update_id, {})
                    if all(d in got for d in switched):
                        break
                self._renew()
                time.sleep(0.2)
            with self._lock:
                got = dict(self.outcomes.get(update_id, {}))
            stuck = [d for d in switched if got.get(d) != "committed"]
            if stuck:
                r.reason = (r.reason or "") + f"; rollback did not complete on {', '.join(stuck[:5])}"
        for dev in devices:
            publish_record(self.conn.client, self.topics.desired(dev), None)
        self.record.waves[r.current].times["rollback_s"] = round(self.mono() - t0, 2)

    def _finish(self, r: RolloutRecord, s: RolloutSettings) -> None:
        """The group's record takes the new version; the per-device records go."""
        from edgebundle.trust import parse_time

        p = _prepared(r.bundle)
        topic = self.topics.group_desired(r.group)
        issued = datetime.now(timezone.utc)
        try:  # after the record on the topic, whatever this machine's clock says (devices refuse older)
            floor = parse_time((self.group_desired or {}).get("issued") or "", what="issued")
            issued = max(issued, floor + timedelta(milliseconds=1))
        except (ValueError, TypeError):
            pass
        doc = make_record(p, target=f"groups/{r.group}", update_id=f"{r.id}-group",
                          issued=issued.isoformat(timespec="milliseconds"), signer=self.signer,
                          allow_interface_change=s.allow_interface_change, probation=s.probation)
        publish_record(self.conn.client, topic, doc)
        for w in r.waves:
            for dev in w.devices:
                publish_record(self.conn.client, self.topics.desired(dev), None)
        self._stop(r, RolloutStatus.DONE, None)
        self.say(f"rollout {r.id}: done; group {r.group} desires {p.name} {p.version}")

    def _stop(self, r: RolloutRecord, status: RolloutStatus, reason: str | None) -> RolloutRecord:
        r.status, r.reason = status.value, reason
        self.save()
        return r

    # ---- pause / abort ----
    def _control_requested(self) -> bool:
        c = self.control
        if not isinstance(c, dict):
            return False
        action = c.get("action")
        r = self.record
        if action == "pause":
            self._stop(r, RolloutStatus.PAUSED, f"paused by {c.get('by') or 'an operator'}")
            self.say(f"rollout {r.id}: paused at wave {r.current + 1}")
            return True
        if action == "abort":
            self.abort(rollback=bool(c.get("rollback", True)))
            return True
        return False

    def abort(self, *, rollback: bool = True) -> RolloutRecord:
        """Stop for good: with `rollback`, every device this rollout switched goes back."""
        r = self.record
        touched = [d for w in r.waves[: r.current + 1] if w.state != WaveState.PENDING.value for d in w.devices]
        if rollback and touched:
            self._send_back(r, touched, f"{r.id}-abort", r.settings_obj)
        else:
            for dev in touched:
                publish_record(self.conn.client, self.topics.desired(dev), None)
        self._publish(self.topics.rollout_control(self.id), None)
        return self._stop(r, RolloutStatus.ABORTED, "aborted by an operator" + ("" if rollback else " (devices kept)"))

    def _sleep(self, seconds: float) -> None:
        end = self.mono() + seconds
        while self.mono() < end:
            self._renew()
            time.sleep(min(0.5, max(end - self.mono(), 0.01)))


def start(bundle: Path, broker: BrokerConfig, *, group: str, settings: RolloutSettings = RolloutSettings(),
          rollout_id: str | None = None, previous_bundle: Path | None = None, signer: Signer = Signer(),
          chunk_size: int = 1 << 20, say: Say = lambda _m: None) -> RolloutRecord:
    """Create and drive a rollout. RolloutStopped when a gate stopped it (the record says why)."""
    from fleet.gates import plan_waves as _check

    _check(["x"], settings.waves)  # a bad --waves fails before anything is published
    from edgebundle.archive import open_bundle

    for b in (bundle, previous_bundle):  # a file that is not a bundle fails before the broker is asked
        if b is not None:
            open_bundle(b)
    rid = rollout_id or f"{group}-{uuid.uuid4().hex[:6]}"
    c = Controller(broker, rid, signer=signer, say=say)
    try:
        c.create(bundle, group=group, settings=settings, previous_bundle=previous_bundle, chunk_size=chunk_size)
        return _outcome(c.run())
    finally:
        c.release()


def resume(broker: BrokerConfig, rollout_id: str, *, signer: Signer = Signer(), say: Say = lambda _m: None,
           wait_s: float | None = None) -> RolloutRecord:
    """Continue a rollout from its retained record (from any machine)."""
    c = Controller(broker, rollout_id, signer=signer, say=say)
    try:
        r = c.load()
        if r.status not in [s.value for s in ACTIVE]:
            raise RolloutError(f"rollout {rollout_id} is {r.status}: nothing to resume")
        c.acquire(wait_s=r.settings_obj.lease_s + 5 if wait_s is None else wait_s)
        c._publish(c.topics.rollout_control(rollout_id), None)
        c.control = None
        c.connected_at = c.mono()
        say(f"rollout {rollout_id}: resuming at wave {r.current + 1} ({r.waves[r.current].state})"
            if r.current < len(r.waves) else f"rollout {rollout_id}: finishing")
        return _outcome(c.run())
    finally:
        c.release()


def _outcome(r: RolloutRecord) -> RolloutRecord:
    if r.status == RolloutStatus.STOPPED.value:
        raise RolloutStopped(f"rollout {r.id} stopped: {r.reason}", record=r)
    return r


def request(broker: BrokerConfig, rollout_id: str, action: str, *, rollback: bool = True, signer: Signer = Signer(),
            say: Say = lambda _m: None, wait_s: float = 60.0) -> RolloutRecord:
    """pause or abort: ask the running controller (retained control message); when none holds the
    lease, do it here."""
    c = Controller(broker, rollout_id, signer=signer, say=say)
    try:
        r = c.load()
        if r.status not in [s.value for s in ACTIVE]:
            raise RolloutError(f"rollout {rollout_id} is {r.status}")
        lease = c.lease or {}
        live = lease.get("holder") and float(lease.get("expires", 0)) > time.time()
        c._publish(c.topics.rollout_control(rollout_id), {"action": action, "rollback": rollback, "ts": _now_iso(),
                                                          "by": c.holder})
        if not live:
            c.acquire(wait_s=0)
            c.control = {"action": action, "rollback": rollback, "by": c.holder}
            if action == "pause":
                c._publish(c.topics.rollout_control(rollout_id), None)
            c._control_requested()
            return c.record
        want = {"pause": RolloutStatus.PAUSED.value, "abort": RolloutStatus.ABORTED.value}[action]
        deadline = c.mono() + wait_s
        while c.mono() < deadline:
            if isinstance(c.remote, dict) and c.remote.get("status") in (want, RolloutStatus.DONE.value,
                                                                         RolloutStatus.STOPPED.value):
                if action == "pause":
                    c._publish(c.topics.rollout_control(rollout_id), None)
                return RolloutRecord.from_dict(c.remote)
            time.sleep(0.2)
        raise RolloutError(f"the controller of {rollout_id} ({lease.get('holder')}) did not {action} within {wait_s:.0f} s",
                           hint="it acts between steps; check `edgepack rollout status`")
    finally:
        c.release()


def status(broker: BrokerConfig, rollout_id: str | None = None, *, listen_s: float = 1.0) -> list[RolloutRecord]:
    """The retained rollout records (one, or all)."""
    topics = Topics(broker.topic_prefix)
    conn = Collector(broker, [topics.rollout(rollout_id or "+")], name="rollout-status")
    try:
        time.sleep(listen_s)
        msgs = list(conn.messages)
    finally:
        conn.stop()
    out = {}
    for _t, payload in msgs:
        doc = parse_json(payload)
        if isinstance(doc, dict) and doc.get("schema"):
            try:
                rec = RolloutRecord.from_dict(doc)
            except (TypeError, KeyError, ValueError):
                continue
            out[rec.id] = rec
    if rollout_id and rollout_id not in out:
        raise RolloutError(f"no rollout {rollout_id!r} on the broker")
    return sorted(out.values(), key=lambda r: r.created)


__all__ = ["Controller", "start", "resume", "request", "status"]
