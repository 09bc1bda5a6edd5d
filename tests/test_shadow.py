"""Shadow evaluation before the switch (issue 18): a candidate with the serving model's interface
and speed but permuted class labels is stopped in shadow (never switched, never served a request);
a retrained one (other weights) passes and is switched. Real agent, real mosquitto, real digits traffic."""
from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from agents import Watcher, wait_until
from otakit import agent, push, version

pytestmark = [pytest.mark.slow, pytest.mark.agent]


@pytest.fixture(scope="module")
def permuted(digits, keys, tmp_path_factory):
    """digits 1.2.0: the same CNN with its class scores permuted (a label-order mistake): same
    interface, same speed, wrong answers."""
    import keras

    from packager.build import BuildOptions, build
    from targets import Precision

    d = tmp_path_factory.mktemp("permuted")
    base = keras.models.load_model(digits["model"])
    perm = np.roll(np.eye(10, dtype=np.float32), 1, axis=1)
    head = keras.layers.Dense(10, use_bias=False, trainable=False, name="permuted_scores")  # unique in any process
    model = keras.Model(base.inputs, head(base.outputs[0]))
    head.set_weights([perm])
    model.save(d / "permuted.keras")
    res = build(BuildOptions(model=d / "permuted.keras", targets=("arm-cpu",), out_dir=d, name="digits",
                             version="1.2.0", precision=Precision.INT8, calibration=str(digits["calibration"]),
                             validation=str(digits["validation"]), bench_runs=5, bench_seconds=0.2, speed_gate=False,
                             sign_key=keys / "a.key"))
    assert res.ok, res.results[0].error
    return res.results[0].bundle


@pytest.fixture(scope="module")
def retrained(digits, keys, tmp_path_factory):
    """digits 1.1.0: the CNN trained 10 more epochs (new weights, same data): a good update."""
    from packager.build import BuildOptions, build
    from packager.examples.digits import train
    from targets import Precision

    d = tmp_path_factory.mktemp("retrained")
    info = train(d, epochs=10, start=digits["model"])
    assert info["test_accuracy"] >= 0.9, info
    res = build(BuildOptions(model=info["model"], targets=("arm-cpu",), out_dir=d / "out", name="digits",
                             version="1.1.0", precision=Precision.INT8, calibration=str(digits["calibration"]),
                             validation=str(digits["validation"]), bench_runs=5, bench_seconds=0.2, speed_gate=False,
                             sign_key=keys / "a.key"))
    assert res.ok, res.results[0].error
    return res.results[0].bundle


class Traffic:
    """Real digits test images, one client, until stopped (bounded)."""

    def __init__(self, a, images: np.ndarray):
        self.a, self.images, self.codes = a, images, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        for i in range(100_000):
            if self._stop.is_set():
                return
            x = self.images[i % len(self.images)][None]
            body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            try:
                with urllib.request.urlopen(urllib.request.Request(self.a.base + "/v2/models/digits/infer",
                                                                   data=body), timeout=10) as r:
                    self.codes.append(r.status)
            except urllib.error.HTTPError as e:
                self.codes.append(e.code)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(15)


def _served(a, ver: str) -> float:
    """nv_inference_request_success for digits at `ver` (0 when the series is absent)."""
    with urllib.request.urlopen(a.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'version="{ver}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_wrong_model_is_stopped_in_shadow_and_a_good_one_switches(tmp_path, broker, keys, digits, versions,
                                                                   permuted, retrained):
    from edgeproto.desired import Shadow

    with np.load(digits["validation"]) as z:
        images = z["image"].astype(np.float32)
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/events"])
    a = agent(tmp_path, broker, versions["v1"], keys)
    traffic = Traffic(a, images)
    shadow = Shadow(seconds=3.0, rate=1.0, min_agreement=0.9, min_samples=10)
    try:
        seen = []  # /metrics during the shadow phase
        stop = threading.Event()

        def scrape() -> None:
            for _ in range(600):
                if stop.wait(0.2):
                    return
                with urllib.request.urlopen(a.base + "/metrics", timeout=5) as r:
                    seen.extend(x for x in r.read().decode().splitlines() if x.startswith("edgepack_shadow_"))

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        res = push(broker, permuted, device="dev1", wait=True, timeout=120, sign=keys / "a.key", shadow=shadow)
        stop.set()
        scraper.join(10)
        ev = res.devices["dev1"]
        assert ev["state"] == "failed" and ev["error"].startswith("rejected in shadow: agreement"), ev
        assert any(x.startswith('edgepack_shadow_requests{model="digits",kind="compared"}') for x in seen), seen[:5]
        low = [float(x.rsplit(" ", 1)[1]) for x in seen if x.startswith("edgepack_shadow_agreement{")]
        assert low and low[-1] < 0.5, low
        # push --wait may end on the retained status; the figures are on the final event
        ev = w.wait("/events", lambda e: e.get("update_id") == ev["update_id"] and e["state"] == "failed", 15)
        fig = ev["shadow"]
        assert fig["compared"] >= 10 and fig["agreement"] < 0.2 and fig["candidate_p50_ms"] > 0, fig
        assert version(a) == "1.0.0" and _served(a, "1.2.0") == 0 and _served(a, "1.0.0") > 0
        states = [e["state"] for e in w.of("/events") if e.get("update_id") == ev["update_id"]]
        assert "shadow" in states and "switching" not in states, states

        from edgebundle.archive import open_bundle

        new, old = (open_bundle(b).manifest for b in (retrained, versions["v1"]))
        assert new.files[new.model_file].sha256 != old.files[old.model_file].sha256  # other weights
        res = push(broker, retrained, device="dev1", wait=True, timeout=120, sign=keys / "a.key", shadow=shadow)
        ev = res.devices["dev1"]
        assert ev["state"] == "committed", ev
        ev = w.wait("/events", lambda e: e.get("update_id") == ev["update_id"] and e["state"] == "committed", 15)
        assert ev["shadow"]["agreement"] >= 0.9, ev
        assert version(a) == "1.1.0"
        traffic.stop()
        assert set(traffic.codes) == {200}, sorted(set(traffic.codes))
    finally:
        traffic.stop()
        a.stop()
        w.stop()


def test_a_rollout_with_a_shadow_stops_the_wrong_model_in_the_canary(tmp_path, broker, keys, digits, versions,
                                                                    permuted):
    """The same in a rollout: the canary's shadow rejects the permuted model, the wave fails, the
    rest of the group never gets it, and nobody was served by it."""
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation, Shadow
    from fleet import rollout as ro
    from fleet.errors import RolloutStopped
    from fleet.records import Signer
    from fleet.rollout_state import RolloutSettings

    with np.load(digits["validation"]) as z:
        images = z["image"].astype(np.float32)
    agents = [agent(tmp_path, broker, versions["v1"], keys, device=f"d{i}", group="g", name=f"data{i}")
              for i in range(2)]
    traffic = [Traffic(a, images) for a in agents]
    try:
        settings = RolloutSettings(waves="1,100%", soak_s=2.0, baseline_s=1.0, wave_timeout_s=90.0, lease_s=3.0,
                                   probation=Probation(seconds=1.0, requests=1000),
                                   shadow=Shadow(seconds=3.0, rate=1.0, min_agreement=0.9, min_samples=10))
        with pytest.raises(RolloutStopped) as e:
            ro.start(permuted, BrokerConfig(url=broker.url), group="g", settings=settings,
                     previous_bundle=versions["v1"], signer=Signer.load(keys / "a.key"), chunk_size=4096)
        rec = e.value.record
        assert rec.waves[0].state != "passed" and len(rec.waves[0].devices) == 1, rec
        (dev, outcome), = rec.waves[0].outcomes.items()
        assert outcome == "failed" and "rejected in shadow: agreement" in rec.reason, (outcome, rec.reason)
        assert {version(a) for a in agents} == {"1.0.0"} and all(_served(a, "1.2.0") == 0 for a in agents)
    finally:
        for t in traffic:
            t.stop()
        for a in agents:
            a.stop()
