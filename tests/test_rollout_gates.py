"""Rollout gate rules and wave planning (pure functions: no broker)."""
from __future__ import annotations

import pytest

from edgebundle.errors import InputError
from fleet.gates import FieldGate, Gates, Window, baseline_p95, judge_device, judge_wave, plan_waves


def _w(count=50, errors=0, nonfinite=0, p95=1.0, **fields):
    return Window(count=count, errors=errors, nonfinite=nonfinite, p95_ms=p95, fields=fields)


def test_plan_waves_default_and_small_groups():
    devs = [f"d{i:03d}" for i in range(1000)]
    assert [len(w) for w in plan_waves(devs, "1,10%,50%,100%")] == [1, 99, 400, 500]
    assert [len(w) for w in plan_waves(devs[:3], "1,10%,50%,100%")] == [1, 1, 1]
    assert plan_waves(devs[:1], "1,10%,50%,100%") == [["d000"]]
    assert sum(len(w) for w in plan_waves(devs[:7], "2,3")) == 7  # the last wave always reaches everyone
    with pytest.raises(InputError, match="--waves item"):
        plan_waves(devs, "1,ten")


def test_latency_ratio_against_the_devices_own_p95():
    g = Gates(max_latency_ratio=1.25)
    base = baseline_p95([_w(p95=2.0), _w(p95=2.2), _w(count=0, p95=None), _w(p95=1.8)])
    assert base == 2.0
    ok = judge_device(outcome="committed", baseline=base, windows=[_w(p95=2.4)] * 3, gates=g)
    slow = judge_device(outcome="committed", baseline=base, windows=[_w(p95=4.1)] * 3, gates=g)
    assert ok["verdict"] == "ok" and ok["latency_ratio"] == 1.2
    assert slow["verdict"] == "breach" and "2.05x its own 2.00 ms" in slow["reasons"][0]


def test_error_rate_nonfinite_field_and_too_little_traffic():
    g = Gates(max_error_rate=0.02, min_requests=20, fields=(FieldGate.parse("system.rss_mb<=100"),))
    errs = judge_device(outcome="committed", baseline=1.0, windows=[_w(count=40, errors=10)], gates=g)
    assert errs["verdict"] == "breach" and "error rate 10/50" in errs["reasons"][0]
    # requests refused as bad input count too: an update that renamed an input breaks every client
    refused = judge_device(outcome="committed", baseline=1.0, windows=[
        Window(count=40, errors=0, nonfinite=0, p95_ms=1.0, rejected=10)], gates=g)
    assert refused["verdict"] == "breach" and refused["reasons"][0].endswith("(10 refused as bad input)")
    nan = judge_device(outcome="committed", baseline=1.0, windows=[_w(nonfinite=1)], gates=g)
    assert nan["verdict"] == "breach" and "NaN/Inf" in nan["reasons"][0]
    fat = judge_device(outcome="committed", baseline=1.0, windows=[_w(**{"system.rss_mb": 180.0})], gates=g)
    assert fat["verdict"] == "breach" and "system.rss_mb = 180" in fat["reasons"][0]
    quiet = judge_device(outcome="committed", baseline=1.0, windows=[_w(count=3)], gates=g)
    assert quiet["verdict"] == "too_little_traffic"
    failed = judge_device(outcome="rolled_back", baseline=1.0, windows=[], gates=g)
    assert failed["verdict"] == "failed"


def test_judge_wave_counts_failures_against_max_failed():
    ok = {"verdict": "ok", "reasons": []}
    bad = {"verdict": "breach", "reasons": ["p95 too high"]}
    thin = {"verdict": "too_little_traffic", "reasons": ["3 requests"]}
    readings = {"a": ok, "b": bad, "c": thin, "d": ok}
    passed, why = judge_wave(readings, Gates(max_failed="0"))
    assert not passed and "b: p95 too high" in why and "too little traffic" in why
    assert judge_wave(readings, Gates(max_failed="25%"))[0]
    with pytest.raises(InputError, match="--max-failed"):
        Gates(max_failed="lots").allowed_failures(4)
    with pytest.raises(InputError, match="--gate-field"):
        FieldGate.parse("cpu > 3")


def test_rollout_start_checks_the_bundle_before_the_broker(tmp_path):
    from edgebundle.errors import EdgepackError
    from edgeproto.broker import BrokerConfig
    from fleet import rollout

    bogus = tmp_path / "model.edgepack"
    bogus.write_bytes(b"not a bundle")
    with pytest.raises(EdgepackError) as e:  # port 1: nothing listens, but the bundle is wrong first
        rollout.start(bogus, BrokerConfig(url="mqtt://127.0.0.1:1"), group="g")
    assert "broker" not in str(e.value).lower()
