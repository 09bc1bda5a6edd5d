"""Drift statistics (edgeruntime.drift): what a build records and what a device counts, on real data
(scikit-learn's digits: the images the digits example trains on)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgeruntime.drift import PSI_SHIFTED, Monitor, TensorRef, reference


def _digits():
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.float32)[..., None] / 16.0  # (1797, 8, 8, 1), as the example feeds it
    return x[:900], x[900:]


def test_own_data_stays_under_the_threshold_and_shifted_data_crosses_it():
    ref_x, live = _digits()
    ref = TensorRef.from_dict(json.loads(json.dumps(reference("image", ref_x).to_dict())))  # as in a manifest
    m = Monitor([ref])
    for x in live[:300]:  # one request at a time, as the agent sees them
        m.observe("image", x[None])
    own = m.window()["image"]
    assert own["values"] == 300 * 64 and own["psi"] < 0.1, own
    for x in live[:300]:
        m.observe("image", 1.0 - x[None])  # inverted images
    inverted = m.window()["image"]
    for x in live[:300]:
        m.observe("image", np.clip(x[None] + 0.3, 0, 1))  # brighter
    shifted = m.window()["image"]
    assert inverted["psi"] > PSI_SHIFTED and shifted["psi"] > PSI_SHIFTED, (inverted, shifted)
    for x in live[:300]:
        m.observe("image", np.roll(x[None], 1, axis=2))  # shifted one pixel right: per-pixel histograms see it
    moved = m.window()["image"]
    assert moved["psi"] > PSI_SHIFTED, moved
    assert m.window()["image"]["values"] == 0  # each window starts empty


def test_kinds_tokens_classes_and_channels():
    rng = np.random.default_rng(0)
    ids = np.zeros((200, 32), np.int64)
    for i, n in enumerate(rng.integers(5, 20, 200)):
        ids[i, :n] = rng.integers(1000, 2000, n)
    r = reference("input_ids", ids)
    assert r.kind == "tokens" and len(r.edges) == 1 and abs(sum(r.fractions[0]) - 1) < 1e-3
    m = Monitor([r])
    long = np.ones((1, 32), np.int64)  # every live text at the maximum length
    for _ in range(50):
        m.observe("input_ids", long)
    assert m.window()["input_ids"]["psi"] > PSI_SHIFTED
    probs = rng.dirichlet(np.ones(10), 500).astype(np.float32)
    c = reference("output_0", probs, output=True)
    assert c.kind == "classes" and len(c.fractions[0]) == 10
    rgb = rng.random((20, 8, 8, 3), dtype=np.float32)  # 192 values a sample: per colour channel
    assert len(reference("image", rgb).edges) == 3 and len(reference("image", rgb[:, :2, :2]).edges) == 12


@pytest.mark.slow
@pytest.mark.agent
def test_the_agent_scores_drift_per_telemetry_window(tmp_path, broker, versions, keys, digits):
    """The digits bundle carries its references; a real agent fed its own test images stays under the
    threshold, fed inverted images crosses it within one telemetry window (telemetry and /metrics)."""
    import urllib.request

    from agents import Watcher, wait_until
    from edgebundle.archive import open_bundle
    from otakit import agent

    m = open_bundle(versions["v1"]).manifest
    assert [r["name"] for r in m.drift["inputs"]] == ["image"] and m.drift["outputs"][0]["kind"] == "classes"
    with np.load(digits["validation"]) as z:
        images = z["image"].astype(np.float32)
    w = Watcher(broker.url, ["edgepack/v1/devices/dev1/telemetry"])
    a = agent(tmp_path, broker, versions["v1"], keys)

    def send(batch) -> None:
        for x in batch:
            body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            urllib.request.urlopen(urllib.request.Request(a.base + "/v2/models/digits/infer", data=body), timeout=10)

    def window(batch, pred):
        """Images sent until a telemetry window has counted 100 of them: a window is one telemetry interval,
        and on a loaded host 150 requests can straddle two (CI run 27 waited 30 s on a window that never
        held 100). Bounded: 60 s, at most 400 rounds of 50 requests."""
        def got(p):
            d = (((p.get("models") or {}).get("digits") or {}).get("drift") or {}).get("image") or {}
            return d.get("values", 0) >= 64 * 100 and pred(d["psi"])
        deadline = time.monotonic() + 60
        for i in range(400):
            send(batch[(i % 3) * 50:][:50])
            p = next((p for p in reversed(w.of("/telemetry")) if got(p)), None)
            if p is not None:
                return p["models"]["digits"]["drift"]
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        raise TimeoutError(f"no telemetry window counted 100 images in 60 s: {w.of('/telemetry')[-1:]}")

    try:
        own = window(images[:150], lambda psi: True)
        assert own["image"]["psi"] < PSI_SHIFTED, own
        inverted = window(1.0 - images[:150], lambda psi: psi > PSI_SHIFTED)
        assert inverted["image"]["psi"] > PSI_SHIFTED and inverted["output_0"]["psi"] is not None, inverted
        text = urllib.request.urlopen(a.base + "/metrics", timeout=5).read().decode()
        assert 'edgepack_drift_psi{model="digits",tensor="image"}' in text
    finally:
        a.stop()
        w.stop()
