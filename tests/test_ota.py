"""OTA updates end to end: real broker, real agent processes, real bundles."""
from __future__ import annotations

import json
import threading
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agents import AgentProc, Watcher, wait_until
from edgeproto.broker import BrokerConfig
from edgeproto.desired import Probation
from otakit import Publisher, publish_record, record, sign_record

pytestmark = [pytest.mark.slow, pytest.mark.agent]
FLEET_KEY: list[Path] = []  # the fleet key that signs desired records (the agents trust its public half)


@pytest.fixture(autouse=True)
def _fleet_key(keys):
    FLEET_KEY[:] = [keys / "a.key"]


def _push(broker, bundle, **flags):
    from otakit import push

    flags.setdefault("sign_key", FLEET_KEY[0])
    return push(broker, bundle, **flags)


def _agent(tmp_path, broker, bundle, keys, *, device="dev1", group=None, env=None, name="data", more=()):
    extra = ("--trusted-key", str(keys / "a.pub"), "--log-format", "text", *more)
    if group:
        extra += ("--group", group)
    return AgentProc(tmp_path / name, bundle=bundle, broker=broker.url, device_id=device, interval=1.0,
                     extra=extra, env=env).start()


def _version(agent) -> str | None:
    meta = agent.metadata()
    return meta["versions"][0] if meta else None


def _infer(agent, x=None) -> int:
    x = np.full((1, 8, 8, 1), 0.5, np.float32) if x is None else x
    body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(agent.base + "/v2/models/digits/infer", data=body),
                                    timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_push_to_device_switches_version(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys)
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/#"])
    try:
        w.wait("dev1/status", lambda p: p.get("online") and p["model"]["version"] == "1.0.0")
        res = _push(broker, versions["v2"], device="dev1", wait=True)
        assert res.ok, res.devices
        assert _version(a) == "1.1.0"
        st = w.wait("dev1/status", lambda p: p["model"] and p["model"]["version"] == "1.1.0"
                    and p["update"]["state"] == "committed")
        assert st["previous_model"]["version"] == "1.0.0"
        import jsonschema

        schemas = Path(__file__).resolve().parent.parent / "docs" / "schemas"
        jsonschema.validate(res.desired, json.loads((schemas / "desired.schema.json").read_text()))
        jsonschema.validate(st, json.loads((schemas / "status.schema.json").read_text()))
        for e in w.of("dev1/events"):
            jsonschema.validate(e, json.loads((schemas / "event.schema.json").read_text()))
        states = [e["state"] for e in w.of("dev1/events") if e.get("update_id") == res.desired["update_id"]]
        for s in ("downloading", "verifying", "staging", "switching", "probation", "committed"):
            assert s in states, states
        assert states.index("verifying") < states.index("switching") < states.index("committed")
        # the previous slot stays on disk for rollbacks
        assert len(list((tmp_path / "data" / "bundles").glob("*.edgepack"))) == 2
    finally:
        w.stop()
        a.stop()


def test_offline_device_catches_up_via_group(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys, device="late", group="lab")
    a.stop()
    res = _push(broker, versions["v2"], group="lab")  # device is offline: desired state is retained
    a2 = _agent(tmp_path, broker, None, keys, device="late", group="lab")
    try:
        wait_until(lambda: _version(a2) == "1.1.0" and _state(tmp_path) == "committed", 60,
                   what="offline device reconciles")
        ended = json.loads((tmp_path / "data" / "update.json").read_text())["ended"]
        assert ended[res.desired["update_id"]] == "committed"
    finally:
        a2.stop()


def test_eight_clients_see_no_errors_during_swap(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys)
    codes, stop = [], threading.Event()

    def client():
        while not stop.is_set() and len(codes) < 20000:
            codes.append(_infer(a))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        res = _push(broker, versions["v2"], device="dev1", wait=True)
        assert res.ok, res.devices
        wait_until(lambda: len(codes) > 50, 10, what="traffic")
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        a.stop()
    assert len(codes) > 50 and set(codes) == {200}, {c: codes.count(c) for c in set(codes)}


def _failed_with(broker, agent, bundle, fragment, *, device="dev1", **kw):
    res = _push(broker, bundle, device=device, wait=True, **kw)
    ev = res.devices[device]
    assert ev["state"] == "failed" and fragment in (ev.get("error") or ""), ev
    assert _version(agent) == "1.0.0" and _infer(agent) == 200  # the old model keeps serving
    return ev


def test_refusals_keep_the_old_model(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys)
    try:
        _failed_with(broker, a, versions["v2b"], "does not verify with any trusted key")
        _failed_with(broker, a, versions["v2u"], "not signed")
        _failed_with(broker, a, versions["v09"], "downgrade refused")
        # allowed on purpose
        res = _push(broker, versions["v09"], device="dev1", wait=True, allow_downgrade=True)
        assert res.ok and _version(a) == "0.9.0"
    finally:
        a.stop()


def test_tampered_chunk_refused(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys)
    a.stop()  # offline while the chunks sit on the broker
    res = _push(broker, versions["v2"], device="dev1")
    topic = res.desired["transfer"]["topic"] + "/chunks/3"
    from edgeproto.mqtt import MqttClient

    c = MqttClient(BrokerConfig(url=broker.url), client_id="tamper")
    c.start()
    c.connected.wait(5)
    assert c.publish_wait(topic, b"\x00" * 4096, retain=True)
    c.stop()
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    a2 = _agent(tmp_path, broker, None, keys)
    try:
        ev = w.wait("dev1/events", lambda e: e["state"] == "failed", timeout=60)
        assert "chunk 3 sha256" in ev["error"]
        assert _version(a2) == "1.0.0"
        assert not list((tmp_path / "data" / "downloads").rglob("bundle.part"))  # nothing half-written kept
    finally:
        w.stop()
        a2.stop()


def _rebundle(src: Path, dest: Path, key: Path, replace: dict[str, bytes]) -> Path:
    """Same manifest with some files replaced (hashes recomputed) and a valid signature: a bundle
    that passes verification but is broken inside."""
    from edgebundle.archive import open_bundle, write_bundle
    from edgebundle import signing

    b = open_bundle(src)
    tmp = dest.parent / f"parts-{dest.stem}"
    tmp.mkdir(parents=True, exist_ok=True)
    files = {}
    with zipfile.ZipFile(src) as z:
        for name in b.manifest.files:
            p = tmp / name
            p.write_bytes(replace.get(name, z.read(name)))
            files[name] = p
    k = signing.load_private_key(key)
    write_bundle(dest, b.manifest, files, signer=lambda mb: signing.sign(mb, k))
    return dest


def test_golden_mismatch_and_warmup_failure_never_activate(broker, versions, keys, tmp_path):
    import io

    from edgebundle.archive import open_bundle

    g = dict(np.load(io.BytesIO(open_bundle(versions["v2"]).read("golden.npz"))))
    for k in g:
        if k.startswith("output."):
            g[k] = g[k] + 0.5
    buf = io.BytesIO()
    np.savez(buf, **g)
    bad_golden = _rebundle(versions["v2"], tmp_path / "bad-golden.edgepack", keys / "a.key",
                           {"golden.npz": buf.getvalue()})
    bad_model = _rebundle(versions["v2"], tmp_path / "bad-model.edgepack", keys / "a.key",
                          {"model.tflite": b"TFL3" + b"\x00" * 512})
    raises = _onnx_that_raises(versions["v2"], tmp_path, keys / "a.key")
    a = _agent(tmp_path, broker, versions["v1"], keys)
    try:
        _failed_with(broker, a, bad_golden, "golden outputs differ")
        _failed_with(broker, a, bad_model, "staging failed")
        ev = _failed_with(broker, a, raises, "staging failed")  # loads fine, raises on its first inference
        assert "Reshape" in ev["error"] or "reshape" in ev["error"], ev
    finally:
        a.stop()


def _onnx_that_raises(like: Path, tmp_path: Path, key: Path) -> Path:
    """A signed ONNX bundle whose session loads but whose first run fails (Reshape to 7 values)."""
    import dataclasses

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgebundle import signing
    from edgebundle.archive import open_bundle, write_bundle

    shape = numpy_helper.from_array(np.array([1, 7], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["image", "shape"], ["output_0"])], "raises",
                          [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 8, 8, 1])],
                          [helper.make_tensor_value_info("output_0", TensorProto.FLOAT, [1, 7])], [shape])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    m = dataclasses.replace(open_bundle(like).manifest, format="onnx", model_file="model.onnx", golden=None,
                            runtime={"name": "onnxruntime", "providers": ["CPUExecutionProvider"]})
    k = signing.load_private_key(key)
    dest = tmp_path / "raises.edgepack"
    write_bundle(dest, m, {"model.onnx": model}, signer=lambda mb: signing.sign(mb, k))
    return dest




def test_unhealthy_in_probation_rolls_back(broker, sqrt_bundles, keys, tmp_path):
    a = _agent(tmp_path, broker, sqrt_bundles["1.0.0"], keys)
    a.model_name = "sq"
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [-1.0, -2.0, 3.0, 4.0]}]}).encode()
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            try:
                urllib.request.urlopen(urllib.request.Request(a.base + "/v2/models/sq/infer", data=body), timeout=5)
            except OSError:
                pass

    t = threading.Thread(target=traffic)
    t.start()
    try:
        res = _push(broker, sqrt_bundles["1.1.0"], device="dev1", wait=True,
                    probation=Probation(seconds=20, requests=100000))
        ev = res.devices["dev1"]
        assert ev["state"] == "rolled_back" and "NaN/Inf" in ev["error"], ev
        assert _version(a) == "1.0.0"
    finally:
        stop.set()
        t.join(10)
        a.stop()


def _publish_partial(broker, bundle: Path, device: str, upto: int, chunk_size: int = 2048) -> dict:
    """Like `edgepack push`, but only the first `upto` chunks reach the broker (a slow publisher)."""
    doc, chunks = record(bundle, target=f"devices/{device}", chunk_size=chunk_size)
    doc = sign_record(doc, FLEET_KEY[0])
    publish_record(broker, doc, chunks, upto=upto)
    return {"desired": doc, "chunks": chunks}


def _publish_rest(broker, info: dict, start: int) -> None:
    p = Publisher(broker.url)
    try:
        for i, chunk in enumerate(info["chunks"][start:], start):
            p.publish(f"{info['desired']['transfer']['topic']}/chunks/{i}", chunk)
    finally:
        p.stop()


def _state(tmp_path) -> str | None:
    try:
        return json.loads((tmp_path / "data" / "update.json").read_text())["state"]
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_during_download_resumes(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys)
    info = _publish_partial(broker, versions["v2"], "dev1", upto=10)
    done = tmp_path / "data" / "downloads" / info["desired"]["sha256"][:16] / "chunks.done"
    wait_until(lambda: done.is_file() and len(done.read_text().split()) >= 10, 30, what="10 chunks on disk")
    a.stop("kill")
    assert _state(tmp_path) == "downloading"
    _publish_rest(broker, info, 10)
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    from datetime import datetime, timezone

    restarted = datetime.now(timezone.utc).isoformat()
    a2 = _agent(tmp_path, broker, None, keys)
    try:
        wait_until(lambda: _version(a2) == "1.1.0" and _state(tmp_path) == "committed", 60, what="resumed update")
        first = next(e for e in w.of("dev1/events") if e.get("progress") and e["ts"] > restarted)
        assert first["progress"]["bytes"] > 10 * 2048  # resumed: the 10 stored chunks were not fetched again
    finally:
        w.stop()
        a2.stop()


def test_sigkill_after_verifying_finishes_update(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys, env={"EDGEPACK_AGENT_FAULT_DELAY": "staging=60"})
    _push(broker, versions["v2"], device="dev1")
    wait_until(lambda: _state(tmp_path) == "staging", 30, what="verified, about to stage")
    a.stop("kill")
    assert _version(a) is None
    from datetime import datetime, timezone

    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    restarted = datetime.now(timezone.utc).isoformat()
    a2 = _agent(tmp_path, broker, None, keys)  # ready means serving a verified model (the old one first)
    try:
        assert _infer(a2) == 200
        wait_until(lambda: _version(a2) == "1.1.0" and _state(tmp_path) == "committed", 60, what="update finished")
        after = [e["state"] for e in w.of("dev1/events") if e["ts"] > restarted]
        assert after[0] == "verifying" and "downloading" not in after, after  # resumed, not re-downloaded
    finally:
        w.stop()
        a2.stop()


def test_sigkill_during_switch_rolls_back(broker, versions, keys, tmp_path):
    a = _agent(tmp_path, broker, versions["v1"], keys)
    _push(broker, versions["v2"], device="dev1", probation=Probation(seconds=60, requests=100000))
    wait_until(lambda: _state(tmp_path) == "probation" and _version(a) == "1.1.0", 30, what="switched, in probation")
    a.stop("kill")
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    a2 = _agent(tmp_path, broker, None, keys)
    try:
        assert _version(a2) == "1.0.0" and _infer(a2) == 200
        ev = w.wait("dev1/events", lambda e: e["state"] == "rolled_back", timeout=30)
        assert "restarted during probation" in ev["error"]
        assert _state(tmp_path) == "rolled_back"
    finally:
        w.stop()
        a2.stop()




def test_out_of_disk_fails_cleanly(broker, versions, keys, tmp_path, small_disk):
    import keras

    from packager.build import BuildOptions, build
    from targets import Precision

    inp = keras.Input((1000,), name="image")
    big = keras.Model(inp, keras.layers.Dense(10)(keras.layers.Dense(1000)(inp)))  # ~4 MB fp32
    big.save(tmp_path / "big.keras")
    res = build(BuildOptions(model=tmp_path / "big.keras", targets=("arm-cpu",), out_dir=tmp_path / "big",
                             name="digits", version="2.0.0", precision=Precision.FP32, bench_runs=3,
                             bench_seconds=0.1, speed_gate=False, sign_key=keys / "a.key"))
    assert res.ok
    a = AgentProc(small_disk / "data", bundle=versions["v1"], broker=broker.url, device_id="dev1", interval=1.0,
                  extra=("--trusted-key", str(keys / "a.pub"))).start()
    try:
        r = _push(broker, res.results[0].bundle, device="dev1", wait=True)
        ev = r.devices["dev1"]
        assert ev["state"] == "failed" and "disk space" in ev["error"], ev
        assert _version(a) == "1.0.0" and _infer(a) == 200
        assert not list((small_disk / "data" / "downloads").rglob("bundle.*"))
        from edgebundle.archive import verify_bundle

        for p in (small_disk / "data" / "bundles").glob("*.edgepack"):
            verify_bundle(p)  # nothing corrupted
    finally:
        a.stop()


def test_url_transfer_http_and_file(broker, versions, keys, tmp_path):
    """--url: the device downloads over HTTP (or file://) instead of MQTT chunks, same checks."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    served = tmp_path / "www"
    served.mkdir()
    for tag in ("v2", "v1"):
        (served / versions[tag].name).write_bytes(versions[tag].read_bytes())

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/elsewhere/"):  # a redirect off the allowed prefix (SSRF through a redirect)
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/{versions['v2'].name}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    a = _agent(tmp_path, broker, versions["v1"], keys, more=("--allow-url", base, "--allow-url", served.as_uri()))
    try:
        url = base + versions["v2"].name
        res = _push(broker, versions["v2"], device="dev1", wait=True, url=url)
        assert res.ok and res.desired["transfer"] == {"method": "url", "url": url}, res.devices
        assert _version(a) == "1.1.0"
        res = _push(broker, versions["v1"], device="dev1", wait=True, allow_downgrade=True,
                    url=(served / versions["v1"].name).as_uri())
        assert res.ok and _version(a) == "1.0.0", res.devices
        res = _push(broker, versions["v2"], device="dev1", wait=True, url=url + ".missing")
        ev = res.devices["dev1"]
        assert ev["state"] == "failed" and "HTTP 404" in ev["error"], ev
        res = _push(broker, versions["v2"], device="dev1", wait=True, url=base + "elsewhere/x")
        ev = res.devices["dev1"]
        assert ev["state"] == "failed" and "redirected" in ev["error"], ev
        assert _version(a) == "1.0.0"
    finally:
        a.stop()
        httpd.shutdown()


def test_unsigned_initial_bundle_refused_when_keys_configured(versions, keys, tmp_path):
    """An unsigned --bundle on a device with trusted keys never becomes active: on a fresh data dir
    the agent exits 5 saying why and keeps nothing (issue 24; it used to stay up serving nothing)."""
    a = AgentProc(tmp_path / "data", bundle=versions["v2u"], interval=60,
                  extra=("--trusted-key", str(keys / "a.pub"), "--log-format", "text")).start(wait_ready=False)
    try:
        assert a.proc.wait(60) == 5
        assert "not signed" in a.log.read_text()
        assert not any((tmp_path / "data").iterdir())  # the empty data dir it was given stays empty
    finally:
        a.stop()


def test_fleet_status_and_push_cli(broker, versions, keys, tmp_path):
    from click.testing import CliRunner

    from edgepack.cli import main

    a = _agent(tmp_path, broker, versions["v1"], keys, device="cli-dev", group="cli")
    try:
        res = CliRunner().invoke(main, ["push", str(versions["v2u"]), "--group", "cli", "--broker", broker.url,
                                        "--wait", "--timeout", "60", "--probation-seconds", "1",
                                        "--sign-key", str(keys / "a.key")])
        assert res.exit_code == 1 and "failed" in res.output and "not signed" in res.output, res.output
        res = CliRunner().invoke(main, ["push", str(versions["v2"]), "--device", "cli-dev", "--broker", broker.url,
                                        "--wait", "--timeout", "60", "--probation-seconds", "1", "--chunk-size",
                                        "8192", "--sign-key", str(keys / "a.key")])
        assert res.exit_code == 0 and "committed" in res.output, res.output
        res = CliRunner().invoke(main, ["fleet", "status", "--broker", broker.url, "--group", "cli", "--json",
                                        "--listen", "2.5"])
        assert res.exit_code == 0, res.output
        rows = json.loads(res.output)
        assert len(rows) == 1 and rows[0]["device_id"] == "cli-dev"
        r = rows[0]
        assert (r["online"], r["model"], r["version"], r["update"]) == (True, "digits", "1.1.0", "committed")
        assert r["errors"] == 0 and r["last_seen"]
        res = CliRunner().invoke(main, ["fleet", "status", "--broker", broker.url])
        assert res.exit_code == 0 and "cli-dev" in res.output and "1.1.0" in res.output
        res = CliRunner().invoke(main, ["push", str(versions["v2"]), "--device", "x", "--broker",
                                        "mqtt://127.0.0.1:1"])
        assert res.exit_code == 1 and "cannot reach the broker" in res.output
    finally:
        a.stop()
