"""The threat model's attacks against real agents and a real broker (docs/security.md).

Each test plays an attacker with plain broker access (or a careless operator) and checks that the
device refuses, says why on its events topic, and keeps serving the model it had."""
from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agents import Watcher, wait_until
from edgeproto.desired import Probation
from otakit import (ROOT, agent, events, infer, publish_record, push, record, sign_record, version,
                    wait_final)

pytestmark = [pytest.mark.slow, pytest.mark.agent]


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
    """Finding 3: NaN *inputs* during probation are the client's doing and must not roll back a healthy
    update. Since issue 24 the API refuses them (400, before the model runs) instead of answering NaN."""
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
    assert set(sent) == {400}  # refused, every one: never the model's error


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


def test_replayed_and_redirected_records_are_refused(broker, versions, keys, tmp_path):
    """Rollback by replay: a validly signed old record (0.9.0, allow_downgrade) captured from the
    broker and published again after a newer one is refused; so is a record signed for another
    device replayed onto this one (mix-and-match of topics), and a record whose bundle is not
    the one it names."""
    a = agent(tmp_path, broker, versions["v1"], keys)
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/#"])
    try:
        old = push(broker, versions["v09"], device="dev1", wait=True, allow_downgrade=True, sign=keys / "a.key")
        assert old.ok and version(a) == "0.9.0", old.devices
        new = push(broker, versions["v1"], device="dev1", wait=True, sign=keys / "a.key")
        assert new.ok and version(a) == "1.0.0", new.devices
        assert old.topic == new.topic == f"{ROOT}/devices/dev1/models/digits/desired"  # push's default: the model's
        publish_record(broker, old.desired, topic=old.topic)  # the captured record, as is, on its own topic
        ev = w.wait("dev1/events", lambda e: e.get("update_id") == old.desired["update_id"]
                    and e.get("state") == "failed")
        assert "a replayed record" in ev["error"], ev
        other = push(broker, versions["v09"], device="dev2", allow_downgrade=True, sign=keys / "a.key")
        publish_record(broker, other.desired, topic=old.topic)
        ev = wait_final(w, other.desired["update_id"])
        assert ev["state"] == "failed" and "meant for 'devices/dev2/models/digits'" in ev["error"], ev
        # signed by the fleet, but naming 1.1.0 while pinning the 0.9.0 bundle's bytes
        doc, chunks = record(versions["v09"], target="devices/dev1/models/digits", version="1.1.0")
        doc = sign_record(doc, keys / "a.key")
        publish_record(broker, doc, chunks)
        ev = wait_final(w, doc["update_id"])
        assert ev["state"] == "failed" and "the bundle is digits 0.9.0, the desired record says" in ev["error"], ev
        time.sleep(0.5)
        assert version(a) == "1.0.0" and infer(a) == 200
    finally:
        w.stop()
        a.stop()


def test_fleet_key_rotation_retires_the_old_key(broker, versions, keys, tmp_path):
    """Key compromise: devices trust only an offline root key. Fleet key a (generation 1) is
    replaced by b (generation 2) with one push; from then on a record signed with a (stolen
    laptop) is refused, and a restart keeps serving the bundle signed by b."""
    import shutil

    from edgebundle.archive import sign_bundle
    from edgebundle.signing import generate_keys, load_private_key, load_public_key
    from edgebundle.trust import certify

    generate_keys(tmp_path / "root.key", tmp_path / "root.pub")
    root = load_private_key(tmp_path / "root.key")
    cert_a = certify(load_public_key(keys / "a.pub"), root, serial=1)
    cert_b = certify(load_public_key(keys / "b.pub"), root, serial=2)
    seed = tmp_path / versions["v1"].name
    shutil.copy(versions["v1"], seed)
    sign_bundle(seed, load_private_key(keys / "a.key"), cert=cert_a)  # the seed bundle carries its key's certificate
    a = agent(tmp_path, broker, seed, keys, trusted=(), extra=("--root-key", str(tmp_path / "root.pub")))
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/#"])
    try:
        res = push(broker, versions["v2"], device="dev1", wait=True, sign=keys / "a.key", key_cert=cert_a)
        assert res.ok and version(a) == "1.1.0", res.devices
        res = push(broker, versions["v2b"], device="dev1", wait=True, sign=keys / "b.key", key_cert=cert_b)
        assert res.ok, res.devices  # generation 2 from now on
        res = push(broker, versions["v09"], device="dev1", wait=True, allow_downgrade=True, sign=keys / "a.key",
                   key_cert=cert_a)
        ev = res.devices["dev1"]
        assert ev["state"] == "failed" and "replaced by generation 2" in ev["error"], ev
        res = push(broker, versions["v1"], device="dev1", wait=True, sign=keys / "a.key")  # no certificate at all
        assert res.devices["dev1"]["state"] == "failed", res.devices
        st = w.wait("dev1/status", lambda p: (p.get("ota") or {}).get("key_serial") == 2)
        assert st["ota"]["root_keys"] and not st["ota"]["trusted_keys"]
        a.stop()
        a.start()
        assert version(a) == "1.1.0" and infer(a) == 200  # the active bundle (key b) still loads
    finally:
        w.stop()
        a.stop()


def test_endless_data_is_bounded(broker, versions, keys, tmp_path):
    """Endless data: records, chunk counts and bundle sizes over the device's limits are refused
    before anything is fetched; a chunk longer than the chunk size is refused without buffering."""
    env = {"EDGEPACK_AGENT_MAX_RECORD_BYTES": "8192", "EDGEPACK_AGENT_MAX_CHUNKS": "16",
           "EDGEPACK_AGENT_MAX_BUNDLE_BYTES": str(versions["v2"].stat().st_size + 1000)}
    a = agent(tmp_path, broker, versions["v1"], keys, env=env)
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/events"])
    try:
        size = versions["v2"].stat().st_size
        cases = [(dict(chunk_size=1024), "transfer.chunks"), (dict(padding="x" * 10000), "at most 8192"),
                 (dict(size=size + 4096), "size")]
        for over, fragment in cases:
            doc, _ = record(versions["v2"], target="devices/dev1",
                            **{k: v for k, v in over.items() if k != "chunk_size"},
                            **({"chunk_size": over["chunk_size"]} if "chunk_size" in over else {}))
            publish_record(broker, sign_record(doc, keys / "a.key"))
            ev = w.wait("dev1/events", lambda e: e.get("state") == "failed" and fragment in (e.get("error") or ""))
            assert ev["update_id"] in (doc["update_id"], None), ev
        doc, chunks = record(versions["v2"], target="devices/dev1", chunk_size=8192)
        chunks[0] = chunks[0] * 50  # 400 KB where 8 KB belong
        publish_record(broker, sign_record(doc, keys / "a.key"), chunks)
        ev = wait_final(w, doc["update_id"])
        assert ev["state"] == "failed" and "more than the chunk size" in ev["error"], ev
        assert version(a) == "1.0.0" and infer(a) == 200
    finally:
        w.stop()
        a.stop()


def test_slow_retrieval_has_a_deadline(broker, versions, keys, tmp_path):
    """Slow retrieval: a source that trickles bytes cannot hold an update forever."""
    from http.server import BaseHTTPRequestHandler

    data = versions["v2"].read_bytes()
    stop = threading.Event()

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 512):
                if stop.is_set():
                    return
                self.wfile.write(data[i:i + 512])
                self.wfile.flush()
                time.sleep(0.5)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    env = {"EDGEPACK_AGENT_TRANSFER_GRACE_S": "1", "EDGEPACK_AGENT_MIN_TRANSFER_RATE": "1000000",
           "EDGEPACK_AGENT_MAX_ATTEMPTS": "1"}
    a = agent(tmp_path, broker, versions["v1"], keys, env=env, extra=("--allow-url", base))
    try:
        t0 = time.monotonic()
        res = push(broker, versions["v2"], device="dev1", wait=True, timeout=30, url=base + "v2.edgepack",
                   sign=keys / "a.key")
        ev = res.devices["dev1"]
        assert ev["state"] == "failed" and "too slow" in ev["error"], ev
        assert time.monotonic() - t0 < 15
        assert version(a) == "1.0.0" and infer(a) == 200
    finally:
        stop.set()
        a.stop()
        httpd.shutdown()


def test_withheld_update_shows_in_push_wait(broker, versions, keys, tmp_path):
    """Freeze: a device that never gets (or never acts on) a record cannot be told apart from one
    that is slow, but the fleet sees it: `push --wait` ends with timed_out and exit code 1."""
    from click.testing import CliRunner

    from edgepack.cli import main

    res = CliRunner().invoke(main, ["push", str(versions["v2"]), "--device", "never-online", "--broker", broker.url,
                                    "--wait", "--timeout", "2", "--sign-key", str(keys / "a.key")])
    assert res.exit_code == 1 and "timed_out" in res.output, res.output
