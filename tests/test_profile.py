"""Profile jobs (`edgepack profile`, issue 11 §1) with real agents and a real broker: device figures
come back, the serving model never changes and never fails a request, untrusted bundles are refused,
and `edgepack build --profile-on` lets the device's numbers choose the precision."""
from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import pytest

from agents import AgentProc, Watcher
from edgeproto.broker import BrokerConfig
from edgeproto.jobs import BenchSettings, ProfileJob
from edgeproto.desired import RecordError
from otakit import ROOT, agent, infer, wait_until

QUICK = BenchSettings(runs=60, warmup=3, max_seconds=1.0)


def _bundle(build, target: str) -> Path:
    return next(r.bundle for r in build.results if r.target == target)


def _profile(broker, bundles, **kw):
    from fleet.profile import Timeouts, profile

    kw.setdefault("bench", QUICK)
    kw.setdefault("timeouts", Timeouts(accept_s=15, job_s=60))
    return profile(list(bundles), BrokerConfig(url=broker.url), device=kw.pop("device", "dev1"), chunk_size=8192,
                   **kw)


class Clients:
    """Production traffic: one client sending requests back to back until stopped (bounded)."""

    def __init__(self, a, max_s: float = 120):
        self.a, self.max_s, self.sent, self.failed = a, max_s, 0, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import time

        end = time.monotonic() + self.max_s
        while not self._stop.is_set() and time.monotonic() < end:
            code = infer(self.a)
            self.sent += 1
            if code != 200:
                self.failed.append(code)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(15)


@pytest.mark.agent
def test_profile_reports_device_figures_and_never_touches_the_serving_model(broker, digits_build, tmp_path):
    serving, probe = _bundle(digits_build, "arm-cpu"), _bundle(digits_build, "x86-cpu")
    a = AgentProc(tmp_path / "data", bundle=serving, broker=broker.url, extra=("--log-format", "text")).start()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/status"])
    try:
        w.wait("dev1/status", lambda s: s.get("online") is True)
        active = (tmp_path / "data" / "active.json").read_text()
        before = a.metadata()
        with Clients(a) as traffic:
            wait_until(lambda: traffic.sent >= 5, 10, what="traffic flowing")
            [r] = _profile(broker, [probe])
            sent_during = traffic.sent
        f = r.figures
        assert r.state == "done" and r.error is None
        lat = f["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert f["throughput_ips"] > 0 and f["runs"] >= 5 and f["load_ms"] > 0
        assert isinstance(f["rss_delta_bytes"], int)
        assert f["runtime"] == "onnxruntime" and f["provider"] == "CPUExecutionProvider"  # x86-cpu is ONNX
        assert f["golden_ok"] is True and f["golden"]["checked"] >= 1
        assert r.bundle["precision"] == "int8" and r.bundle["target"] == "x86-cpu"
        # production kept going, and nothing failed
        assert traffic.failed == [] and sent_during >= 10
        # status showed the job while it ran, and shows none after
        assert any((s.get("profile") or {}).get("job_id") == r.job_id for s in w.of("dev1/status"))
        w.wait("dev1/status", lambda s: s.get("online") and s.get("profile") is None and s is w.of("dev1/status")[-1])
        # the serving model, the store and the disk are as before
        assert a.metadata() == before
        assert (tmp_path / "data" / "active.json").read_text() == active
        assert not any((tmp_path / "data" / "profile").iterdir())
        assert infer(a) == 200
    finally:
        w.stop()
        a.stop()


def _tamper(src: Path, dest: Path) -> Path:
    """The same manifest and signature, with one byte of the model file changed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith(".tflite"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            zout.writestr(info, data)
    return dest


@pytest.mark.agent
def test_untrusted_profile_bundles_and_jobs_are_refused_when_keys_are_configured(broker, versions, keys, tmp_path):
    from fleet.profile import ProfileRefused

    a = agent(tmp_path, broker, versions["v1"], keys)
    try:
        with pytest.raises(ProfileRefused, match=r"refused .*verification failed: .*(not signed|unsigned)"):
            _profile(broker, [versions["v2u"]], sign_key=keys / "a.key")
        with pytest.raises(ProfileRefused, match=r"refused .*verification failed: .*do not match the manifest"):
            _profile(broker, [_tamper(versions["v2"], tmp_path / "tampered.edgepack")], sign_key=keys / "a.key")
        with pytest.raises(ProfileRefused, match="refused .*not signed"):
            _profile(broker, [versions["v2"]])  # a good bundle, but the job itself is unsigned
        with pytest.raises(ProfileRefused, match="refused .*signature"):
            _profile(broker, [versions["v2"]], sign_key=keys / "b.key")  # signed by a key it does not trust
        [ok] = _profile(broker, [versions["v2"]], sign_key=keys / "a.key")
        assert ok.state == "done" and ok.figures["golden_ok"] is True and ok.bundle["version"] == "1.1.0"
        assert a.metadata()["versions"] == ["1.0.0"]  # never activated
    finally:
        a.stop()


@pytest.mark.agent
def test_profile_says_clearly_when_the_device_is_unknown_or_offline(broker, digits_bundle, tmp_path):
    from click.testing import CliRunner

    from edgepack.cli import main

    res = CliRunner().invoke(main, ["profile", str(digits_bundle), "--device", "nobody", "--broker", broker.url])
    assert res.exit_code == 1 and "has never reported" in res.output and "Traceback" not in res.output
    a = AgentProc(tmp_path / "data", bundle=digits_bundle, broker=broker.url, extra=("--log-format", "text")).start()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/status"])
    try:
        w.wait("dev1/status", lambda s: s.get("online") is True)
        a.stop()
        w.wait("dev1/status", lambda s: s.get("online") is False)
    finally:
        w.stop()
    res = CliRunner().invoke(main, ["profile", str(digits_bundle), "--device", "dev1", "--broker", broker.url])
    assert res.exit_code == 1 and "is offline" in res.output and "Traceback" not in res.output


def test_profile_job_records_are_parsed_strictly():
    job = {"schema": "edgepack.profile-job/1", "job_id": "j1", "target": "devices/dev1", "name": "m",
           "version": "1.0.0", "sha256": "a" * 64, "size": 10,
           "transfer": {"method": "mqtt", "topic": f"{ROOT}/bundles/{'a' * 64}", "chunk_size": 10, "chunks": 1,
                        "chunk_sha256": ["b" * 64]}, "bench": {"threads": 2, "runs": 50}}
    parsed = ProfileJob.parse(json.dumps(job).encode(), source="t", topic_prefix=ROOT)
    assert parsed.bench.threads == 2 and parsed.bench.runs == 50 and parsed.bench.max_seconds == 20.0
    for field, value, said in [("target", "groups/g", "target"), ("bench", {"max_seconds": 1e9}, "max_seconds"),
                               ("bench", {"turbo": 1}, "unknown"), ("schema", "x", "schema"),
                               ("size", -1, "size")]:
        with pytest.raises(RecordError, match=said):
            ProfileJob.parse(json.dumps(dict(job, **{field: value})).encode(), source="t", topic_prefix=ROOT)


@pytest.mark.agent
def test_profile_on_lets_the_device_numbers_choose_the_precision(broker, digits, digits_build, tmp_path):
    """An agent whose inferences of one precision are slowed (the diagnostic knob) stands in for a
    device that disagrees with this host: where the host finds int8 slower than fp32 (LiteRT on
    x86 often does for tiny models), the device slows fp32 and int8 is chosen; where the host finds
    int8 fine, the device slows int8 and the build moves down the ladder."""
    from packager.build import BuildOptions, build
    from edgepack.cli import profile_on_device
    from packager.device_profile import DeviceTarget

    serving = _bundle(digits_build, "arm-cpu")  # int8, timed against fp32 on this host when it was built
    host_int8_slower = next(r for r in digits_build.results if r.target == "arm-cpu").report["latency_ms"][
        "ratio"]["verdict"] == "slower"
    slowed = "fp32" if host_int8_slower else "int8"
    a = AgentProc(tmp_path / "data", bundle=serving, broker=broker.url, extra=("--log-format", "text"),
                  env={"EDGEPACK_AGENT_PROFILE_DIAGNOSTIC_DELAY": f"{slowed}=15"}).start()
    w = Watcher(broker.url, [f"{ROOT}/devices/dev1/status"])
    try:
        w.wait("dev1/status", lambda s: s.get("online") is True)
        res = build(BuildOptions(model=digits["model"], targets=("arm-cpu",), out_dir=tmp_path / "out", name="digits",
                                 calibration=str(digits["calibration"]), validation=str(digits["validation"]),
                                 bench_seconds=0.5,
                                 profile_on=DeviceTarget(device="dev1", broker=BrokerConfig(url=broker.url),
                                                         bench=BenchSettings(runs=30, warmup=2, max_seconds=1.0),
                                                         profiler=profile_on_device)))
    finally:
        w.stop()
        a.stop()
    [t] = res.results
    assert t.ok, t.error
    int8 = next(c for c in t.report["candidates"] if c["candidate"] == "int8")
    host, device = int8["latency"]["ratio"], int8["device_latency"]["ratio"]
    assert int8["accuracy_drop_points"] is not None and int8["size_bytes"] < t.report["size_bytes"]["fp32_model"]
    # The host's verdict on a few-microsecond model can differ between two builds (the fixture's and
    # this one): what is asserted is that the device's figures, far from the host's, decide.
    if slowed == "int8":  # the host alone kept int8 when the fixture was built
        assert device["median"] > 2 * host["median"], (host, device)
        assert device["verdict"] == "slower" and int8["device_latency"]["b_ms"] >= 15
        assert int8["verdict"] == "slower" and "on device dev1" in int8["why"]
        assert t.report["precision"] != "int8"
    else:  # the host alone dropped int8 as slower; on the device it is far faster
        assert device["median"] < host["median"] / 2, (host, device)
        assert device["verdict"] == "faster" and int8["device_latency"]["a_ms"] >= 15
        assert t.report["precision"] == "int8" and int8["verdict"] == "chosen"
    if t.report["precision"] != "fp32":  # a quantized choice passed the device's gate and says so
        assert t.report["device_latency"]["device"] == "dev1"
    assert res.to_dict()["shared"]["profiled_on"] == "dev1"
    from packager.report import build_table

    text = build_table(res.to_dict())
    assert "on dev1" in text.split("arm-cpu:")[1]  # the candidate table shows the device beside the host
    from packager.html_report import render  # and so does the HTML report (--report-html)

    page = render(res.to_dict())
    assert "device latency vs fp32 (p50)" in page and "on dev1" in page.split('id="arm-cpu"')[1]
