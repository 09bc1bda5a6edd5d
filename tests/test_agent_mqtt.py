"""Status and telemetry over a real broker (mosquitto; amqtt where it is absent)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents import AgentProc, Watcher, wait_until
from brokers import Broker
from pki import make_pki as _make_pki

pytestmark = [pytest.mark.slow, pytest.mark.agent, pytest.mark.broker]
SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def _validate(doc, name):
    import jsonschema

    jsonschema.validate(doc, json.loads((SCHEMAS / f"{name}.schema.json").read_text()))


def test_status_and_telemetry_follow_the_schemas(broker, digits_bundle, tmp_path):
    w = Watcher(broker.url, ["edgepack/v1/devices/+/#"])
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, broker=broker.url, device_id="pi-1",
                  extra=("--group", "kitchen", "--group", "pi4")).start()
    try:
        # the first retained status comes while the model loads (model: null); wait for it to serve
        st = w.wait("pi-1/status", lambda p: p["online"] and p["model"] is not None)
        _validate(st, "status")
        assert st["groups"] == ["kitchen", "pi4"] and st["model"]["name"] == "digits"
        assert st["model"]["runtime"] == "litert" and st["model"]["provider"] == "xnnpack"
        import urllib.request

        body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                       "data": [0.5] * 64}]}).encode()
        for _ in range(5):
            urllib.request.urlopen(urllib.request.Request(a.base + "/v2/models/digits/infer", data=body), timeout=5)
        tel = w.wait("pi-1/telemetry", lambda p: p["totals"]["count"] >= 5)
        _validate(tel, "telemetry")
        assert tel["system"]["process_rss_bytes"] > 0 and tel["system"]["disk_free_bytes"] > 0
        with_lat = w.wait("pi-1/telemetry", lambda p: p["inference"]["count"] > 0)
        assert with_lat["inference"]["latency_ms"]["p50"] > 0
    finally:
        assert a.stop() == 0
    # a clean stop says so, retained
    off = w.wait("pi-1/status", lambda p: not p["online"])
    assert off["reason"] == "stopped"
    w.stop()


def test_sigkill_fires_last_will(broker, digits_bundle, tmp_path):
    w = Watcher(broker.url, ["edgepack/v1/devices/+/status"])
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, broker=broker.url, device_id="lw").start()
    w.wait("lw/status", lambda p: p["online"])
    a.stop("kill")
    # mosquitto notices the dead TCP connection at once; keepalive x1.5 bounds it otherwise
    off = w.wait("lw/status", lambda p: not p["online"], timeout=60)
    assert off["reason"] == "connection lost"
    _validate(off, "status")
    # retained: a late subscriber sees the device offline
    late = Watcher(broker.url, ["edgepack/v1/devices/lw/status"])
    assert late.wait("lw/status")["online"] is False
    late.stop()
    w.stop()


def _seqs(w, dev):
    return [p["seq"] for p in w.of(f"{dev}/telemetry")]


def test_broker_outage_buffers_in_order(broker, digits_bundle, tmp_path):
    """Broker down for a while, agent keeps sampling to disk, broker back: all arrive, in order."""
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, broker=broker.url, device_id="buf", interval=0.3).start()
    w = Watcher(broker.url, ["edgepack/v1/devices/buf/telemetry"])
    try:
        wait_until(lambda: len(_seqs(w, "buf")) >= 2, 15, what="telemetry before the outage")
        w.stop()
        broker.stop()
        before = max(_seqs(w, "buf"))
        # agent keeps producing into its on-disk queue
        wait_until(lambda: a.proc.poll() is None and _queued(tmp_path / "data") >= 5, 20, what="queued telemetry")
        broker.start()
        w2 = Watcher(broker.url, ["edgepack/v1/devices/buf/telemetry"])
        wait_until(lambda: len(_seqs(w2, "buf")) >= 8, 40, what="buffered telemetry after reconnect")
        got = _seqs(w2, "buf")
        assert got == sorted(got), got  # in order
        # nothing lost: the sequence continues without gaps from the last one seen before the outage
        seen = sorted(set(_seqs(w, "buf")) | set(got))
        assert seen == list(range(seen[0], seen[-1] + 1)), seen
        assert got[0] <= before + 1
        w2.stop()
    finally:
        a.stop()


def _queued(data_dir: Path) -> int:
    import sqlite3

    db = sqlite3.connect(str(data_dir / "telemetry.sqlite"))
    try:
        return db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        db.close()


def test_agent_restart_while_offline_keeps_buffer(broker, digits_bundle, tmp_path):
    data = tmp_path / "data"
    a = AgentProc(data, bundle=digits_bundle, broker=broker.url, device_id="rs", interval=0.3).start()
    w = Watcher(broker.url, ["edgepack/v1/devices/rs/telemetry"])
    wait_until(lambda: _seqs(w, "rs"), 15, what="first telemetry")
    w.stop()
    broker.stop()
    wait_until(lambda: _queued(data) >= 4, 20, what="queued telemetry")
    a.stop("kill")  # power loss while offline
    queued = _queued(data)
    a2 = AgentProc(data, bundle=None, broker=broker.url, device_id="rs", interval=0.3, port=a.port).start()
    try:
        broker.start()
        w2 = Watcher(broker.url, ["edgepack/v1/devices/rs/telemetry"])
        wait_until(lambda: len(_seqs(w2, "rs")) >= queued + 1, 40, what="pre-restart telemetry delivered")
        got = _seqs(w2, "rs")
        seen = sorted(set(_seqs(w, "rs")) | set(got))
        assert got == sorted(got) and seen == list(range(seen[0], seen[-1] + 1)), (got, seen)
        w2.stop()
    finally:
        a2.stop()


def test_buffer_bounds_drop_oldest_and_count(tmp_path):
    from device_agent.buffer import DiskQueue

    q = DiskQueue(tmp_path / "q.sqlite", max_messages=5, max_bytes=1 << 20)
    for i in range(8):
        q.push("t", json.dumps({"i": i}).encode())
    assert len(q) == 5 and q.dropped == 3
    assert [json.loads(p)["i"] for _, _, p in q.peek(10)] == [3, 4, 5, 6, 7]
    q.close()
    q2 = DiskQueue(tmp_path / "q.sqlite", max_messages=100, max_bytes=40)  # survives reopening; byte bound
    assert len(q2) == 5 and q2.dropped == 3
    q2.push("t", b"x" * 30)
    assert len(q2) == 2 and q2.dropped == 7  # 8 + 30 bytes fit in 40
    q2.close()


@pytest.mark.skipif(Broker.kind != "mosquitto", reason="TLS test needs mosquitto (apt-get install mosquitto)")
def test_tls_with_client_certificate_and_password(digits_bundle, tmp_path):
    pki = _make_pki(tmp_path)
    b = Broker(tmp_path / "tls", tls={"ca": pki["ca"], "cert": pki["server_cert"], "key": pki["server_key"]},
               users={"agent": "pa55", "watch": "w"}).start()
    try:
        w = Watcher(b.url, ["edgepack/v1/devices/+/status"], ca=pki["ca"], cert=pki["client_cert"],
                    key=pki["client_key"], username="watch", password="w")
        a = AgentProc(tmp_path / "data", bundle=digits_bundle, broker=b.url, device_id="tls1",
                      extra=("--broker-username", "agent", "--broker-password", "pa55", "--broker-ca-file",
                             pki["ca"], "--broker-cert-file", pki["client_cert"], "--broker-key-file",
                             pki["client_key"])).start()
        try:
            st = w.wait("tls1/status", lambda p: p["online"] and p["model"] is not None, timeout=20)
            assert st["model"]["name"] == "digits"
        finally:
            a.stop()
        # a wrong password never gets in (and the agent keeps serving HTTP meanwhile)
        bad = AgentProc(tmp_path / "data2", bundle=digits_bundle, broker=b.url, device_id="tls2",
                        extra=("--broker-username", "agent", "--broker-password", "wrong", "--broker-ca-file",
                               pki["ca"], "--broker-cert-file", pki["client_cert"], "--broker-key-file",
                               pki["client_key"])).start()
        try:
            import time

            time.sleep(2)
            assert not [p for p in w.of("tls2/status")]
            assert bad.proc.poll() is None
        finally:
            bad.stop()
        w.stop()
    finally:
        b.stop()


def test_buffer_never_drops_the_message_being_sent(tmp_path):
    """A drop while a message is on its way to the broker would count it both as dropped and as
    delivered; a message dropped after it was peeked must not be sent."""
    from device_agent.buffer import DiskQueue

    q = DiskQueue(tmp_path / "q.sqlite", max_messages=3, max_bytes=1 << 20)
    for i in range(3):
        q.push("t", json.dumps({"i": i}).encode())
    batch = q.peek(10)
    assert q.sending(batch[0][0])  # message 0 is being published
    q.push("t", b'{"i": 3}')  # over the bound: 1 goes, not the one in flight
    assert [json.loads(p)["i"] for _, _, p in q.peek(10)] == [0, 2, 3] and q.dropped == 1
    assert q.sending(None) and q.delete(batch[0][0])
    assert not q.sending(batch[1][0])  # dropped since the peek: not sent again
    assert q.sending(batch[2][0])
    q.close()
