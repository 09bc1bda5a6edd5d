"""The agent's KServe v2 API, against a real agent process serving the digits bundle."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from agents import AgentProc

pytestmark = [pytest.mark.slow, pytest.mark.agent]


@pytest.fixture(scope="module")
def agent(digits_bundle, tmp_path_factory):
    a = AgentProc(tmp_path_factory.mktemp("api") / "data", bundle=digits_bundle, interval=60,
                  extra=("--log-format", "text")).start()
    yield a
    assert a.stop() == 0  # SIGTERM stops it cleanly


def _req(agent, path, body=None, headers=None, method=None):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    r = urllib.request.Request(agent.base + path, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(r, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _image(seed=0):
    return np.random.default_rng(seed).random((1, 8, 8, 1), dtype=np.float32)


def _infer_body(x, name="image", datatype="FP32", shape=None):
    return {"inputs": [{"name": name, "shape": list(shape or x.shape), "datatype": datatype,
                        "data": x.reshape(-1).tolist()}]}


def test_health_and_metadata(agent):
    assert _req(agent, "/v2/health/live") == (200, {"live": True})
    assert _req(agent, "/v2/health/ready") == (200, {"ready": True, "state": "serving"})
    code, meta = _req(agent, "/v2/models/digits")
    assert code == 200 and meta["versions"] == ["1.0.0"]
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [1, 8, 8, 1]}]
    assert meta["outputs"][0]["shape"] == [1, 10]
    assert _req(agent, "/v2/models/digits/ready") == (200, {"name": "digits", "ready": True})
    assert _req(agent, "/v2/models/digits/versions/1.0.0/ready")[0] == 200


def test_infer_matches_in_process_api(agent, digits_bundle):
    from device_agent import load_bundle

    x = _image(1)
    code, res = _req(agent, "/v2/models/digits/infer", {"id": "r1", **_infer_body(x)})
    assert code == 200 and res["id"] == "r1" and res["model_version"] == "1.0.0"
    out = res["outputs"][0]
    assert out["datatype"] == "FP32" and out["shape"] == [1, 10]
    local = load_bundle(digits_bundle).infer({"image": x})["output_0"]
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(1, 10), local, atol=1e-6)
    # A batch of 3 on a model whose batch axis is fixed at 1 (TFLite): three runs, outputs stacked
    # in order, each what it is alone (issue 24, finding 7).
    xs = np.concatenate([_image(s) for s in (1, 5, 6)])
    code, res = _req(agent, "/v2/models/digits/infer", _infer_body(xs))
    assert code == 200 and res["outputs"][0]["shape"] == [3, 10], res
    got = np.asarray(res["outputs"][0]["data"]).reshape(3, 10)
    np.testing.assert_allclose(got[0], local[0], atol=1e-6)
    for i, seed in ((1, 5), (2, 6)):
        code, one = _req(agent, "/v2/models/digits/infer", _infer_body(_image(seed)))
        np.testing.assert_allclose(got[i], np.asarray(one["outputs"][0]["data"]), atol=1e-6)
    code, res = _req(agent, "/v2/models/digits/infer", _infer_body(np.zeros((3, 9, 8, 1), np.float32)))
    assert code == 400 and "has shape [3, 9, 8, 1]" in res["error"]  # a batch of the wrong shape: as before


def test_tritonclient_unchanged(agent):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.port}")
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    assert c.get_model_metadata("digits")["name"] == "digits"
    x = _image(2)
    for binary in (True, False):  # tritonclient's default binary tensor extension, and plain JSON
        inp = httpclient.InferInput("image", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        res = c.infer("digits", [inp], outputs=[httpclient.InferRequestedOutput("output_0", binary_data=binary)])
        y = res.as_numpy("output_0")
        assert y.shape == (1, 10) and abs(float(y.sum()) - 1.0) < 0.05
    # Triton's model configuration and statistics extensions (issue 24, finding 7)
    cfg = c.get_model_config("digits")
    assert cfg["name"] == "digits" and cfg["max_batch_size"] == 0 and cfg["backend"] == "litert"
    assert cfg["input"] == [{"name": "image", "data_type": "TYPE_FP32", "dims": [1, 8, 8, 1]}], cfg["input"]
    assert [o["name"] for o in cfg["output"]] == ["output_0"]
    [st] = c.get_inference_statistics("digits")["model_stats"]
    assert st["name"] == "digits" and st["version"] == "1.0.0" and st["inference_count"] >= 2
    ok = st["inference_stats"]["success"]
    assert ok["count"] >= 2 and ok["ns"] > 0 and st["last_inference"] > 1.7e12
    assert st["inference_stats"]["compute_infer"]["ns"] <= ok["ns"]
    every = c.get_inference_statistics()["model_stats"]
    assert [(m["name"], m["version"]) for m in every] == [("digits", "1.0.0")]
    c.close()


@pytest.mark.parametrize("body,code,fragment", [
    (_infer_body(_image(), name="img"), 400, "unknown input(s) ['img']"),
    (_infer_body(np.zeros((1, 9, 8, 1), np.float32)), 400, "has shape [1, 9, 8, 1]"),
    (_infer_body(np.zeros((1, 8, 8, 1), np.int32), datatype="INT32"), 400, "is int32"),
    (_infer_body(_image(), shape=[1, 8, 8, 2]), 400, "64 values for shape"),
    (_infer_body(_image(), datatype="FP99"), 400, "unknown datatype"),
    ({"inputs": []}, 400, "non-empty 'inputs'"),
    (b"{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_4xx(agent, body, code, fragment):
    got, res = _req(agent, "/v2/models/digits/infer", body)
    assert got == code and fragment in res["error"], res


def test_unknown_model_and_route(agent):
    code, res = _req(agent, "/v2/models/other/infer", _infer_body(_image()))
    assert code == 404 and "unknown model 'other'" in res["error"]
    assert _req(agent, "/v2/models/digits/versions/9.9.9")[0] == 404
    assert _req(agent, "/v2/nothing")[0] == 404
    assert _req(agent, "/v2/models/digits/infer", method="GET")[0] == 405


def test_body_over_limit(digits_bundle, tmp_path):
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, interval=60).start()
    try:
        # default limit is 16 MiB; send 17 MiB
        code, res = _req(a, "/v2/models/digits/infer", b"x" * (17 << 20))
        assert code == 413 and "over the limit" in res["error"]
        assert _req(a, "/v2/health/live")[0] == 200  # still serving
    finally:
        a.stop()


def test_bearer_token(digits_bundle, tmp_path):
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, interval=60, extra=("--api-token", "s3cret")).start()
    try:
        assert _req(a, "/v2/models/digits")[0] == 401
        assert _req(a, "/v2/models/digits", headers={"Authorization": "Bearer nope"})[0] == 401
        assert _req(a, "/v2/models/digits", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert _req(a, "/v2/health/ready")[0] == 200  # probes stay open
    finally:
        a.stop()


def test_concurrent_clients(agent):
    errors, done = [], []

    def client(k):
        for i in range(25):
            code, res = _req(agent, "/v2/models/digits/infer", _infer_body(_image(k * 100 + i)))
            (done if code == 200 else errors).append(code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(done) == 200


def test_agent_never_imports_tensorflow_packager_or_fleet(digits_bundle, tmp_path):
    """Run the agent in a fresh interpreter, serve a request, then list what got imported."""
    code = f"""
import json, sys, threading
from device_agent.config import load_config
from device_agent.service import Agent
cfg = load_config(env={{}}, data_dir={str(tmp_path / 'd')!r}, bundle={str(digits_bundle)!r}, api_port=0,
                  telemetry_interval=60)
agent = Agent(cfg)
ready = threading.Event()
t = threading.Thread(target=lambda: agent.run(ready=ready), daemon=True)
t.start()
assert ready.wait(30)
out = agent.model.infer({{"image": __import__("numpy").zeros((1, 8, 8, 1), "float32")}})
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf2onnx", "packager", "fleet", "onnx"))
print(json.dumps({{"bad": bad, "outputs": list(out)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["outputs"] == ["output_0"] and report["bad"] == []
