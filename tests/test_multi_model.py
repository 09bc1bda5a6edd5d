"""Several models per device (issue 17): one agent serves the digits CNN and a second model, each
with its own update lifecycle, addressed by name on the v2 API, over MQTT and in its data folder.
Real agents, real mosquitto, real bundles; every wait is bounded."""
from __future__ import annotations

import json
import threading
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from agents import Watcher, wait_until
from otakit import agent, publish_record, record, sign_record, state
from tinybundles import infer_body, log_bundle

pytestmark = [pytest.mark.slow, pytest.mark.agent]
TOKEN = "s3cret"


def _logm(d: Path, keys: Path, version: str) -> Path:
    from edgebundle.archive import sign_bundle
    from edgebundle.signing import load_private_key

    b = log_bundle(d / version, version=version)
    sign_bundle(b, load_private_key(keys / "a.key"))
    return b


def _call(a, path: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, object]:
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(a.base + path, data=body, headers=auth)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _digits_body() -> bytes:
    x = np.full((1, 8, 8, 1), 0.5, np.float32)
    return json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]}).encode()


def _version(a, model: str) -> str | None:
    code, meta = _call(a, f"/v2/models/{model}")
    return meta["versions"][0] if code == 200 else None


def _publish(broker, keys, bundle, target: str) -> dict:
    doc, chunks = record(bundle, target=target)
    doc = sign_record(doc, keys / "a.key")
    publish_record(broker, doc, chunks)
    return doc


class Load:
    """Clients sending requests to both models until stopped; counts what did not answer 200."""

    def __init__(self, a, clients: int = 2):
        self.a, self.stop, self.sent, self.failed = a, threading.Event(), 0, []
        self._lock = threading.Lock()
        bodies = (("digits", _digits_body()), ("logm", infer_body([1, 2, 3, 4])))
        self.threads = [threading.Thread(target=self._run, args=bodies[i % 2], daemon=True)
                        for i in range(2 * clients)]
        for t in self.threads:
            t.start()

    def _run(self, model: str, body: bytes) -> None:
        for _ in range(100_000):  # bounded; stopped long before
            if self.stop.is_set():
                return
            code, out = _call(self.a, f"/v2/models/{model}/infer", body)
            with self._lock:
                self.sent += 1
                if code != 200:
                    self.failed.append((model, code, out))

    def end(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


def test_one_agent_two_models_each_updated_alone(tmp_path, broker, versions, keys):
    """digits + logm in one agent: both served by name; logm updated under load on its own topic
    (0 failed requests on either model, digits untouched); an old-style record still updates the
    first model; the repository API lists, unloads and loads; a signed removal takes logm away."""
    import tritonclient.http as httpclient

    logm1, logm2 = _logm(tmp_path / "b", keys, "1.0.0"), _logm(tmp_path / "b", keys, "1.1.0")
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/#"])
    a = agent(tmp_path, broker, None, keys, extra=("--bundle", str(versions["v1"]), "--bundle", str(logm1),
                                                   "--api-token", TOKEN))
    try:
        assert (_version(a, "digits"), _version(a, "logm")) == ("1.0.0", "1.0.0")
        code, index = _call(a, "/v2/repository/index", b"{}")
        assert code == 200 and {(m["name"], m["version"], m["state"]) for m in index} == {
            ("digits", "1.0.0", "READY"), ("logm", "1.0.0", "READY")}
        st = _call(a, "/status")[1]
        assert set(st["models"]) == {"digits", "logm"} and st["model"]["name"] == "digits"
        assert {m["threads"] for m in st["models"].values()} == {1}  # two cores split between two models
        assert all(m["memory"]["need_bytes"] > 0 for m in st["models"].values())

        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{a.port}")
        hdr = {"Authorization": f"Bearer {TOKEN}"}
        assert {m["name"] for m in c.get_model_repository_index(headers=hdr)} == {"digits", "logm"}
        x = np.array([[1, 2, 3, 4]], np.float32)
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        assert np.allclose(c.infer("logm", [inp], headers=hdr).as_numpy("y"), np.log(x), atol=1e-5)
        img = httpclient.InferInput("image", [1, 8, 8, 1], "FP32")
        img.set_data_from_numpy(np.full((1, 8, 8, 1), 0.5, np.float32))
        assert c.infer("digits", [img], headers=hdr).as_numpy("output_0").shape == (1, 10)
        c.close()

        load = Load(a)
        doc = _publish(broker, keys, logm2, "devices/dev1/models/logm")
        wait_until(lambda: _version(a, "logm") == "1.1.0", 60, what="logm 1.1.0")
        w.wait("/events", lambda p: p.get("update_id") == doc["update_id"] and p["state"] == "committed", 30)
        load.end()
        assert load.sent > 50 and not load.failed, (load.sent, load.failed[:3])
        assert _version(a, "digits") == "1.0.0" and state(a.data_dir) is None  # digits never had an update
        assert state(a.data_dir / "models.d" / "logm") == "committed"
        events = [p for p in w.of("/events") if p.get("update_id") == doc["update_id"]]
        assert events and {p["model"] for p in events} == {"logm"}

        legacy = _publish(broker, keys, versions["v2"], "devices/dev1")  # an older pusher: the first model
        wait_until(lambda: _version(a, "digits") == "1.1.0", 60, what="digits 1.1.0")
        w.wait("/events", lambda p: p.get("update_id") == legacy["update_id"] and p["state"] == "committed", 30)
        assert _version(a, "logm") == "1.1.0"
        own = _publish(broker, keys, versions["v2"], "devices/dev1/models/digits")  # digits' own record now
        w.wait("/events", lambda p: p.get("update_id") == own["update_id"], 30)
        ignored = _publish(broker, keys, versions["v09"], "devices/dev1")  # an old-style record loses: said so
        ev = w.wait("/events", lambda p: p.get("update_id") == ignored["update_id"] and p["state"] == "failed", 30)
        assert ev["error"].startswith("not applied: model digits follows its own record on ") and \
            own["update_id"] in ev["error"], ev
        assert _version(a, "digits") == "1.1.0"

        assert _call(a, "/v2/repository/models/logm/unload", b"", token=None)[0] == 401
        assert _call(a, "/v2/repository/models/logm/unload", b"")[0] == 200
        assert _call(a, "/v2/models/logm/ready")[0] == 503 and _call(a, "/v2/health/ready")[0] == 200
        assert [m["state"] for m in _call(a, "/v2/repository/index", b"{}")[1] if m["name"] == "logm"] == [
            "UNAVAILABLE"]
        assert _call(a, "/v2/repository/models/logm/load", b"")[0] == 200 and _version(a, "logm") == "1.1.0"

        removal = sign_record({"schema": "edgepack.desired/1", "update_id": "rm-logm", "remove": True,
                               "issued": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                               "target": "devices/dev1/models/logm"}, keys / "a.key")
        publish_record(broker, removal)
        w.wait("/events", lambda p: p.get("update_id") == "rm-logm" and p["state"] == "removed", 30)
        assert _call(a, "/v2/models/logm/ready")[0] == 404 and _version(a, "digits") == "1.1.0"
        assert not (a.data_dir / "models.d" / "logm").exists()
        st = w.wait("/status", lambda p: p.get("models") is not None and "logm" not in p["models"], 15)
        assert set(st["models"]) == {"digits"}
    finally:
        a.stop()
        w.stop()


def test_a_model_that_does_not_fit_is_refused_before_staging(tmp_path, broker, versions, keys):
    """A second model pushed to a device with a memory budget it would exceed: the update fails
    with the figures, nothing is loaded, the first model serves throughout."""
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    a = agent(tmp_path, broker, versions["v1"], keys, extra=("--memory-budget-mb", "20"))
    try:
        doc = _publish(broker, keys, _logm(tmp_path / "b", keys, "1.0.0"), "devices/dev1/models/logm")
        ev = w.wait("/events", lambda p: p.get("update_id") == doc["update_id"] and p["state"] == "failed", 60)
        assert "needs about" in ev["error"] and "of the 20 MB memory budget" in ev["error"], ev["error"]
        assert ev["model"] == "logm" and _call(a, "/v2/models/logm/ready", token=None)[0] == 503
        assert _version(a, "digits") == "1.0.0" and _call(a, "/v2/health/ready", token=None)[0] == 200
    finally:
        a.stop()
        w.stop()


@pytest.mark.parametrize("phase", ["downloading", "verifying", "staging", "switching", "probation"])
def test_a_kill_during_one_models_update_leaves_the_other_serving(tmp_path, broker, versions, keys, phase):
    """SIGKILL of the agent in each state of logm's update: after the restart digits serves its
    version and never had an update; logm resumes and commits (before the switch) or is rolled back
    to 1.0.0 (after it), exactly as a one-model agent does."""
    logm1, logm2 = _logm(tmp_path / "b", keys, "1.0.0"), _logm(tmp_path / "b", keys, "1.1.0")
    extra = ("--bundle", str(versions["v1"]), "--bundle", str(logm1))
    a = agent(tmp_path, broker, None, keys, extra=extra, env={"EDGEPACK_AGENT_FAULT_DELAY": f"{phase}=30"})
    try:
        _publish(broker, keys, logm2, "devices/dev1/models/logm")
        wait_until(lambda: state(a.data_dir / "models.d" / "logm") == phase, 60, what=phase)
        a.stop("kill")
        a.env = None
        a.start()
        assert _version(a, "digits") == "1.0.0"
        want = ("rolled_back", "1.0.0") if phase in ("switching", "probation") else ("committed", "1.1.0")
        wait_until(lambda: state(a.data_dir / "models.d" / "logm") == want[0], 60, what=want[0])
        assert _version(a, "logm") == want[1] and _version(a, "digits") == "1.0.0"
        assert state(a.data_dir) is None
    finally:
        a.stop()


def test_a_failing_update_of_one_model_leaves_both_serving(tmp_path, broker, versions, keys, sqrt_bundles):
    """digits + sq: sq 1.1.0 gives NaN on the live (negative) traffic and is rolled back in
    probation; sq 1.2.0 over its staging latency budget never switches. Throughout, digits serves
    1.0.0 with no update of its own, and sq serves 1.0.0 after each failure."""
    from edgeproto.desired import Probation

    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    a = agent(tmp_path, broker, None, keys,
              extra=("--bundle", str(versions["v1"]), "--bundle", str(sqrt_bundles["1.0.0"])))
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [-1.0, -2.0, 3.0, 4.0]}]}).encode()
    stop, codes = threading.Event(), {"digits": [], "sq": []}

    def traffic():
        for _ in range(100_000):  # bounded; stopped long before
            if stop.is_set():
                return
            codes["sq"].append(_call(a, "/v2/models/sq/infer", body)[0])
            codes["digits"].append(_call(a, "/v2/models/digits/infer", _digits_body())[0])

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        import fleet
        from edgeproto.broker import BrokerConfig

        def push(bundle, **terms):
            opts = fleet.PushOptions(device="dev1", model="sq", transfer=fleet.TransferSpec(chunk_size=4096),
                                     terms=fleet.Terms(**terms), sign_key=keys / "a.key",
                                     follow=fleet.Follow(timeout=90))
            return fleet.push(bundle, BrokerConfig(url=broker.url), opts).devices["dev1"]

        ev = push(sqrt_bundles["1.1.0"], probation=Probation(seconds=20, requests=100_000))
        assert ev["state"] == "rolled_back" and "NaN/Inf" in ev["error"], ev
        assert (_version(a, "sq"), _version(a, "digits")) == ("1.0.0", "1.0.0")
        ev = push(sqrt_bundles["1.2.0"], staging_max_p95_ms=1e-6)
        assert ev["state"] == "failed" and "over the budget" in ev["error"], ev
        assert (_version(a, "sq"), _version(a, "digits")) == ("1.0.0", "1.0.0")
        assert state(a.data_dir) is None  # digits never had an update
        assert not [e for e in w.of("/events") if e.get("model") == "digits"]
        stop.set()
        t.join(15)
        assert set(codes["digits"]) == {200} and set(codes["sq"]) == {200}, (set(codes["digits"]), set(codes["sq"]))
    finally:
        stop.set()
        a.stop()
        w.stop()
