"""Data capture (issue 18): the device's ring of sampled requests (rate, per-minute cap, size cap,
crash leftovers, text), packing a pull, and, on a real agent under digits traffic, `edgepack fleet
capture pull` bringing 200 real samples home over mosquitto and `edgepack build` calibrating on them."""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from device_agent.capture import CapturePolicy, Ring, pack


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _drain(ring: Ring, n: int) -> None:
    deadline = time.monotonic() + 10
    while ring.summary()["kept"] < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ring.summary()["kept"] == n, ring.summary()


def _x(i: int, batch: int = 1) -> dict:
    return {"image": np.full((batch, 8, 8, 1), i, np.float32)}


def test_ring_samples_at_the_rate_and_caps_per_minute(tmp_path):
    draws = iter([0.5, 0.01, 0.2, 0.04] * 50)  # every second request is drawn: 1, 3, 5, 7, 9
    clock = Clock()
    ring = Ring(tmp_path / "c", CapturePolicy(rate=0.05, per_minute=3), rng=lambda: next(draws), clock=clock)
    try:
        for i in range(8):  # two draws in four are under the rate: 4 offered, 3 tokens
            ring.offer(_x(i), {"scores": np.ones((1, 10), np.float32)})
        _drain(ring, 3)
        assert ring.summary()["rate_limited"] == 1
        clock.t = 20.0  # a third of a minute: one token back
        ring.offer(_x(8), {"scores": np.zeros((1, 10), np.float32)})
        ring.offer(_x(9), {"scores": np.zeros((1, 10), np.float32)})
        _drain(ring, 4)
        files = ring.newest()
        assert len(files) == 4 and files[0].name == "000000000003.npz"
        with np.load(files[0]) as z:
                assert sorted(z.files) == ["image", "output:scores"] and z["image"][0, 0, 0, 0] == 9.0  # 1, 3, 5 then 9
    finally:
        ring.close()


def test_ring_keeps_its_size_cap_and_survives_a_restart(tmp_path):
    one = 8 * 8 * 4 + 10 * 4  # an image and its scores
    ring = Ring(tmp_path / "c", CapturePolicy(rate=1.0, per_minute=10_000, max_bytes=5 * (one + 600)))
    try:
        for i in range(20):
            ring.offer(_x(i), {"scores": np.ones((1, 10), np.float32)})
            _drain(ring, i + 1)
        s = ring.summary()
        assert 3 <= s["requests"] <= 5 and s["bytes"] <= 5 * (one + 600), s
        newest = ring.newest()[0]
    finally:
        ring.close()
    (tmp_path / "c" / "000000000099.npz.tmp").write_bytes(b"half a sample")  # a write cut off by a crash
    again = Ring(tmp_path / "c", CapturePolicy(rate=1.0, per_minute=10))
    try:
        assert again.newest()[0] == newest and not list((tmp_path / "c").glob("*.tmp"))
        again.offer(_x(99), {})
        _drain(again, 1)
        assert again.newest()[0].name == "000000000020.npz"  # numbering goes on
    finally:
        again.close()


def test_pack_takes_the_newest_samples_of_one_layout(tmp_path):
    ring = Ring(tmp_path / "c", CapturePolicy(rate=1.0, per_minute=10_000))
    try:
        ring.offer({"image": np.zeros((1, 4, 4, 1), np.float32)}, {})  # another layout, oldest
        for i in range(6):
            ring.offer(_x(i, batch=2), {"scores": np.full((2, 10), i, np.float32)})
        _drain(ring, 7)  # the writer's queue holds 8
        ring.offer({"text": ["a longer text first"]}, {})
        ring.offer({"text": ["héllo", "wörld"]}, {})  # text comes as text, of any length
        _drain(ring, 9)
        held = pack(ring.newest(), 7, tmp_path / "out.npz")
        with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
            img, scores = z["image"], z["output:scores"]
        assert held["samples"] == 7 and img.shape == (7, 8, 8, 1) and scores.shape == (7, 10)
        assert img[:, 0, 0, 0].tolist() == [2, 3, 3, 4, 4, 5, 5]  # the newest, oldest first
        assert held["inputs"] == {"image": [[8, 8, 1], "<f4"]} and held["outputs"] == ["scores"]
        assert len(held["used"]) == 4  # the four newest image requests: what --clear deletes
        text = pack(ring.newest()[:2], 10, tmp_path / "t.npz")
        with np.load(tmp_path / "t.npz", allow_pickle=False) as z:
            assert text["samples"] == 3 and text["skipped"] == 0
            assert z["text"].tolist() == ["a longer text first", "héllo", "wörld"]
        ring.forget(held["used"])
        assert ring.summary()["requests"] == 5
    finally:
        ring.close()


def test_a_text_models_samples_can_be_written_as_lines(tmp_path):
    import io

    from fleet.capture import CaptureFailed, _write

    buf = io.BytesIO()
    np.savez(buf, text=np.asarray(["one\ntwo", "three"]), **{"output:emb": np.ones((2, 4), np.float32)})
    _write(tmp_path / "s.txt", buf.getvalue())
    assert (tmp_path / "s.txt").read_text() == "one two\nthree\n"
    buf = io.BytesIO()
    np.savez(buf, image=np.ones((2, 8, 8, 1), np.float32))
    with pytest.raises(CaptureFailed, match="no text"):
        _write(tmp_path / "i.txt", buf.getvalue())
    assert not (tmp_path / "i.txt").exists()


def test_capture_requests_are_read_strictly_and_match_their_schema():
    import jsonschema

    from edgeproto.bundleref import RecordError
    from edgeproto.capture import CaptureRequest

    schema = json.loads((Path(__file__).parents[1] / "docs/schemas/capture.schema.json").read_text())
    req = CaptureRequest(request_id="r1", target="devices/d1", model="digits", max_samples=200, clear=True,
                         issued="2026-12-02T07:00:00.000+00:00")
    jsonschema.validate(req.to_dict(), schema)
    assert CaptureRequest.parse(json.dumps(req.to_dict()).encode(), source="t") == req
    for bad, why in (({"target": "groups/g"}, "target"), ({"max_samples": 0}, "max_samples"),
                     ({"clear": "yes"}, "clear"), ({"model": "a/b"}, "model")):
        with pytest.raises(RecordError, match=why) as e:
            CaptureRequest.parse(json.dumps(req.to_dict() | bad).encode(), source="t")
        assert e.value.update_id == "r1"
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(req.to_dict() | bad, schema)


def test_capture_settings_are_checked(tmp_path):
    from device_agent.config import load_config
    from edgebundle.errors import InputError

    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d"\n[capture]\nrate = 0.1\nper_minute = 30\nmax_mb = 8\n')
    c = load_config(path=cfg, env={})
    assert (c.capture_rate, c.capture_per_minute, c.capture_max_mb) == (0.1, 30, 8)
    assert load_config(env={}, device_id="d").capture_rate == 0.0  # off by default
    for bad in ({"capture_rate": 1.5}, {"capture_rate": -0.1}, {"capture_max_mb": 0}):
        with pytest.raises(InputError, match="capture"):
            load_config(env={}, device_id="d", **bad)


@pytest.mark.slow
@pytest.mark.agent
def test_fleet_pulls_200_real_samples_and_builds_on_them(tmp_path, broker, versions, keys, digits):
    """A real agent with capture on serves real digits images; `edgepack fleet capture pull` brings 200 of
    them home (the very images sent, with the model's outputs); `edgepack build` calibrates on them. An
    unsigned request is refused by the device, which has trusted keys."""
    import jsonschema
    from click.testing import CliRunner

    from edgebundle.archive import open_bundle
    from edgepack.cli import main
    from otakit import agent

    with np.load(digits["validation"]) as z:
        images = z["image"].astype(np.float32)[:230]
    a = agent(tmp_path, broker, versions["v1"], keys, extra=("--capture-rate", "1.0"),
              env={"EDGEPACK_AGENT_CAPTURE_PER_MINUTE": "100000"})
    try:
        for x in images:
            body = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode()
            urllib.request.urlopen(urllib.request.Request(a.base + "/v2/models/digits/infer", data=body), timeout=10)
        text = urllib.request.urlopen(a.base + "/metrics", timeout=5).read().decode()
        assert 'edgepack_capture_requests{model="digits"}' in text
        run = CliRunner().invoke
        out = tmp_path / "samples.npz"
        unsigned = run(main, ["fleet", "capture", "pull", "--device", "dev1", "-o", str(out), "--broker", broker.url])
        assert unsigned.exit_code != 0 and "not signed" in unsigned.output and not out.exists(), unsigned.output
        deadline = time.monotonic() + 20  # the ring's writer may trail the last responses by a moment
        while time.monotonic() < deadline:
            res = run(main, ["fleet", "capture", "pull", "--device", "dev1", "--model", "digits", "-o", str(out),
                             "--max-samples", "200", "--broker", broker.url, "--sign-key", str(keys / "a.key"),
                             "--json"])
            assert res.exit_code == 0, res.output
            doc = json.loads(res.output)
            if doc["samples"] == 200 and doc.get("skipped") == 0:
                break
        assert doc["samples"] == 200 and doc["inputs"] == {"image": [[8, 8, 1], "<f4"]}, doc
        schema = json.loads((Path(__file__).parents[1] / "docs/schemas/capture.schema.json").read_text())
        jsonschema.validate({k: v for k, v in doc.items() if k != "file"}, schema["$defs"]["result"] | {"$defs": schema["$defs"]})
        with np.load(out, allow_pickle=False) as z:
            got, scores = z["image"], z["output:output_0"]
        assert got.shape == (200, 8, 8, 1) and np.array_equal(got, images[-200:])  # the newest 200, in order
        assert (scores.argmax(1) >= 0).all() and scores.shape == (200, 10)
        assert not list(tmp_path.glob(".samples.npz.*"))
        pull = ["fleet", "capture", "pull", "--device", "dev1", "--broker", broker.url, "--sign-key", str(keys / "a.key")]
        res = run(main, pull + ["-o", str(tmp_path / "first.npz"), "--max-samples", "30", "--clear", "--json"])
        assert res.exit_code == 0 and json.loads(res.output)["cleared"] == 30, res.output
        res = run(main, pull + ["-o", str(tmp_path / "rest.npz"), "--json"])  # what is left on the device
        assert res.exit_code == 0 and json.loads(res.output)["samples"] == 200, res.output
        res = run(main, pull + ["-o", str(tmp_path / "none.npz"), "--model", "nosuch"])
        assert res.exit_code != 0 and "no model 'nosuch'" in res.output and not (tmp_path / "none.npz").exists()

        res = run(main, ["build", str(digits["model"]), "--target", "arm-cpu", "--quantize", "int8",
                         "--calibration", str(out), "--validation", str(digits["validation"]),
                         "-o", str(tmp_path / "rebuilt"), "--name", "digits", "--version", "1.5.0", "--no-html"])
        assert res.exit_code == 0, res.output
        bundle = next((tmp_path / "rebuilt").glob("*.edgepack"))
        cal = open_bundle(bundle).manifest.provenance["calibration"]
        assert cal["source"].endswith("samples.npz") and cal["samples"] == 200, cal
    finally:
        a.stop()
