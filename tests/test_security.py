"""The threat model's attacks against real agents and a real broker (docs/security.md).

Each test plays an attacker with plain broker access (or a careless operator) and checks that the
device refuses, says why on its events topic, and keeps serving the model it had."""
from __future__ import annotations

import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agents import Watcher, wait_until
from device_agent.ota.desired import Probation
from otakit import (ROOT, agent, events, infer, publish_record, push, record, sign_record, version,
                    wait_final)

pytestmark = pytest.mark.slow


def test_rollback_attack_with_unsigned_record_is_refused(broker, versions, keys, tmp_path):
    """Finding 1: an anonymous client sets allow_downgrade on a hand-made record for an older
    (validly signed) bundle. The record is not signed: refused, and the device stays on 1.1.0."""
    a = agent(tmp_path, broker, versions["v2"], keys)
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/#"])
    try:
        doc, chunks = record(versions["v1"], target="devices/dev1", allow_downgrade=True)
        publish_record(broker, doc, chunks)
        ev = wait_final(w, doc["update_id"])
        assert ev["state"] == "failed" and "not signed" in ev["error"], ev
        assert version(a) == "1.1.0" and infer(a) == 200
        # the same record with a probation window and thresholds an attacker likes, signed with an
        # untrusted key: refused too
        doc, chunks = record(versions["v1"], target="devices/dev1", allow_downgrade=True)
        doc = sign_record(doc, keys / "b.key")
        publish_record(broker, doc, chunks)
        ev = wait_final(w, doc["update_id"])
        assert ev["state"] == "failed" and "trusted key" in ev["error"], ev
        assert version(a) == "1.1.0"
    finally:
        w.stop()
        a.stop()


def _serve(directory):
    hits = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            hits.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, hits


@pytest.mark.parametrize("keyed", [True, False], ids=["with-keys", "no-keys"])
def test_file_and_lan_urls_are_not_fetched(broker, versions, keys, tmp_path, keyed):
    """Finding 2: a record with a file:// URL outside any allowed folder, or an http:// URL on the
    LAN, is refused before anything is read or requested (no hash prefix, no length oracle, no SSRF)."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"root:x:0:0:the device's secret\n" * 3)
    real = hashlib.sha256(secret.read_bytes()).hexdigest()
    lan = tmp_path / "lan"
    lan.mkdir()
    (lan / "admin").write_bytes(b"router admin page")
    httpd, hits = _serve(lan)
    a = agent(tmp_path, broker, versions["v1"], keys, trusted=("a.pub",) if keyed else ())
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/#"])
    try:
        for url, size in ((secret.as_uri(), secret.stat().st_size),
                          (f"http://127.0.0.1:{httpd.server_address[1]}/admin", 17)):
            doc, _ = record(versions["v2"], target="devices/dev1", size=size, sha256="0" * 64,
                            transfer={"method": "url", "url": url})
            if keyed:
                doc = sign_record(doc, keys / "a.key")  # even the fleet's own key cannot point outside the allow list
            publish_record(broker, doc)
            ev = wait_final(w, doc["update_id"])
            assert ev["state"] == "failed" and "not allowed" in ev["error"], ev
        assert not hits, hits
        for e in events(w):
            assert real[:8] not in json.dumps(e), e
        assert version(a) == "1.0.0" and infer(a) == 200
    finally:
        w.stop()
        a.stop()
        httpd.shutdown()


def test_client_nan_inputs_do_not_veto_a_healthy_update(broker, sqrt_bundles, keys, tmp_path):
    """Finding 3: NaN *inputs* during probation make NaN outputs on any model: they are the
    client's doing and must not roll back a healthy update."""
    a = agent(tmp_path, broker, sqrt_bundles["1.0.0"], keys)
    stop = threading.Event()
    sent = []

    def nan_client():
        while not stop.is_set() and len(sent) < 5000:
            sent.append(infer(a, [[float("nan"), 1.0, float("inf"), 4.0]], model="sq", name="x"))

    t = threading.Thread(target=nan_client)
    t.start()
    try:
        wait_until(lambda: len(sent) > 5, 10, what="NaN traffic")
        res = push(broker, sqrt_bundles["1.2.0"], device="dev1", wait=True, sign=keys / "a.key",
                   probation=Probation(seconds=3, requests=100000))
        assert res.devices["dev1"]["state"] == "committed", res.devices
    finally:
        stop.set()
        t.join(15)
        a.stop()
    assert set(sent) == {200}


def test_broker_without_keys_warns(broker, digits_bundle, keys, tmp_path):
    """Finding 4: an agent that takes updates from a broker but trusts no key says so, loudly."""
    a = agent(tmp_path, broker, digits_bundle, keys, trusted=())
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/status"])
    try:
        st = w.wait("dev1/status", lambda p: p.get("online"))
        wait_until(lambda: "no trusted keys" in a.log.read_text(), 10, what="warning in the log")
        assert st["ota"]["signed_updates"] is False
    finally:
        w.stop()
        a.stop()
