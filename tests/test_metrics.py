"""Agent metrics: streaming statistics that count every request, GET /metrics in the Prometheus text
format (parsed with prometheus_client's parser), telemetry's `nonfinite`, and the Grafana dashboard
checked against what a real running agent exports."""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agents import AgentProc, Watcher
from tinybundles import infer_body, log_bundle

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"


# ---- streaming statistics ----
def test_every_request_is_counted_past_150k():
    from device_agent.stats import _NBUCKETS, InferenceStats

    s = InferenceStats()
    rng = np.random.default_rng(0)
    lat = rng.lognormal(0.5, 0.8, 160_000)
    for i, ms in enumerate(lat.tolist()):
        s.record(ms, nonfinite=(i % 1000 == 0), model=("m", "1"))
    for _ in range(7):
        s.record(None, ok=False, model=("m", "1"))
    w = s.window()
    assert w["count"] == 160_000 and w["errors"] == 7 and w["nonfinite"] == 160
    assert w["throughput_ips"] == pytest.approx(160_000 / w["window_s"], rel=0.01)
    exact = np.percentile(lat, [50, 95, 99], method="inverted_cdf")
    for key, want in zip(("p50", "p95", "p99"), exact):
        assert w["latency_ms"][key] == pytest.approx(want, rel=0.011), key
    assert w["latency_ms"]["mean"] == pytest.approx(lat.mean(), abs=1e-4)  # exact, rounded
    assert len(s._all.hist.counts) == 0 and s.total == 160_000  # the window was reset; totals were not
    assert s.window(slot="m")["count"] == 160_000 and s.totals("m")["errors"] == 7  # the model's own window
    (_, c), = s.per_model()
    assert (c.success, c.failure, c.nonfinite, c.request_h.count) == (160_000, 7, 160, 160_000)
    # bounded memory: at most one counter per log bucket, however many requests
    s2 = InferenceStats()
    for ms in rng.uniform(0.0, 5e6, 20_000).tolist():  # also far past the top bucket
        s2.record(ms)
    assert len(s2._all.hist.counts) <= _NBUCKETS
    assert s2.window()["latency_ms"]["p99"] <= 5e6


def test_quantiles_of_tiny_and_constant_windows():
    from device_agent.stats import LogHistogram

    h = LogHistogram()
    assert h.summary() is None
    h.add(0.0)  # a 0 ms request (timer resolution) is still counted
    h.add(2.5)
    assert h.n == 2 and h.quantile(0.5) < 0.002 and h.quantile(0.99) == 2.5  # 1 us resolution at the bottom
    c = LogHistogram()
    for _ in range(1000):
        c.add(3.0)
    assert c.summary() == {"p50": 3.0, "p95": 3.0, "p99": 3.0, "mean": 3.0}  # clamped to the exact min/max


def test_nonfinite_detection():
    from device_agent.stats import has_nonfinite

    assert not has_nonfinite([np.ones((2, 3), np.float32), np.arange(4)])
    assert not has_nonfinite([np.full(1000, 3e38, np.float32)])  # would overflow a float32 sum
    assert not has_nonfinite([np.array([1e308, 1e308])])  # the float64 sum overflows; confirmed finite
    assert has_nonfinite([np.array([1.0, np.nan], np.float16)])
    assert has_nonfinite([np.arange(3), np.array([np.inf, -np.inf], np.float32)])
    assert not has_nonfinite([np.zeros(0, np.float32)])


# ---- a real agent ----
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real agent (tiny ONNX log model) reporting to a real mosquitto. The bundle asks for Jetson's
    providers first, as a jetson-gpu bundle does: this host has neither, so it runs on the CPU."""
    from brokers import Broker

    d = tmp_path_factory.mktemp("metrics")
    broker = Broker(d / "broker").start()
    gpu = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    a = AgentProc(d / "data", bundle=log_bundle(d / "b", providers=gpu), broker=broker.url, interval=0.5).start()
    a.model_name = "logm"
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/#"])
    yield a, w
    w.stop()
    a.stop()
    broker.stop()


def _get(a, path, token=None):
    req = urllib.request.Request(a.base + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def _post(a, body):
    req = urllib.request.Request(a.base + "/v2/models/logm/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(fam, name=None, **labels) -> float:
    got = [s.value for s in fam.samples if (name is None or s.name == name)
           and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (fam.name, name, labels, fam.samples[:5])
    return got[0]


@pytest.mark.broker
@pytest.mark.agent
def test_metrics_endpoint_counts_what_the_agent_served(served):
    a, w = served
    ok, nan, bad = 12, 5, 3
    for _ in range(ok):
        assert _post(a, infer_body([1, 2, 3, 4])) == 200
    for _ in range(nan):
        assert _post(a, infer_body([1, -1, 0, 4])) == 200  # log(-1) = NaN, log(0) = -Inf
    for _ in range(bad):
        assert _post(a, b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}') == 400
    status, ctype, body = _get(a, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    fams = _families(body.decode())
    lb = {"model": "logm", "version": "1.0.0"}
    served_n = ok + nan
    assert _value(fams["nv_inference_request_success"], **lb) == served_n
    # bad input is refused, not the model's failure (issue 24, finding 6: 400s turned the fleet page red)
    assert _value(fams["nv_inference_request_failure"], **lb) == 0
    assert _value(fams["edgepack_inference_rejected"], **lb) == bad  # the parser drops _total
    assert _value(fams["nv_inference_count"], **lb) == served_n
    assert _value(fams["nv_inference_exec_count"], **lb) == served_n
    assert _value(fams["edgepack_inference_nonfinite"], **lb) == nan
    req_us = _value(fams["nv_inference_request_duration_us"], **lb)
    parts = sum(_value(fams[f"nv_inference_{p}_duration_us"], **lb)
                for p in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < parts <= req_us + 4 * served_n  # the phases add up to the request (rounding to whole us)
    for part in ("request", "queue", "compute"):
        fam = fams[f"edgepack_inference_{part}_duration_seconds"]
        assert fam.type == "histogram"
        buckets = [s for s in fam.samples if s.name.endswith("_bucket")]
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf" and counts[-1] == served_n
        assert _value(fam, f"{fam.name}_count", **lb) == served_n
    info = fams["edgepack_model_info"].samples[0].labels
    assert info["model"] == "logm" and info["runtime"] == "onnxruntime" and len(info["bundle_sha256"]) == 64
    # a GPU bundle on a host without CUDA runs on the CPU, and says so: metrics, status, a warning (issue 24)
    assert info["provider"] == "CPUExecutionProvider"
    missing = {x.labels["provider"] for x in fams["edgepack_model_provider_missing"].samples if x.value == 1}
    assert missing == {"TensorrtExecutionProvider", "CUDAExecutionProvider"}, missing
    note = "TensorrtExecutionProvider, CUDAExecutionProvider not available here: running on CPUExecutionProvider"
    assert note in _get(a, "/status")[2].decode()
    assert any('"level": "warning"' in ln and note in ln for ln in a.log.read_text().splitlines())
    assert _value(fams["edgepack_agent_state"], state="serving") == 1
    assert _value(fams["edgepack_agent_state"], state="building engine") == 0
    assert _value(fams["edgepack_update_state"], state="idle") == 1
    assert _value(fams["edgepack_model_ready"]) == 1
    assert _value(fams["edgepack_mqtt_connected"]) == 1
    assert _value(fams["process_resident_memory_bytes"]) > 10e6
    assert _value(fams["process_cpu_seconds"]) > 0  # the parser drops a counter's _total
    assert "edgepack_telemetry_buffer_messages" in fams
    # /stats peeks at the telemetry window; the readiness answer names the state
    status, _, body = _get(a, "/stats")
    assert status == 200 and json.loads(body)["totals"] == {"count": served_n, "errors": 0, "nonfinite": nan, "rejected": bad}
    assert json.loads(_get(a, "/v2/health/ready")[2]) == {"ready": True, "state": "serving"}
    assert json.loads(_get(a, "/status")[2])["state"]["state"] == "serving"
    # telemetry windows carry `nonfinite`, follow the schema, and add up to what was served
    import jsonschema

    schema = json.loads((SCHEMAS / "telemetry.schema.json").read_text())
    last = w.wait("/telemetry", lambda p: p["totals"]["count"] == served_n, timeout=10)
    jsonschema.validate(last, schema)
    windows = [p["inference"] for p in w.of("/telemetry") if p["seq"] <= last["seq"]]
    assert sum(x["nonfinite"] for x in windows) == nan and sum(x["count"] for x in windows) == served_n
    assert sum(x["errors"] for x in windows) == 0 and sum(x["rejected"] for x in windows) == bad
    assert last["totals"]["rejected"] == bad and last["totals"]["errors"] == 0


@pytest.mark.agent
def test_metrics_sit_behind_the_api_token(tmp_path):
    a = AgentProc(tmp_path / "data", bundle=log_bundle(tmp_path / "b"), extra=("--api-token", "s3cret")).start()
    try:
        assert _get(a, "/metrics")[0] == 401 and _get(a, "/status")[0] == 401
        status, _, body = _get(a, "/metrics", token="s3cret")
        assert status == 200 and "nv_inference_request_success" in _families(body.decode())
        assert _get(a, "/v2/health/ready")[0] == 200  # probes stay open
    finally:
        a.stop()


# ---- the Grafana dashboard ----
_PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "le", "instance", "model", "version",
                 "without", "on", "ignoring", "group_left", "avg", "max", "min", "count", "state"}


def _queried_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    names = set()
    for e in exprs:
        e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
        e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
        e = re.sub(r'"[^"]*"', "", e)
        e = re.sub(r"\b\d+(\.\d+)?(e\d+)?\b", "", e)  # numbers (1e6)
        for tok in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
            if tok not in _PROMQL_WORDS and not tok.startswith("label_values"):
                names.add(tok)
    return names


@pytest.mark.broker
@pytest.mark.agent
def test_grafana_dashboard_queries_only_what_the_agent_exports(served):
    a, _ = served
    path = ROOT / "deploy" / "grafana" / "edgepack-agent.json"
    dash = json.loads(path.read_text())
    # importable: the shape Grafana's import takes, a datasource input, unique panel ids
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    # the committed JSON is what the generator writes
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dashboard", path.with_name("make_dashboard.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.dashboard() == dash, "run python deploy/grafana/make_dashboard.py"
    # every series it queries exists on a real agent
    text = _get(a, "/metrics")[2].decode()
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            exported |= {name} | ({f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == "histogram" else set())
    queried = _queried_metrics(dash)
    assert len(queried) >= 20, queried
    assert queried <= exported, f"not exported by the agent: {sorted(queried - exported)}"
