"""The rollout controller driven transition by transition over an in-memory broker and a fake
clock (Mender-style state tests; the fakes are in fakebroker.py): simulated devices answer desired
records the way agents do, so no broker, agent or real sleep runs here. Bundles are real (tiny)
files; the real-broker tests with real agents are in test_rollout.py."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from edgeproto.desired import Probation
from edgeproto.mqtt import dumps
from edgepack.sim.simulator import synthetic_bundle
from fakebroker import T, Behaviour, FakeBroker, FakeClock, FakeDevice
from fleet.errors import RolloutError
from fleet.gates import FieldGate, Gates
from fleet.rollout import Controller
from fleet.rollout_link import Inbox
from fleet.rollout_state import RolloutSettings

RID = "r1"
GROUP = T.group_model_desired("g", "m")  # a rollout's records go to its model's topics (model m: the bundle's name)


def DEV(device: str) -> str:
    return T.model_desired(device, "m")


class Killed(Exception):
    """The controller process dies here (raised from inside a publish: what was published stays)."""


@dataclass
class Env:
    broker: FakeBroker
    clock: FakeClock
    bundles: dict[str, Path]
    devices: dict[str, FakeDevice] = field(default_factory=dict)
    said: list[str] = field(default_factory=list)
    saves: list[tuple] = field(default_factory=list)  # (status, current, wave states) as each save published it

    def controller(self, holder: str) -> Controller:
        inbox = Inbox(T, RID, mono=lambda: self.clock.mono_t)
        client = self.broker.connect(inbox.subscriptions, inbox.feed)
        return Controller(client, inbox, holder=holder, say=self.said.append, clock=self.clock.clock())

    def record(self) -> dict:
        return self.broker.doc(T.rollout(RID))

    def versions(self) -> dict[str, str]:
        return {d: dev.version for d, dev in self.devices.items()}

    def transitions(self) -> list[tuple]:
        """The record's (status, current, wave states) at each save, repeats dropped."""
        return [s for i, s in enumerate(self.saves) if i == 0 or s != self.saves[i - 1]]

    def kill_when(self, cond: Callable[[dict], bool]) -> None:
        """The controller dies right after it publishes a record for which `cond` holds."""
        def tap(topic: str, payload: bytes) -> None:
            if topic == T.rollout(RID) and payload and cond(json.loads(payload)):
                self.broker.taps.remove(tap)
                raise Killed

        self.broker.taps.append(tap)

    def at(self, t: float, action: Callable[[], None]) -> None:
        """`action` once, when the fake clock has moved `t` seconds on from now."""
        due = self.clock.mono_t + t

        def hook() -> None:
            if self.clock.mono_t >= due:
                self.clock.on_sleep.remove(hook)
                action()

        self.clock.on_sleep.append(hook)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("rollout-unit")
    return {v: synthetic_bundle(d / f"m-{v}.edgepack", version=v, size=3000, name="m") for v in ("1.0.0", "1.1.0")}


def _env(bundles, n: int = 3, also: tuple[Path, ...] = (), **behaviours: Behaviour) -> Env:
    env = Env(FakeBroker(), FakeClock(), bundles)

    def saved(topic: str, payload: bytes) -> None:
        if topic == T.rollout(RID) and payload:
            r = json.loads(payload)
            env.saves.append((r["status"], r["current"], tuple(w["state"] for w in r["waves"])))

    env.broker.taps.append(saved)
    for i in range(n):
        dev = f"d{i}"
        env.devices[dev] = FakeDevice(env.broker, env.clock, dev, bundle=bundles["1.0.0"], also=also,
                                      behaviour=behaviours.get(dev, Behaviour()))
    return env


def _settings(**gates) -> RolloutSettings:
    return RolloutSettings(waves="1,100%", soak_s=4.0, wave_timeout_s=20.0, baseline_s=3.0, lease_s=3.0,
                           probation=Probation(seconds=1.0, requests=100), gates=Gates(**gates))


def _start(env: Env, c: Controller, settings: RolloutSettings | None = None, **kw):
    c.create(env.bundles["1.1.0"], group="g", settings=settings or _settings(),
             previous_bundle=kw.pop("previous_bundle", env.bundles["1.0.0"]), chunk_size=1024, **kw)
    return c.run()


GOOD = [("running", 0, ("pending", "pending")), ("running", 0, ("updating", "pending")),
        ("running", 0, ("soaking", "pending")), ("running", 0, ("passed", "pending")),
        ("running", 1, ("passed", "pending")), ("running", 1, ("passed", "updating")),
        ("running", 1, ("passed", "soaking")), ("running", 1, ("passed", "passed")),
        ("running", 2, ("passed", "passed")), ("done", 2, ("passed", "passed"))]


def test_good_bundle_goes_through_every_wave(bundles):
    env = _env(bundles)
    c = env.controller("A")
    rec = _start(env, c)
    assert env.transitions() == GOOD
    assert rec.status == "done" and [len(w.devices) for w in rec.waves] == [1, 2]
    assert set(env.versions().values()) == {"1.1.0"}
    readings = {d: r for w in rec.waves for d, r in w.readings.items()}
    assert {r["verdict"] for r in readings.values()} == {"ok"} and all(r["baseline_p95_ms"] == 10.0
                                                                        for r in readings.values())
    assert all(r["requests"] >= 20 and r["latency_ratio"] == 1.0 for r in readings.values())
    assert [dev.seen for dev in env.devices.values()] == [["r1-w1", "r1-group"], ["r1-w2", "r1-group"],
                                                          ["r1-w2", "r1-group"]]
    group = env.broker.doc(GROUP)
    assert group["version"] == "1.1.0" and group["update_id"] == "r1-group" and group["target"] == "groups/g/models/m"
    assert all(env.broker.doc(DEV(d)) is None for d in env.devices)  # per-device records cleared
    assert not [t for t in env.broker.retained if t.endswith("/desired") and t != GROUP]  # no old-style record
    chunks = [t for t in env.broker.retained if "/chunks/" in t]  # both bundles', retained
    assert len(chunks) == sum(-(-b.stat().st_size // 1024) for b in bundles.values())
    assert env.record() == rec.to_dict()
    c.lease.release()
    assert env.broker.doc(T.rollout_lease(RID)) is None
    assert env.clock.wall_t - 1.8e9 < 60  # fake seconds: baseline, two updates and two soaks


@pytest.mark.parametrize("bad,why", [(Behaviour(slow=2.0), "2.00x its own 10.00 ms"),
                                     (Behaviour(refuse=True), "did not update (d0: failed"),
                                     (Behaviour(silent=True), "did not update in time or failed (d0: timed_out"),
                                     (Behaviour(errors=0.5), "over 2.0%"),
                                     (Behaviour(rss_mb=180.0), "system.rss_mb = 180")])
def test_gate_failure_stops_the_canary_and_sends_it_back(bundles, bad, why):
    env = _env(bundles, d0=bad)
    c = env.controller("A")
    rec = _start(env, c, _settings(fields=(FieldGate.parse("system.rss_mb<=150"),)))
    assert rec.status == "stopped" and why in rec.reason, rec.reason
    gate_failed = bad.slow > 1 or bad.errors or bad.rss_mb > 150  # judged after the soak, not while updating
    assert env.transitions() == [("running", 0, ("pending", "pending")), ("running", 0, ("updating", "pending")),
                                 *([("running", 0, ("soaking", "pending"))] if gate_failed else []),
                                 ("running", 0, ("rolling_back", "pending")),
                                 ("running", 0, ("rolled_back", "pending")), ("stopped", 0, ("rolled_back", "pending"))]
    canary = env.devices["d0"]
    assert canary.version == "1.0.0"
    assert canary.seen == (["r1-w1", "r1-w1-back"] if gate_failed else ["r1-w1"])  # back only when it switched
    assert env.devices["d1"].seen == env.devices["d2"].seen == []  # the rest never touched
    assert env.broker.doc(DEV("d0")) is None and env.broker.doc(GROUP) is None


def test_failed_rollback_is_reported_in_the_reason(bundles):
    env = _env(bundles, d0=Behaviour(slow=2.0))
    # d0 switches to 1.1.0 (at ~4 s), then stops answering: the record sending it back gets no answer
    env.at(5.0, lambda: setattr(env.devices["d0"], "behaviour", Behaviour(slow=2.0, silent=True)))
    rec = _start(env, env.controller("A"))
    assert rec.status == "stopped" and "x its own" in rec.reason
    assert rec.reason.endswith("; rollback did not complete on d0"), rec.reason
    assert env.devices["d0"].version == "1.1.0" and env.broker.doc(DEV("d0")) is None
    assert rec.waves[0].times["rollback_s"] >= 20.0  # it waited the wave timeout for the answer


def test_pause_then_resume_from_another_controller(bundles):
    env = _env(bundles)
    env.at(6.0, lambda: env.broker.publish(T.rollout_control(RID), dumps({"action": "pause", "by": "op"}),
                                           retain=True))
    a = env.controller("A")
    rec = _start(env, a)
    assert rec.status == "paused" and rec.reason == "paused by op" and rec.waves[0].state == "soaking"
    assert env.said[-1] == "rollout r1: paused at wave 1"
    a.lease.release()
    versions = env.versions()
    b = env.controller("B")
    rec = b.resume()
    assert rec.status == "done" and rec.controller == "B" and set(env.versions().values()) == {"1.1.0"}
    assert versions["d1"] == versions["d2"] == "1.0.0"  # nothing went further while paused
    assert "rollout r1: resuming at wave 1 (soaking)" in env.said
    assert env.broker.doc(T.rollout_control(RID)) is None  # resume clears the request
    assert env.transitions() == GOOD[:3] + [("paused", 0, ("soaking", "pending"))] + GOOD[3:]


def test_pause_between_waves_touches_no_one_else(bundles):
    """A request heard as wave 1 passes: the controller stops before wave 2's records go out."""
    env = _env(bundles)

    def pause_when_passed(topic: str, payload: bytes) -> None:
        if topic == T.rollout(RID) and payload and json.loads(payload)["waves"][0]["state"] == "passed":
            env.broker.taps.remove(pause_when_passed)
            env.broker.publish(T.rollout_control(RID), dumps({"action": "pause", "by": "op"}), retain=True)

    env.broker.taps.append(pause_when_passed)
    rec = _start(env, env.controller("A"))
    assert rec.status == "paused" and rec.current == 1 and rec.waves[1].state == "pending"
    assert env.devices["d1"].seen == env.devices["d2"].seen == []
    assert env.said[-1] == "rollout r1: paused at wave 2"


@pytest.mark.parametrize("died,ends", [("soaking", "done"), ("passed", "done"), ("rolling_back", "stopped"),
                                       ("rolled_back", "stopped")])
def test_resume_after_a_dead_controller_waits_for_its_lease(bundles, died, ends):
    """Killed right after saving each state (its lease left behind): resume waits out the lease,
    then goes on from that state."""
    env = _env(bundles, d0=Behaviour(slow=2.0) if ends == "stopped" else Behaviour())
    env.kill_when(lambda r: r["waves"][0]["state"] == died)
    with pytest.raises(Killed):
        _start(env, env.controller("A"))
    assert env.broker.doc(T.rollout_lease(RID))["holder"] == "A"
    b = env.controller("B")
    rec = b.resume()
    assert rec.status == ends and rec.controller == "B"
    assert any(m.startswith("waiting for the lease of A to expire") for m in env.said)
    assert f"rollout r1: resuming at wave 1 ({died})" in env.said
    if ends == "done":
        assert set(env.versions().values()) == {"1.1.0"}
    else:
        assert env.versions() == {"d0": "1.0.0", "d1": "1.0.0", "d2": "1.0.0"} and "x its own" in rec.reason
        assert env.devices["d1"].seen == []


def test_resume_follows_a_wave_from_the_retained_status(bundles):
    """Killed once the records went out: the devices' final states come from their retained status."""
    env = _env(bundles)

    def die_on_first_event(topic: str, payload: bytes) -> None:
        if topic == T.events("d0"):
            env.broker.taps.remove(die_on_first_event)
            raise Killed

    env.broker.taps.append(die_on_first_event)
    with pytest.raises(Killed):
        _start(env, env.controller("A"))
    env.clock.sleep(5.0)  # the canary commits while no controller listens (its event is lost)
    assert env.devices["d0"].version == "1.1.0" and env.record()["waves"][0]["state"] == "updating"
    rec = env.controller("B").resume()
    assert rec.status == "done" and rec.waves[0].outcomes == {"d0": "committed"}


def test_lease_taken_over_stops_this_controller(bundles):
    env = _env(bundles)
    env.at(6.0, lambda: env.broker.publish(T.rollout_lease(RID), dumps({"holder": "B", "expires": 2e9}),
                                           retain=True))
    with pytest.raises(RolloutError, match="the lease was taken over by B"):
        _start(env, env.controller("A"))


def test_another_live_controller_keeps_the_rollout(bundles):
    env = _env(bundles)
    with pytest.raises(Killed):
        env.kill_when(lambda r: r["waves"][0]["state"] == "soaking")
        _start(env, env.controller("A"))
    env.broker.publish(T.rollout_lease(RID), dumps({"holder": "A", "expires": env.clock.wall_t + 3600}),
                       retain=True)  # A is alive after all
    with pytest.raises(RolloutError, match=r"rollout r1 is driven by A \(lease for another 359\d s\)"):
        env.controller("B").resume(wait_s=1.0)


@pytest.mark.parametrize("rollback", [True, False])
def test_abort_requested_while_running(bundles, rollback):
    env = _env(bundles)
    env.at(6.0, lambda: env.broker.publish(T.rollout_control(RID),
                                           dumps({"action": "abort", "rollback": rollback, "by": "op"}), retain=True))
    rec = _start(env, env.controller("A"))
    assert rec.status == "aborted" and rec.reason == "aborted by an operator" + ("" if rollback else " (devices kept)")
    assert env.devices["d0"].version == ("1.0.0" if rollback else "1.1.0")
    assert env.devices["d0"].seen == (["r1-w1", "r1-abort"] if rollback else ["r1-w1"])
    assert env.devices["d1"].seen == []
    assert env.broker.doc(T.rollout_control(RID)) is None and env.broker.doc(DEV("d0")) is None
    assert env.transitions()[-1][0] == "aborted"


@pytest.mark.parametrize("action", ["pause", "abort"])
def test_request_with_no_live_controller_acts_itself(bundles, action):
    env = _env(bundles)
    env.kill_when(lambda r: r["current"] == 1)
    with pytest.raises(Killed):
        _start(env, env.controller("A"))
    env.clock.sleep(10.0)  # A's lease expires
    op = env.controller("op")
    rec = op.request(action)
    assert rec.status == {"pause": "paused", "abort": "aborted"}[action] and rec.controller == "op"
    assert env.devices["d0"].version == ("1.1.0" if action == "pause" else "1.0.0")
    assert env.broker.doc(T.rollout_control(RID)) is None
    op.lease.release()
    if action == "pause":
        assert env.controller("B").resume().status == "done"
    else:
        with pytest.raises(RolloutError, match="is aborted: nothing to resume"):
            env.controller("B").resume()


def test_create_refuses_what_it_cannot_roll_back(bundles):
    env = _env(bundles)
    c = env.controller("A")
    with pytest.raises(RolloutError, match="has no desired record to go back to"):
        _start(env, c, previous_bundle=None)
    with pytest.raises(RolloutError, match="no device of group 'h'"):
        env.controller("B").create(bundles["1.1.0"], group="h", settings=_settings(), previous_bundle=bundles["1.0.0"])
    assert env.record() is None and env.said == []  # nothing published, nothing said


@pytest.mark.parametrize("model", [None, "m"])
def test_previous_from_the_group_record_and_issued_after_it(bundles, model):
    """No --previous: the group's desired record is what a failed wave goes back to, and the final
    group record is issued after it even when it was issued 'in the future' (a fast clock). Both for
    an old-style rollout (--device-topic) and a model's rollout over a fleet whose record is still
    old-style (no migration step: the group's own record names a bundle of the model's name)."""
    env = _env(bundles)
    a = env.controller("A")
    from fleet.records import make_record
    from fleet.transfer import prepare

    p = prepare(bundles["1.0.0"], T, chunk_size=1024)
    old = make_record(p, target="groups/g", update_id="u0", issued="2030-01-01T00:00:00.000+00:00")
    env.broker.publish(T.group_desired("g"), dumps(old), retain=True)
    assert [dev.seen for dev in env.devices.values()] == [["u0"]] * 3  # already running it
    rec = _start(env, a, previous_bundle=None, device_topic=model is None)
    assert rec.status == "done" and rec.previous["sha256"] == p.sha256 and rec.previous["version"] == "1.0.0"
    assert rec.model == model and set(env.versions().values()) == {"1.1.0"}
    if model is None:
        assert env.broker.doc(T.group_desired("g"))["issued"] == "2030-01-01T00:00:00.001+00:00"
        assert env.broker.doc(GROUP) is None
    else:  # the model's record is on a topic of its own (replay floors are per topic); the old one stays
        assert env.broker.doc(GROUP)["version"] == "1.1.0" and env.broker.doc(T.group_desired("g")) == old
    with pytest.raises(RolloutError, match="already has m 1.1.0 as its desired model"):
        env.controller("C").create(bundles["1.1.0"], group="g", settings=_settings(), device_topic=model is None)


def test_an_active_rollout_is_not_created_twice(bundles):
    env = _env(bundles)
    env.kill_when(lambda r: r["waves"][0]["state"] == "updating")
    with pytest.raises(Killed):
        _start(env, env.controller("A"))
    with pytest.raises(RolloutError, match="rollout r1 exists and is running"):
        _start(env, env.controller("B"))


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Model b's bundles (the devices' second model)."""
    d = tmp_path_factory.mktemp("rollout-unit-b")
    return {v: synthetic_bundle(d / f"b-{v}.edgepack", version=v, size=3000, name="b") for v in ("1.0.0", "1.1.0")}


@pytest.mark.parametrize("slow", [1.0, 2.0])
def test_a_model_rollout_touches_that_model_alone(bundles, second, slow):
    """Devices serve m and b: a rollout of b (--model defaults to the bundle's name) publishes on
    b's topics only, judges b's own telemetry (its 40 ms p95 and 30 requests a second, not the
    device's sum), and m keeps its version and records whether b passes or goes back."""
    env = _env(bundles, also=(second["1.0.0"],), d0=Behaviour(slow=slow))
    published: list[str] = []
    env.broker.taps.append(lambda topic, _p: published.append(topic) if topic.endswith("/desired") else None)
    c = env.controller("A")
    c.create(second["1.1.0"], group="g", settings=_settings(), previous_bundle=second["1.0.0"], chunk_size=1024)
    rec = c.run()
    assert rec.model == "b" and set(published) <= {T.model_desired(d, "b") for d in env.devices} | {
        T.group_model_desired("g", "b")}, published
    readings = {d: r for w in rec.waves for d, r in w.readings.items()}
    assert readings["d0"]["baseline_p95_ms"] == 40.0 and readings["d0"]["requests"] % 30 == 0
    assert readings["d0"]["requests"] <= 30 * 5  # one model's 30 a second over a 4 s soak, not the device's 60
    if slow == 1.0:
        assert rec.status == "done" and readings["d0"]["latency_ratio"] == 1.0
        assert all(dev.versions() == {"m": "1.0.0", "b": "1.1.0"} for dev in env.devices.values())
    else:
        assert rec.status == "stopped" and "80.00 ms is 2.00x its own 40.00 ms" in rec.reason, rec.reason
        assert all(dev.versions() == {"m": "1.0.0", "b": "1.0.0"} for dev in env.devices.values())
        assert env.devices["d1"].seen == []
    assert all(dev.slots["m"].update is None for dev in env.devices.values())  # m never had an update


def test_a_record_from_before_models_resumes_on_the_old_style_topics(bundles):
    """A rollout record written before several models has no `model`: it drives the devices' own
    topics (device and group records, as then), and a resumed controller keeps to them."""
    env = _env(bundles)
    env.kill_when(lambda r: r["waves"][0]["state"] == "soaking")
    with pytest.raises(Killed):
        _start(env, env.controller("A"), device_topic=True)
    old = {k: v for k, v in env.record().items() if k != "model"}
    env.broker.publish(T.rollout(RID), dumps(old), retain=True)
    rec = env.controller("B").resume()
    assert rec.status == "done" and rec.model is None and set(env.versions().values()) == {"1.1.0"}
    assert env.broker.doc(T.group_desired("g"))["target"] == "groups/g" and env.broker.doc(GROUP) is None
    assert not [t for t in env.broker.retained if "/models/" in t]
