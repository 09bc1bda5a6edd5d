"""`edgepack broker config` proven against a real mosquitto: TLS, one credential per device, and
an ACL that keeps every device to its own topics (docs/security.md)."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid

import pytest

from agents import AgentProc, wait_until
from brokers import Broker, free_port, wait_port
from pki import make_pki

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.agent,
              pytest.mark.skipif(Broker.kind != "mosquitto", reason="needs mosquitto (apt-get install mosquitto)")]
ROOT = "edgepack/v1"


class Client:
    """A plain paho client with a user name (and TLS), keeping every message it receives."""

    def __init__(self, port: int, ca: str, user: str | None, password: str | None):
        import paho.mqtt.client as mqtt

        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.rc = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"acl-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv311)
        if user:
            c.username_pw_set(user, password)
        c.tls_set(ca_certs=ca)
        c.on_message = lambda cl, ud, m: self._keep(m.topic, m.payload)
        c.on_connect = self._on_connect
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.c = c

    def _on_connect(self, client, userdata, flags, rc, props):
        self.rc = rc
        if not rc.is_failure:
            self.connected.set()

    def _keep(self, topic, payload):
        with self.lock:
            self.got.append((topic, payload))

    def topics(self) -> list[str]:
        with self.lock:
            return [t for t, _ in self.got]

    def pub(self, topic: str, payload: bytes = b"{}", retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def sub(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(5), topic

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def fleet_broker(tmp_path):
    """mosquitto running exactly the configuration `edgepack broker config` writes."""
    from click.testing import CliRunner

    from edgepack.cli import main

    pki = make_pki(tmp_path)
    port = free_port()
    args = ["broker", "config", "--out", str(tmp_path / "mq"), "--device", "dev1:kitchen", "--device", "dev2:lab",
            "--fleet-user", "fleet", "--listen", f"127.0.0.1:{port}", "--cafile", pki["ca"],
            "--certfile", pki["server_cert"], "--keyfile", pki["server_key"]]
    if os.geteuid() == 0:
        args += ["--run-as", "root"]  # else mosquitto drops to 'mosquitto' and cannot read the test's files
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    creds = {u: (tmp_path / "mq" / "credentials" / f"{u}.pass").read_text().strip() for u in ("dev1", "dev2", "fleet")}
    assert oct((tmp_path / "mq" / "credentials" / "dev1.pass").stat().st_mode & 0o777) == "0o600"
    assert "dev1:" in (tmp_path / "mq" / "passwd").read_text() and creds["dev1"] not in (tmp_path / "mq" / "passwd").read_text()
    log = open(tmp_path / "mosquitto.log", "wb")
    proc = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mq" / "mosquitto.conf")], stdout=log,
                            stderr=subprocess.STDOUT)
    wait_port(port)
    yield {"port": port, "ca": pki["ca"], "creds": creds, "url": f"mqtts://127.0.0.1:{port}", "dir": tmp_path / "mq"}
    proc.terminate()
    proc.wait(10)


def test_acl_keeps_devices_to_their_own_topics(fleet_broker):
    port, ca, creds = fleet_broker["port"], fleet_broker["ca"], fleet_broker["creds"]
    anon = Client(port, ca, None, None)
    wrong = Client(port, ca, "dev1", "not-the-password")
    time.sleep(1.0)
    assert not anon.connected.is_set() and not wrong.connected.is_set()  # no anonymous or guessed access
    anon.stop()
    wrong.stop()
    fleet = Client(port, ca, "fleet", creds["fleet"])
    dev1 = Client(port, ca, "dev1", creds["dev1"])
    assert fleet.connected.wait(5) and dev1.connected.wait(5)
    try:
        fleet.sub(f"{ROOT}/#")
        forbidden = [f"{ROOT}/devices/dev2/status", f"{ROOT}/devices/dev2/events", f"{ROOT}/devices/dev2/telemetry",
                     f"{ROOT}/devices/dev1/desired", f"{ROOT}/devices/dev2/desired", f"{ROOT}/groups/kitchen/desired",
                     f"{ROOT}/devices/dev1/models/cls/desired", f"{ROOT}/groups/kitchen/models/cls/desired",
                     f"{ROOT}/bundles/{'0' * 64}/chunks/0", "elsewhere/topic",
                     f"{ROOT}/devices/dev1/capture/request", f"{ROOT}/devices/dev2/capture/result",
                     f"{ROOT}/devices/dev2/capture/data/r1/chunks/0"]
        for t in forbidden:
            dev1.pub(t, b'{"forged": true}', retain=True)
        own = f"{ROOT}/devices/dev1/capture/data/r1/chunks/0"  # its own capture file: allowed
        dev1.pub(own, b"chunk", retain=True)
        dev1.pub(f"{ROOT}/devices/dev1/status", b'{"online": true}', retain=True)  # allowed: the barrier
        wait_until(lambda: f"{ROOT}/devices/dev1/status" in fleet.topics(), 5, what="dev1's own status")
        assert own in fleet.topics()
        # the broker handles one client's publishes in order: the forged ones would have come first
        assert not set(forbidden) & set(fleet.topics()), fleet.topics()
        late = Client(port, ca, "fleet", creds["fleet"])  # nothing forged was retained either
        late.sub(f"{ROOT}/#")
        time.sleep(0.5)
        assert f"{ROOT}/devices/dev1/status" in late.topics()
        assert not set(forbidden) & set(late.topics()), late.topics()
        late.stop()

        # reading: its own desired topics (its models' too), its groups' and the bundle chunks; nothing of
        # dev2's or of a group it is not in
        allowed = {f"{ROOT}/devices/dev1/desired", f"{ROOT}/groups/kitchen/desired", f"{ROOT}/devices/dev1/capture/request",
                   f"{ROOT}/devices/dev1/models/cls/desired", f"{ROOT}/groups/kitchen/models/cls/desired",
                   f"{ROOT}/bundles/{'a' * 64}/chunks/0"}
        refused = {f"{ROOT}/devices/dev2/desired", f"{ROOT}/groups/lab/desired", f"{ROOT}/devices/dev2/status",
                   f"{ROOT}/devices/dev2/capture/request",
                   f"{ROOT}/devices/dev2/models/cls/desired", f"{ROOT}/groups/lab/models/cls/desired"}
        for t in sorted(allowed | refused):
            fleet.pub(t, json.dumps({"topic": t}).encode(), retain=True)
        for t in (*sorted(refused), f"{ROOT}/#", f"{ROOT}/devices/+/models/+/desired", f"{ROOT}/devices/dev1/desired",
                  f"{ROOT}/groups/kitchen/desired", f"{ROOT}/devices/dev1/models/+/desired",
                  f"{ROOT}/groups/kitchen/models/+/desired", f"{ROOT}/bundles/{'a' * 64}/chunks/0",
                  f"{ROOT}/devices/dev1/capture/request"):
            dev1.sub(t)
        wait_until(lambda: allowed <= set(dev1.topics()), 5, what="allowed reads")
        time.sleep(0.3)
        assert not refused & set(dev1.topics()), dev1.topics()
    finally:
        fleet.stop()
        dev1.stop()


def test_agent_and_push_work_through_the_acl(fleet_broker, versions, keys, tmp_path):
    """The ACL is not only tight, it is enough: a device with its own credentials reports, takes a
    signed update through TLS, and the fleet user follows it."""
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation
    import fleet

    creds = fleet_broker["creds"]
    a = AgentProc(tmp_path / "data", bundle=versions["v1"], broker=fleet_broker["url"], device_id="dev1",
                  interval=1.0, extra=("--broker-username", "dev1", "--broker-password", creds["dev1"],
                                       "--broker-ca-file", fleet_broker["ca"], "--group", "kitchen",
                                       "--trusted-key", str(keys / "a.pub"), "--log-format", "text")).start()
    try:
        bc = BrokerConfig(url=fleet_broker["url"], username="fleet", password=creds["fleet"],
                          ca_file=fleet_broker["ca"]).validate()
        res = fleet.push(versions["v2"], bc,
                         fleet.PushOptions(group="kitchen", transfer=fleet.TransferSpec(chunk_size=8192),
                                           terms=fleet.Terms(probation=Probation(seconds=1, requests=100)),
                                           sign_key=keys / "a.key", follow=fleet.Follow(timeout=60, expect=("dev1",))))
        assert res.ok, res.devices
        rows = fleet.status(bc, listen_s=1.5)
        assert [(r["device_id"], r["version"], r["online"]) for r in rows] == [("dev1", "1.1.0", True)]
    finally:
        a.stop()
    conf = (fleet_broker["dir"] / "mosquitto.conf").read_text()
    assert "persistence true" in conf and "allow_anonymous false" in conf
