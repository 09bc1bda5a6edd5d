"""Drift statistics (edgeruntime.drift): what a build records and what a device counts, on real data
(scikit-learn's digits: the images the digits example trains on)."""
from __future__ import annotations

import json

import numpy as np

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
