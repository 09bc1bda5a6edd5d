"""Staged rollouts: a bundle goes to a group in waves, each soaked and judged by gates on the
wave's devices (update failures, and model KPIs from telemetry against each device's own
pre-update readings). A failing gate stops the rollout: the wave goes back to the previous
version, the rest of the group is never touched.

The rollout record (fleet.rollout_state) is retained; its status and the current wave's state say
where a controller stands, and any controller continues from there (`rollout resume`):

   status RUNNING, the current wave (record.waves[current]) in:
   PENDING ──► UPDATING ──► SOAKING ──► PASSED ──► the next wave's PENDING; after the last wave:
      │           │            │                    the group's record, status DONE
      │           └────────────┴──► ROLLING_BACK ──► ROLLED_BACK ──► status STOPPED
      └ (baseline telemetry heard first; the wave's records sent once UPDATING is saved)
   Before PENDING, UPDATING and SOAKING, and while they wait, a retained control request:
   "pause" ──► status PAUSED (resume continues at the same wave and state);
   "abort" ──► status ABORTED (the devices it switched go back, unless --keep).
   Resume edges: UPDATING follows the devices' retained status (events are not retained);
   SOAKING soaks again from the start (telemetry is not retained); ROLLING_BACK sends back again;
   ROLLED_BACK (the controller died before saving STOPPED) stops.

Each handler returns the wave's next state; the loop saves the record when it changes (a handler
saves earlier where the order matters). Mechanics, all over the existing protocol (agents need
nothing new): a wave's devices get per-device desired records (device beats group); a failed
wave's devices that switched get a per-device record for the previous version (allow_downgrade);
at the end the group's record holds the new version and the per-device records are cleared
(devices joining later get it). A delta rollout's bundle travels as content-defined chunks
(fleet.delta); the model's chunk index names it by the rollout's record topic while the rollout
runs, by the group's record topic once done (the old version's chunks are then cleared), and by
nothing once stopped or aborted. One controller drives a rollout at a time, holding a lease
(fleet.rollout_lease). The MQTT client and the clock are injected (fleet.rollout_link): tests
drive every transition over an in-memory broker."""
from __future__ import annotations

import socket
import time
import uuid
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

from edgebundle.archive import open_bundle
from edgebundle.trust import parse_time
from edgeproto.broker import BrokerConfig
from edgeproto.desired import CdcTransfer
from edgeproto.records import TelemetryWindow
from edgeproto.topics import Topics, target
from fleet import delta as cdc
from fleet.conn import Collector, parse_json
from fleet.errors import RolloutError, RolloutStopped
from fleet.gates import Window, baseline_p95, judge_device, judge_wave, plan_waves
from fleet.records import Prepared, Signer, Terms, default_model, make_record, model_for, publish_record
from fleet.rollout_lease import Lease
from fleet.rollout_link import Client, Clock, Inbox, publish_retained
from fleet.rollout_plan import plan, prepared
from fleet.rollout_state import ACTIVE, RolloutRecord, RolloutSettings, RolloutStatus, Wave, WaveState, check_id

Say = Callable[[str], None]
# a pause or abort request is acted on before these steps (and while they wait), not once a wave
# has passed (the next one comes first) or is going back (that finishes first)
CONTROL_POINTS = (WaveState.PENDING, WaveState.UPDATING, WaveState.SOAKING)


def _window(tel: TelemetryWindow, paths: list[str]) -> Window:
    return Window(count=tel.count, errors=tel.errors, nonfinite=tel.nonfinite, p95_ms=tel.p95_ms,
                  fields={g: tel.value(g) for g in paths}, rejected=tel.rejected)


class Controller:
    """Drives one rollout through an injected MQTT client and clock; `inbox` keeps what arrives on
    the connection (its owner feeds it). create() then run(); or resume(); or request()."""

    def __init__(self, client: Client, inbox: Inbox, *, signer: Signer = Signer(), say: Say = lambda _m: None,
                 holder: str | None = None, clock: Clock = Clock()):
        self.client, self.inbox, self.clock, self.signer, self.say = client, inbox, clock, signer, say
        self.id, self.topics = inbox.id, inbox.topics
        self.holder = holder or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        self.lease = Lease(client, inbox, holder=self.holder, clock=clock, say=say)
        self.record: RolloutRecord | None = None
        self.settings: RolloutSettings | None = None  # the record's, once there is one
        self.listening_since = clock.mono()  # telemetry heard from then on makes the baselines
        self._handlers = {WaveState.PENDING: self._start_wave, WaveState.UPDATING: self._updating,
                          WaveState.SOAKING: self._soaking, WaveState.PASSED: self._passed,
                          WaveState.ROLLING_BACK: self._rolling_back, WaveState.ROLLED_BACK: self._rolled_back}

    # ---- the record ----
    def _use(self, record: RolloutRecord) -> RolloutRecord:
        self.record, self.settings = record, record.parsed_settings
        self.inbox.model = record.model
        return record

    def save(self) -> None:
        r = self.record
        r.updated, r.controller = self.clock.wall(), self.holder
        publish_retained(self.client, self.topics.rollout(self.id), r.to_dict())

    def load(self, *, timeout: float = 5.0) -> RolloutRecord:
        deadline = self.clock.mono() + timeout
        while self.inbox.record is None and self.clock.mono() < deadline:
            self.clock.sleep(0.05)
        if self.inbox.record is None:
            raise RolloutError(f"no rollout {self.id!r} on the broker", hint="list them with: edgepack rollout status")
        return self._use(RolloutRecord.from_dict(self.inbox.record))

    def _watch_group(self, group: str, model: str | None) -> None:
        """The group's record for the model; for a model's rollout also the group's own (old-style)
        record, which a fleet that predates several models may still hold (fleet.rollout_plan)."""
        if self.inbox.group_topic is None:
            self.inbox.group_topic = self.topics.target_desired(target("groups", group, model))
            self.client.subscribe_wait(self.inbox.group_topic)
            if model is not None:
                self.inbox.legacy_topic = self.topics.group_desired(group)
                self.client.subscribe_wait(self.inbox.legacy_topic)

    def _target(self, scope: str, name: str) -> str:
        """A record's target for the rollout's model (its topic: Topics.target_desired)."""
        return target(scope, name, self.record.model)

    # ---- start ----
    def create(self, bundle: Path, *, group: str, settings: RolloutSettings, model: str | None = None,
               device_topic: bool = False, previous_bundle: Path | None = None, chunk_size: int = 1 << 20,
               settle_s: float = 5.0, delta: bool = False) -> RolloutRecord:
        """Plan the rollout of `model` (default: the bundle's name; `device_topic`: the devices' own
        topics, for agents that predate several models) (fleet.rollout_plan; `delta`: content-defined
        chunks), take the lease and write the record. Nothing is sent to any device yet."""
        model = model_for(default_model(open_bundle(bundle).manifest), model=model, device_topic=device_topic)
        self.inbox.model = model
        self._watch_group(group, model)
        r = self._use(plan(bundle, inbox=self.inbox, client=self.client, clock=self.clock, say=self.say, group=group,
                           settings=settings, model=model, previous_bundle=previous_bundle, chunk_size=chunk_size,
                           settle_s=settle_s, delta=delta))
        self.lease.acquire(ttl=settings.lease_s, wait_s=0)
        publish_retained(self.client, self.topics.rollout_control(self.id), None)
        self.save()
        sizes = [len(w.devices) for w in r.waves]
        self.say(f"rollout {self.id}: {r.bundle['name']} {r.bundle['version']} to {sum(sizes)} device(s) of {group} "
                 f"in waves of {sizes}")
        return r

    # ---- drive ----
    def run(self) -> RolloutRecord:
        """Drive the record from where it stands to done, stopped, paused or aborted."""
        r = self.record
        if r.status == RolloutStatus.PAUSED:
            r.status = RolloutStatus.RUNNING
        self._watch_group(r.group, r.model)
        while r.status == RolloutStatus.RUNNING:
            if r.current >= len(r.waves):
                self._finish(r)
                break
            w = r.waves[r.current]
            if w.state in CONTROL_POINTS and self._control_requested():
                break
            nxt = self._handlers[w.state](r, w)
            if nxt != w.state:
                self._enter(w, nxt)
        return r

    def _enter(self, w: Wave, state: WaveState) -> None:
        w.state = state
        self.save()

    def _start_wave(self, r: RolloutRecord, w: Wave) -> WaveState:
        s, n = self.settings, r.current + 1
        left = s.baseline_s - (self.clock.mono() - self.listening_since)
        if left > 0:  # each device's own p95 before the update needs some telemetry
            self.say(f"wave {n}: listening {left:.0f} s for pre-update telemetry")
            self._wait(left)
        version = r.bundle["version"]
        for dev in w.devices:
            pre = [_window(tel, []) for _t, v, tel in self.inbox.telemetry(dev) if v != version]
            r.baseline[dev] = baseline_p95(pre[-10:])
        w.update_id, w.started = f"{r.id}-w{n}", self.clock.wall()
        self._enter(w, WaveState.UPDATING)  # saved before the records go out
        self._send(prepared(r.bundle), w.devices, w.update_id, allow_interface_change=s.allow_interface_change)
        self.say(f"wave {n}: {len(w.devices)} device(s) updating to {version}")
        return WaveState.UPDATING

    def _updating(self, r: RolloutRecord, w: Wave) -> WaveState:
        """Until every device of the wave reached a final state, too many failed, or the wave timed out."""
        s, n, t0 = self.settings, r.current + 1, self.clock.mono()
        deadline = t0 + max(s.wave_timeout_s - (self.clock.wall() - (w.started or self.clock.wall())), 0)
        allowed = s.gates.allowed_failures(len(w.devices))
        while True:
            got = self.inbox.outcomes(w.update_id)
            w.outcomes = {d: got[d] for d in w.devices if d in got}
            if len(_failed(w)) > allowed:
                why = _failures(w, allowed, "did not update", self.inbox.errors(w.update_id))
                return self._stopping(r, f"wave {n}: {why}")
            if len(w.outcomes) == len(w.devices) or self.clock.mono() > deadline:
                break
            if self._control_requested():
                return WaveState.UPDATING
            self.lease.renew()
            self.clock.sleep(0.2)
        for d in w.devices:
            w.outcomes.setdefault(d, "timed_out")
        w.times["update_s"] = round(self.clock.mono() - t0, 2)
        if len(_failed(w)) > allowed:
            why = _failures(w, allowed, "did not update in time or failed", self.inbox.errors(w.update_id))
            return self._stopping(r, f"wave {n}: {why}")
        return WaveState.SOAKING

    def _soaking(self, r: RolloutRecord, w: Wave) -> WaveState:
        """Soak from now (a resumed controller soaks the wave again: telemetry is not retained)."""
        s, n, start = self.settings, r.current + 1, self.clock.mono()
        self.say(f"wave {n}: soaking {s.soak_s:.0f} s")
        while self.clock.mono() - start < s.soak_s:
            if self._control_requested():
                return WaveState.SOAKING
            self.lease.renew()
            self.clock.sleep(min(0.5, max(s.soak_s - (self.clock.mono() - start), 0.01)))
        version, paths = r.bundle["version"], [g.path for g in s.gates.fields]
        for dev in w.devices:
            wins = [_window(tel, paths) for t, v, tel in self.inbox.telemetry(dev) if v == version and t >= start]
            w.readings[dev] = judge_device(outcome=w.outcomes.get(dev), baseline=r.baseline.get(dev), windows=wins,
                                           gates=s.gates)
        w.times["soak_s"] = round(self.clock.mono() - start, 2)
        ok, w.summary = judge_wave(w.readings, s.gates)
        if not ok:
            return self._stopping(r, f"wave {n}: {w.summary}")
        self._enter(w, WaveState.PASSED)
        self.say(f"wave {n}: passed ({w.summary})")
        return WaveState.PASSED

    def _passed(self, r: RolloutRecord, w: Wave) -> WaveState:
        r.current += 1
        self.save()
        return WaveState.PASSED

    def _stopping(self, r: RolloutRecord, reason: str) -> WaveState:
        self.say(f"stopping: {reason}")
        r.reason = reason
        return WaveState.ROLLING_BACK

    def _rolling_back(self, r: RolloutRecord, w: Wave) -> WaveState:
        """Devices of the wave that run the new version get a record for the previous one; then the
        wave's per-device records are cleared (they fall back to the group's record)."""
        self._send_back(r, w.devices, f"{w.update_id or r.id}-back")
        return WaveState.ROLLED_BACK

    def _rolled_back(self, r: RolloutRecord, w: Wave) -> WaveState:
        self._stop(r, RolloutStatus.STOPPED, r.reason or "a gate failed")
        return WaveState.ROLLED_BACK

    def _send_back(self, r: RolloutRecord, devices: list[str], update_id: str) -> None:
        """`devices` that run the new version get a record for the previous one and are waited for
        (at most the wave timeout); then all their per-device records are cleared."""
        s, t0, new = self.settings, self.clock.mono(), r.bundle["sha256"]
        table = self.inbox.table
        running = {d: e.status.for_model(r.model).model for d in devices if (e := table.get(d))}
        switched = [d for d, m in running.items() if m and m.bundle_sha256 == new]
        if switched and r.previous:
            p = prepared(r.previous)
            self._send(p, switched, update_id, allow_downgrade=True, allow_interface_change=True)
            self.say(f"rolling back {len(switched)} device(s) to {p.version}")
            deadline = self.clock.mono() + s.wave_timeout_s
            while self.clock.mono() < deadline and not set(switched) <= set(self.inbox.outcomes(update_id)):
                self.lease.renew()
                self.clock.sleep(0.2)
            got = self.inbox.outcomes(update_id)
            stuck = [d for d in switched if got.get(d) != "committed"]
            if stuck:
                r.reason = (r.reason or "") + f"; rollback did not complete on {', '.join(stuck[:5])}"
        self._clear(devices)
        r.waves[r.current].times["rollback_s"] = round(self.clock.mono() - t0, 2)

    def _finish(self, r: RolloutRecord) -> None:
        """The group's record takes the new version; the per-device records go."""
        s, p = self.settings, prepared(r.bundle)
        issued = self.clock.now()
        try:  # after the record on the topic, whatever this machine's clock says (devices refuse older)
            floor = parse_time((self.inbox.group_desired or {}).get("issued") or "", what="issued")
            issued = max(issued, floor + timedelta(milliseconds=1))
        except (ValueError, TypeError):
            pass
        group = self._target("groups", r.group)
        doc = make_record(p, target=group, update_id=f"{r.id}-group",
                          issued=issued.isoformat(timespec="milliseconds"), signer=self.signer,
                          terms=Terms(allow_interface_change=s.allow_interface_change, probation=s.probation,
                                      shadow=s.shadow))
        publish_record(self.client, self.topics.target_desired(group), doc)
        self._clear([d for w in r.waves for d in w.devices])
        self._index(r, desired_topic=self.topics.target_desired(group))
        self._stop(r, RolloutStatus.DONE, None)
        self.say(f"rollout {r.id}: done; group {r.group} desires {p.name} {p.version}")

    def _send(self, p: Prepared, devices: list[str], update_id: str, *, allow_downgrade: bool = False,
              allow_interface_change: bool) -> None:
        """A per-device desired record for each of `devices` (signed when the signer has a key)."""
        issued, s = self.clock.iso(), self.settings
        terms = Terms(allow_downgrade=allow_downgrade, allow_interface_change=allow_interface_change,
                      probation=s.probation, shadow=s.shadow)
        for dev in devices:
            to = self._target("devices", dev)
            doc = make_record(p, target=to, update_id=update_id, issued=issued, signer=self.signer, terms=terms)
            publish_record(self.client, self.topics.target_desired(to), doc)

    def _clear(self, devices: list[str]) -> None:
        """Their per-device records go: they fall back to the group's record."""
        for dev in devices:
            publish_record(self.client, self.topics.target_desired(self._target("devices", dev)), None)

    def _stop(self, r: RolloutRecord, status: RolloutStatus, reason: str | None) -> RolloutRecord:
        r.status, r.reason = status, reason
        self.save()
        if status in (RolloutStatus.STOPPED, RolloutStatus.ABORTED):
            self._index(r, desired_topic=None)
        return r

    def _index(self, r: RolloutRecord, *, desired_topic: str | None) -> None:
        """A delta rollout's end: its bundle is named by `desired_topic` (None: by nothing) instead
        of the rollout; chunks no index lists any more are cleared (fleet.delta)."""
        p = prepared(r.bundle)
        if not isinstance(p.transfer, CdcTransfer):
            return
        n = cdc.record_index(self.client, self.topics.root, model=r.model or p.name, sha256=p.sha256, t=p.transfer,
                             desired_topic=desired_topic, indexes=dict(self.inbox.indexes),
                             release=(self.topics.rollout(self.id),))
        if n:
            self.say(f"delta: cleared {n} retained chunk(s) that no desired record names any more")

    def _wait(self, seconds: float) -> None:
        end = self.clock.mono() + seconds
        while self.clock.mono() < end:
            self.lease.renew()
            self.clock.sleep(min(0.5, max(end - self.clock.mono(), 0.01)))

    # ---- pause / abort / resume ----
    def _control_requested(self) -> bool:
        """Acts on a retained pause or abort request; True when it did (the record says which)."""
        return self._act(self.inbox.control)

    def _act(self, c) -> bool:
        if not isinstance(c, dict):
            return False
        r = self.record
        if c.get("action") == "pause":
            self._stop(r, RolloutStatus.PAUSED, f"paused by {c.get('by') or 'an operator'}")
            self.say(f"rollout {r.id}: paused at wave {r.current + 1}")
            return True
        if c.get("action") == "abort":
            self.abort(rollback=bool(c.get("rollback", True)))
            return True
        return False

    def abort(self, *, rollback: bool = True) -> RolloutRecord:
        """Stop for good: with `rollback`, every device this rollout switched goes back."""
        r = self.record
        touched = [d for w in r.waves[: r.current + 1] if w.state != WaveState.PENDING for d in w.devices]
        if rollback and touched:
            self._send_back(r, touched, f"{r.id}-abort")
        else:
            self._clear(touched)
        publish_retained(self.client, self.topics.rollout_control(self.id), None)
        return self._stop(r, RolloutStatus.ABORTED, "aborted by an operator" + ("" if rollback else " (devices kept)"))

    def resume(self, *, wait_s: float | None = None) -> RolloutRecord:
        """Continue from the retained record, once the lease is ours (a dead controller's expires)."""
        r = self.load()
        if r.status not in ACTIVE:
            raise RolloutError(f"rollout {self.id} is {r.status.value}: nothing to resume")
        lease_s = self.settings.lease_s
        self.lease.acquire(ttl=lease_s, wait_s=lease_s + 5 if wait_s is None else wait_s)
        publish_retained(self.client, self.topics.rollout_control(self.id), None)
        self.inbox.control = None
        self.listening_since = self.clock.mono()
        self.say(f"rollout {self.id}: resuming at wave {r.current + 1} ({r.waves[r.current].state.value})"
                 if r.current < len(r.waves) else f"rollout {self.id}: finishing")
        return self.run()

    def request(self, action: str, *, rollback: bool = True, wait_s: float = 60.0) -> RolloutRecord:
        """pause or abort: ask the running controller (retained control message); when none holds
        the lease, do it here."""
        r = self.load()
        if r.status not in ACTIVE:
            raise RolloutError(f"rollout {self.id} is {r.status.value}")
        holder, live = (self.inbox.lease or {}).get("holder"), self.lease.held()
        control = self.topics.rollout_control(self.id)
        publish_retained(self.client, control, {"action": action, "rollback": rollback, "ts": self.clock.iso(),
                                                "by": self.holder})
        if not live:
            self.lease.acquire(ttl=self.settings.lease_s, wait_s=0)
            if action == "pause":  # nobody else is to act on it (its echo may clear the inbox at once)
                publish_retained(self.client, control, None)
            self._act({"action": action, "rollback": rollback, "by": self.holder})
            return self.record
        want = {"pause": RolloutStatus.PAUSED, "abort": RolloutStatus.ABORTED}[action]
        deadline = self.clock.mono() + wait_s
        while self.clock.mono() < deadline:
            remote = self.inbox.record
            if isinstance(remote, dict) and RolloutStatus.read(remote.get("status")) in (want, RolloutStatus.DONE,
                                                                                          RolloutStatus.STOPPED):
                if action == "pause":
                    publish_retained(self.client, control, None)
                return RolloutRecord.from_dict(remote)
            self.clock.sleep(0.2)
        raise RolloutError(f"the controller of {self.id} ({holder}) did not {action} within {wait_s:.0f} s",
                           hint="it acts between steps; check `edgepack rollout status`")


def _failed(w: Wave) -> list[str]:
    return sorted(d for d, o in w.outcomes.items() if o != "committed")


def _failures(w: Wave, allowed: int, what: str, errors: dict[str, str] | None = None) -> str:
    bad, errors = _failed(w), errors or {}
    return (f"{len(bad)} device(s) {what} (" + ", ".join(
        f"{d}: {w.outcomes[d]}" + (f": {errors[d]}" if d in errors else "") for d in bad[:5]) + f"; at most {allowed})")


@contextmanager
def _connected(broker: BrokerConfig, rollout_id: str, *, signer: Signer, say: Say) -> Iterator[Controller]:
    """A controller on its own broker connection; its lease is released and the connection closed
    on the way out."""
    inbox = Inbox(Topics(broker.topic_prefix), check_id(rollout_id))
    conn = Collector(broker, inbox.subscriptions, name=f"rollout-{rollout_id}"[:40], on_message=inbox.feed)
    c = Controller(conn.client, inbox, signer=signer, say=say)
    try:
        yield c
    finally:
        try:
            c.lease.release()
        finally:
            conn.stop()


def start(bundle: Path, broker: BrokerConfig, *, group: str, settings: RolloutSettings = RolloutSettings(),
          model: str | None = None, device_topic: bool = False, rollout_id: str | None = None,
          previous_bundle: Path | None = None, signer: Signer = Signer(), chunk_size: int = 1 << 20,
          delta: bool = False, say: Say = lambda _m: None) -> RolloutRecord:
    """Create and drive a rollout of `model` (default: the bundle's name; `device_topic`: the
    devices' own topics; `delta`: only the chunks the broker lacks are published, and what the
    update costs each device is said first). RolloutStopped when a gate stopped it (the record
    says why)."""
    plan_waves(["x"], settings.waves)  # a bad --waves fails before anything is published
    for b in (bundle, previous_bundle):  # a file that is not a bundle fails before the broker is asked
        if b is not None:
            open_bundle(b)
    model_for(default_model(open_bundle(bundle).manifest), model=model,
              device_topic=device_topic)  # so does a bad --model
    with _connected(broker, rollout_id or f"{group}-{uuid.uuid4().hex[:6]}", signer=signer, say=say) as c:
        c.create(bundle, group=group, settings=settings, model=model, device_topic=device_topic,
                 previous_bundle=previous_bundle, chunk_size=chunk_size, delta=delta)
        return _outcome(c.run())


def resume(broker: BrokerConfig, rollout_id: str, *, signer: Signer = Signer(), say: Say = lambda _m: None,
           wait_s: float | None = None) -> RolloutRecord:
    """Continue a rollout from its retained record (from any machine)."""
    with _connected(broker, rollout_id, signer=signer, say=say) as c:
        return _outcome(c.resume(wait_s=wait_s))


def _outcome(r: RolloutRecord) -> RolloutRecord:
    if r.status == RolloutStatus.STOPPED:
        raise RolloutStopped(f"rollout {r.id} stopped: {r.reason}", record=r)
    return r


def request(broker: BrokerConfig, rollout_id: str, action: str, *, rollback: bool = True, signer: Signer = Signer(),
            say: Say = lambda _m: None, wait_s: float = 60.0) -> RolloutRecord:
    """pause or abort (Controller.request) on a connection of its own."""
    with _connected(broker, rollout_id, signer=signer, say=say) as c:
        return c.request(action, rollback=rollback, wait_s=wait_s)


def status(broker: BrokerConfig, rollout_id: str | None = None, *, listen_s: float = 1.0) -> list[RolloutRecord]:
    """The retained rollout records (one, or all)."""
    topics = Topics(broker.topic_prefix)
    conn = Collector(broker, [topics.rollout(rollout_id or "+")], name="rollout-status")
    try:
        time.sleep(listen_s)
        msgs = list(conn.messages)
    finally:
        conn.stop()
    out, head = {}, topics.rollout("")
    for topic, payload in msgs:
        if not topic.startswith(head) or "/" in topic[len(head):]:  # some brokers hand out other retained topics
            continue
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
