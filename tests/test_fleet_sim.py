"""The fleet simulator against real mosquitto: a slow bundle stopped in the canary wave, a good
one through every wave, two collectors sharing one fleet's telemetry (MQTT 5 shared
subscriptions), and a push through a two-broker bridge (devices on one broker, the fleet side on
the other). Small fleets, short soaks: every wait is bounded."""
from __future__ import annotations

import collections
import json
import threading
import time

import pytest

from agents import Watcher, wait_until
from brokers import Broker
from edgeproto.broker import BrokerConfig
from edgeproto.desired import Probation
from edgeproto.topics import Topics, shared
from fleet import rollout as ro
from fleet.conn import Collector
from fleet.errors import RolloutStopped
from fleet.rollout_state import RolloutSettings
from edgepack.sim.simulator import Misbehaviour, SimSettings, Simulator, synthetic_bundle

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(Broker.kind != "mosquitto", reason="needs mosquitto (limits, bridges, MQTT 5)")]
LIMITS = ("max_queued_messages 100000",)  # the default 100 drops a burst of 60 devices' messages
QUICK = Probation(seconds=1.0, requests=10 ** 6)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("simb")
    return {v: synthetic_bundle(d / f"m-{v}.edgepack", version=v, size=50_000) for v in ("1.0.0", "1.1.0")}


@pytest.fixture
def big_broker(tmp_path):
    b = Broker(tmp_path / "broker", extra=LIMITS).start()
    yield b
    b.stop()


def _settings(**kw) -> RolloutSettings:
    return RolloutSettings(**{"soak_s": 3.0, "baseline_s": 3.0, "wave_timeout_s": 60.0, "lease_s": 10.0,
                              "probation": QUICK, **kw})


def _sim(broker, bundle, n, **faults) -> Simulator:
    sim = Simulator(BrokerConfig(url=broker.url), bundle,
                    SimSettings(devices=n, groups=("g",), telemetry_s=1.0, rate=30.0), Misbehaviour(**faults)).start()
    assert sim.wait_connected(30) == n
    return sim


def test_slow_bundle_stopped_in_canary_others_untouched(big_broker, bundles):
    sim = _sim(big_broker, bundles["1.0.0"], 60, slow=1.0)  # every device runs 2x slower on a new bundle
    try:
        with pytest.raises(RolloutStopped) as e:
            ro.start(bundles["1.1.0"], BrokerConfig(url=big_broker.url), group="g", settings=_settings(),
                     previous_bundle=bundles["1.0.0"], chunk_size=16384)
        rec = e.value.record
        canary = rec.waves[0].devices
        assert len(canary) == 1 and rec.waves[0].state == "rolled_back"
        assert "2.0" in rec.reason or "x its own" in rec.reason, rec.reason
        assert all(w.state == "pending" for w in rec.waves[1:])
        devs = {d.device_id: d for d in sim.devices}
        assert devs[canary[0]].switched == 1  # it did switch, was judged, and went back
        wait_until(lambda: devs[canary[0]].version == "1.0.0", 30, what="canary back on 1.0.0")
        assert [d.device_id for d in sim.devices if d.switched] == canary  # no one else ever switched
        assert set(sim.versions().values()) == {"1.0.0"}
    finally:
        sim.stop()


def test_good_bundle_converges_through_every_wave(big_broker, bundles):
    sim = _sim(big_broker, bundles["1.0.0"], 50)
    try:
        rec = ro.start(bundles["1.1.0"], BrokerConfig(url=big_broker.url), group="g",
                       settings=_settings(waves="1,20%,100%"), previous_bundle=bundles["1.0.0"], chunk_size=16384)
        assert rec.status == "done" and [len(w.devices) for w in rec.waves] == [1, 9, 40]
        wait_until(lambda: set(sim.versions().values()) == {"1.1.0"}, 30, what="every device on 1.1.0")
        assert all(d.updater.record.state.value == "committed" for d in sim.devices)
    finally:
        sim.stop()
    # Stopped, the devices say so in their retained status (a clean disconnect sends no Last Will: the
    # fleet page showed a stopped simulator's devices online for good; issue 24, finding 6).
    w = Watcher(big_broker.url, ["edgepack/v1/devices/+/status"])
    try:
        last = lambda: {p["device_id"]: p for p in w.of("/status")}  # noqa: E731
        wait_until(lambda: len(last()) == 50, 10, what="50 retained statuses")
        assert {(p["online"], p["reason"]) for p in last().values()} == {(False, "stopped")}
    finally:
        w.stop()


def test_two_collectors_share_telemetry_without_loss_or_duplication(big_broker, bundles):
    """MQTT 5 shared subscription: the broker gives each telemetry message to one collector."""
    topics = Topics()
    got: dict[str, list] = {"a": [], "b": []}
    lock = threading.Lock()

    def sink(name):
        def on(topic, payload):
            doc = json.loads(payload)
            with lock:
                got[name].append((doc["device_id"], doc["seq"]))
        return on

    cols = [Collector(BrokerConfig(url=big_broker.url), [shared("collectors", topics.telemetry())], name=f"col-{n}",
                      on_message=sink(n), mqtt5=True) for n in ("a", "b")]
    time.sleep(0.5)  # both SUBACKed before the first window
    sim = Simulator(BrokerConfig(url=big_broker.url), bundles["1.0.0"],
                    SimSettings(devices=20, telemetry_s=0.25, rate=5.0)).start()
    try:
        assert sim.wait_connected(30) == 20
        wait_until(lambda: min(d._seq for d in sim.devices) >= 8, 30, what="8 windows per device")
        sim._stop.set()  # no more telemetry; what was sent must all arrive once
        time.sleep(1.0)
        sent = {d.device_id: d._seq for d in sim.devices}
        wait_until(lambda: len(got["a"]) + len(got["b"]) >= sum(sent.values()), 15, what="every window delivered")
        time.sleep(0.5)
    finally:
        sim.stop()
        for c in cols:
            c.stop()
    both = got["a"] + got["b"]
    assert got["a"] and got["b"], "each collector took a share"
    assert not set(got["a"]) & set(got["b"]), "no window went to both"
    counts = collections.Counter(both)
    assert max(counts.values()) == 1, "no duplicates"
    per_dev = collections.defaultdict(set)
    for dev, seq in both:
        per_dev[dev].add(seq)
    assert {d: sorted(s) for d, s in per_dev.items()} == {d: list(range(1, n + 1)) for d, n in sent.items()}


def bridge_lines(remote_port: int, root: str = "edgepack/v1") -> tuple[str, ...]:
    """The fleet-side broker bridges to the devices' broker: device reports in, desired records
    and bundle chunks out (retained on both sides); rollout records stay on the fleet side."""
    return ("connection devices", f"address 127.0.0.1:{remote_port}", "cleansession true", "try_private true",
            f"topic {root}/devices/+/status in 1", f"topic {root}/devices/+/telemetry in 1",
            f"topic {root}/devices/+/events in 1", f"topic {root}/devices/+/desired out 1",
            f"topic {root}/groups/+/desired out 1", f"topic {root}/devices/+/models/+/desired out 1",
            f"topic {root}/groups/+/models/+/desired out 1", f"topic {root}/bundles/# out 1", *LIMITS)


def test_push_through_a_two_broker_bridge(tmp_path, bundles):
    import fleet

    edge = Broker(tmp_path / "edge", extra=LIMITS).start()
    hub = Broker(tmp_path / "hub", extra=bridge_lines(edge.port)).start()
    sim = None
    try:
        sim = _sim(edge, bundles["1.0.0"], 5)
        from fleet.status import FleetWatcher

        w = FleetWatcher(BrokerConfig(url=hub.url))  # the fleet side sees devices only through the bridge
        try:
            wait_until(lambda: len(w.table.entries(group="g")) == 5, 20, what="5 devices seen through the bridge")
        finally:
            w.stop()
        res = fleet.push(bundles["1.1.0"], BrokerConfig(url=hub.url),
                         fleet.PushOptions(group="g", transfer=fleet.TransferSpec(chunk_size=16384),
                                           terms=fleet.Terms(probation=QUICK), follow=fleet.Follow(timeout=60)))
        assert res.ok and len(res.devices) == 5, res.devices
        assert set(sim.versions().values()) == {"1.1.0"}
    finally:
        if sim:
            sim.stop()
        hub.stop()
        edge.stop()


def test_collector_role_reads_reports_through_a_shared_subscription_and_writes_nothing(tmp_path):
    """`edgepack broker config --collector-user`: the ACL lets a collector read device reports
    ($share/... included) and nothing else; its publish to a desired topic is dropped."""
    import os
    import subprocess

    from brokers import free_port, wait_port
    from edgeproto.mqtt import dumps
    from fleet.broker import DeviceAccount, MosquittoSetup, write_mosquitto_config

    port = free_port()
    res = write_mosquitto_config(MosquittoSetup(out_dir=tmp_path / "b", devices=(DeviceAccount("d1", ("g",)),),
                                                collector_users=("col",), host="127.0.0.1", port=port,
                                                run_as="root" if os.geteuid() == 0 else None))
    proc = subprocess.Popen(["mosquitto", "-c", str(res["conf"])], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        pw = res["passwords"]
        url = f"mqtt://127.0.0.1:{port}"
        t = Topics()
        got = []
        col = Collector(BrokerConfig(url=url, username="col", password=pw["col"]),
                        [shared("collectors", t.telemetry()), t.desired("d1")], name="col",
                        on_message=lambda tp, p: got.append(tp), mqtt5=True)
        dev = Collector(BrokerConfig(url=url, username="d1", password=pw["d1"]), [t.desired("d1")], name="d1")
        time.sleep(0.5)
        dev.client.publish_wait(t.telemetry("d1"), dumps({"device_id": "d1", "seq": 1}))
        col.client.publish_wait(t.desired("d1"), dumps({"evil": True}), retain=True)  # refused by the ACL
        wait_until(lambda: got, 5, what="the collector gets the telemetry")
        time.sleep(0.5)
        assert got == [t.telemetry("d1")] and dev.messages == []
        col.stop()
        dev.stop()
    finally:
        proc.terminate()
        proc.wait(10)


def test_shared_network_loop_reconnects_after_a_broker_restart_and_a_dropped_link(big_broker, bundles):
    """edgeproto.netloop: every client comes back after the broker restarts; a device told to drop
    its link leaves its Last Will (online: false) and returns after its outage."""
    from fleet.status import FleetWatcher

    sim = _sim(big_broker, bundles["1.0.0"], 5)
    try:
        big_broker.stop()
        wait_until(lambda: sim.connected() == 0, 10, what="every client notices the broker is gone")
        big_broker.start()
        assert sim.wait_connected(20) == 5
        w = FleetWatcher(BrokerConfig(url=big_broker.url), telemetry=False)
        try:
            dev = sim.devices[0]
            sim.net.drop(dev.mqtt.paho, 3.0)
            wait_until(lambda: (e := w.table.get(dev.device_id)) is not None and e.status.online is False, 10,
                       what="the Last Will says offline")
            wait_until(lambda: w.table.get(dev.device_id).status.online is True, 15, what="back online")
        finally:
            w.stop()
    finally:
        sim.stop()
