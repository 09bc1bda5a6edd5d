"""Agent pieces without a broker: configuration layers, the in-process API on every
runtime the build host has, quantized I/O, and `edgepack-agent bench`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.config import load_config
from edgebundle.errors import InputError, RuntimeUnavailableError


def test_config_layers(tmp_path):
    toml = tmp_path / "agent.toml"
    toml.write_text('device_id = "from-file"\ngroups = ["a", "b"]\ntelemetry_interval = 10\n'
                    '[api]\nport = 9000\n[broker]\nurl = "mqtt://broker.local:1884"\nusername = "u"\n'
                    '[buffer]\nmax_messages = 50\n')
    cfg = load_config(path=toml, env={})
    assert (cfg.device_id, cfg.groups, cfg.api_port, cfg.telemetry_interval) == ("from-file", ("a", "b"), 9000, 10.0)
    assert cfg.broker.host == "broker.local" and cfg.broker.port == 1884 and cfg.buffer_max_messages == 50
    env = {"EDGEPACK_AGENT_DEVICE_ID": "from-env", "EDGEPACK_AGENT_API_PORT": "9001",
           "EDGEPACK_AGENT_GROUPS": "x,y"}
    cfg = load_config(path=toml, env=env)
    assert (cfg.device_id, cfg.api_port, cfg.groups) == ("from-env", 9001, ("x", "y"))
    cfg = load_config(path=toml, env=env, device_id="from-flag", broker="mqtts://u2:p%40ss@h")
    assert cfg.device_id == "from-flag" and cfg.broker.tls and cfg.broker.port == 8883
    assert (cfg.broker.username, cfg.broker.password) == ("u2", "p@ss")


@pytest.mark.parametrize("kw,fragment", [
    ({"broker": "http://x"}, "is not mqtt://"),
    ({"device_id": "bad/id"}, "device id"),
    ({"groups": ("ok", "no+pe")}, "group"),
    ({"broker": "mqtts://h", "broker_ca_file": "/nonexistent/ca.pem"}, "does not exist"),
    ({"telemetry_interval": "0"}, "> 0"),
])
def test_config_errors(kw, fragment):
    with pytest.raises(InputError, match=fragment.replace("+", r"\+")):
        load_config(env={}, **kw)


def test_config_takes_paths_from_the_command_line_as_text(tmp_path):
    """`run` hands its --broker-*-file paths over as Path objects (declared once with `install`):
    the configuration and its messages see the same text the TOML file would give."""
    from pathlib import Path

    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here")
    cfg = load_config(env={}, broker="mqtts://h", broker_ca_file=ca)
    assert cfg.broker.ca_file == str(ca)
    with pytest.raises(InputError, match=r"broker TLS file '/nonexistent/ca.pem' does not exist"):
        load_config(env={}, broker="mqtts://h", broker_ca_file=Path("/nonexistent/ca.pem"))


def test_config_unknown_key(tmp_path):
    toml = tmp_path / "agent.toml"
    toml.write_text('[api]\nprot = 1\n')
    with pytest.raises(InputError, match="unknown key"):
        load_config(path=toml, env={})


def test_the_agent_hands_its_fetcher_to_the_updater(tmp_path):
    """The updater downloads MQTT transfers with a fetcher on the agent's own session and transfer
    policy, in place before the session connects (tests/test_updater_unit.py proves an injected
    fetcher is the one used). No broker: nothing connects."""
    from device_agent.ota.transfer import MqttChunkFetcher
    from device_agent.service import Agent

    cfg = load_config(env={}, data_dir=tmp_path / "data", broker="mqtt://127.0.0.1:9", api_port=0)
    agent = Agent(cfg)
    agent.start()
    try:
        f = agent.updater.fetcher
        assert isinstance(f, MqttChunkFetcher) and f.mqtt is agent.mqtt and f.policy is agent.transfer_policy
    finally:
        agent.api.stop()
        agent.shutdown()
        agent.life.close()


class CountingSha256:
    """hashlib.sha256 as it is, remembering each hash object that ends on `target`."""

    real, target, finished = None, None, []

    def __init__(self, data=b"", **kw):
        self._h = self.real(data, **kw)

    def update(self, data):
        self._h.update(data)

    def digest(self):
        return self._h.digest()

    def hexdigest(self):
        out = self._h.hexdigest()
        if out == self.target and not any(h is self for h in self.finished):
            self.finished.append(self)
        return out


def test_an_update_hashes_its_bundle_once(tmp_path, monkeypatch):
    """Verify while streaming: the transfer hashes the bundle as it writes it; verification, the
    store and staging are handed that sha256 instead of reading the whole file again. The real
    agent is the updater's host (a tiny ONNX model, no broker)."""
    import hashlib

    from tinybundles import log_bundle

    from device_agent.ota.record import State
    from device_agent.ota.transfer import TransferPolicy
    from device_agent.ota.updater import Updater, UpdaterSettings
    from device_agent.service import Agent
    from edgebundle.archive import sha256_file
    from edgeproto.desired import Desired, Probation, UrlTransfer

    new = log_bundle(tmp_path / "src", version="1.1.0")
    cfg = load_config(env={}, data_dir=tmp_path / "data", bundle=log_bundle(tmp_path / "old"), api_port=0)
    agent = Agent(cfg)
    agent._plan_slots()
    slot = agent.slots[0]  # the updater's host: the agent's one model
    slot.load_initial()
    u = Updater(slot, cfg.data_dir, settings=UpdaterSettings(
        transfer=TransferPolicy(allowed_urls=((tmp_path / "src").as_uri(),))))
    d = Desired(update_id="u1", name="logm", version="1.1.0", sha256=sha256_file(new), size=new.stat().st_size,
                transfer=UrlTransfer(url=new.as_uri()), probation=Probation(seconds=0.3, requests=10 ** 6))
    monkeypatch.setattr(CountingSha256, "real", hashlib.sha256)
    monkeypatch.setattr(CountingSha256, "target", d.sha256)
    monkeypatch.setattr(CountingSha256, "finished", [])
    monkeypatch.setattr(hashlib, "sha256", CountingSha256)
    try:
        u.set_desired(d)
        for _ in range(10):
            if u.tick() or u.record.state is State.COMMITTED:
                break
        assert u.record.state is State.COMMITTED, u.record.error
        assert agent.model.version == "1.1.0" and agent.model.bundle_sha256 == d.sha256
        assert len(CountingSha256.finished) == 1
    finally:
        agent.shutdown()


@pytest.mark.slow
def test_in_process_api_every_target(digits_build, digits, tmp_path):
    from device_agent import load_bundle
    from device_agent.model import InferenceError

    val = np.load(digits["validation"])
    x = val["image"][:1]
    outs = {}
    for r in digits_build.results:
        if r.target == "coral":
            # the host has no Edge TPU and the coral profile forbids CPU fallback: a clear error
            with pytest.raises(RuntimeUnavailableError, match="libedgetpu"):
                load_bundle(r.bundle, model_dir=tmp_path / r.target)
            m = load_bundle(r.bundle, model_dir=tmp_path / r.target, allow_cpu_fallback=True)
            assert "running on the CPU" in m.describe()["notes"][0]
        else:
            m = load_bundle(r.bundle, model_dir=tmp_path / r.target)
        d = m.describe()
        assert d["provider"] in ("xnnpack", "cpu", "CPUExecutionProvider"), d
        out = m.infer({"image": x})
        outs[r.target] = out[m.manifest.outputs[0].name]
        assert outs[r.target].dtype == np.float32 and outs[r.target].shape == (1, 10)
        with pytest.raises(InferenceError, match="has shape"):
            m.infer({"image": x[:, :4]})
        m.close()
    top = {t: int(o.argmax()) for t, o in outs.items()}
    assert len(set(top.values())) == 1, top  # every runtime agrees on the digit


@pytest.mark.slow
def test_quantized_io_float_and_raw(digits_build, tmp_path):
    from device_agent import load_bundle

    rpi5 = next(r.bundle for r in digits_build.results if r.target == "rpi5")  # int8 in, int8 out
    m = load_bundle(rpi5, model_dir=tmp_path / "m")
    spec_in, spec_out = m.manifest.inputs[0], m.manifest.outputs[0]
    assert spec_in.dtype == "int8" and spec_in.quantization is not None
    x = np.random.default_rng(0).random((1, 8, 8, 1), dtype=np.float32)
    floats = m.infer({"image": x})["output_0"]
    q = spec_in.quantization
    xq = np.clip(np.round(x / q.scale) + q.zero_point, -128, 127).astype(np.int8)
    raw = m.infer({"image": xq}, raw=True)["output_0"]
    assert floats.dtype == np.float32 and raw.dtype == np.int8
    qo = spec_out.quantization
    np.testing.assert_allclose((raw.astype(np.float32) - qo.zero_point) * qo.scale, floats, atol=1e-6)
    # the API's metadata and config say what a client sends and gets: float32 (issue 24, finding 7)
    from device_agent.kserve import model_config, tensor_meta

    assert m.api_dtypes == {"image": "float32", "output_0": "float32"}
    assert tensor_meta(spec_in, m.api_dtypes["image"])["datatype"] == "FP32"
    cfg = model_config(m)
    assert [t["data_type"] for t in cfg["input"] + cfg["output"]] == ["TYPE_FP32", "TYPE_FP32"]


@pytest.mark.slow
def test_agent_bench_cli(digits_bundle):
    from device_agent.cli import main

    res = CliRunner().invoke(main, ["bench", str(digits_bundle), "--runs", "30", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["latency"]["runs"] >= 5 and d["runtime"]["runtime"] == "litert"
    res = CliRunner().invoke(main, ["bench", "/nonexistent.edgepack"])
    assert res.exit_code == 5 and "does not exist" in res.output


def test_shadow_agreement_by_output_kind():
    """The shadow phase compares outputs as the build's gate does."""
    from device_agent.shadow import agreement

    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    assert agreement(p, p[:, ::-1], labelled=False)[:2] == (0, 2)  # class scores: top-1 (permuted: none)
    assert agreement(p, p + 0.01, labelled=False)[:2] == (2, 2)
    v = np.array([[1.0, -2.0, 3.0]])
    assert agreement(v, v * 1.001, labelled=False)[:2] == (1, 1)  # values: cosine >= 0.99
    assert agreement(v, -v, labelled=False)[:2] == (0, 1)
    assert agreement(np.array([[1, 2]]), np.array([[1, 3]]), labelled=False)[:2] == (0, 1)  # integers: exact
    assert agreement(v, v * 3.0, labelled=False)[:2] == (0, 1)  # same direction, three times the size
    assert agreement(np.array([[0.2]]), np.array([[5.0]]), labelled=False)[:2] == (0, 1)  # a scalar off by 25x


def test_which_record_each_model_follows():
    """A model's own topics first (device, then groups in order); old-style records only for the model
    at the top level; a model's records outlive its slot (a removal keeps it removed)."""
    from device_agent.routing import Desires
    from edgeproto.topics import DeviceTopics

    t = DeviceTopics("r", "d1")
    d = Desires(t, ("g1", "g2"))
    d.put(t.group_desired("g1"), None, "old-group")
    assert d.winner("a", first=True) == "old-group" and d.winner("b", first=False) is None
    d.put(t.group_model_desired("g2", "a"), "a", "a-g2")
    d.put(t.group_model_desired("g1", "a"), "a", "a-g1")
    assert d.winner("a", first=True) == "a-g1" and d.winner("a", first=False) == "a-g1"
    assert d.source("a", first=True) == ("a-g1", t.group_model_desired("g1", "a"))  # an old-style record loses
    d.put(t.model_desired("a"), "a", "removal")
    assert d.winner("a", first=False) == "removal"
    d.put(t.model_desired("a"), "a", None)  # cleared: the group's record applies again
    assert d.winner("a", first=False) == "a-g1" and d.winner(None, first=True) == "old-group"


def test_each_topic_goes_where_it_did(tmp_path):
    """The agent's topic table: records (the device's own, its groups', a model's on either) to the
    record gate, profile jobs and capture requests to their workers, every other topic to whoever
    fetches chunks (an unknown one is ignored there). No broker: the handlers are fakes."""
    from device_agent.service import Agent
    from edgeproto.desired import RecordError
    from edgeproto.topics import DeviceTopics

    agent = Agent(load_config(env={}, data_dir=tmp_path / "data", device_id="d1", groups=("g1",), api_port=0))
    seen: list[tuple[str, str]] = []

    class Gate:
        def accept(self, payload, topic):
            seen.append(("record", topic))
            raise RecordError("refused here", update_id="u1")

    class Worker:
        def __init__(self, *kinds):
            for k in kinds:
                setattr(self, k, lambda *a, k=k: seen.append((k, a[1] if k != "on_message" else a[0])))

    agent.gate = Gate()
    agent.profiler, agent.capturer = Worker("on_job", "on_message"), Worker("on_request")
    t, other = agent.topics, DeviceTopics(agent.topics.prefix, "d2")
    expect = {t.desired: "record", t.group_desired("g1"): "record", t.model_desired("m"): "record",
              t.group_model_desired("g1", "m"): "record", t.profile_job: "on_job", t.capture_request: "on_request",
              other.model_desired("m"): "on_message", t.group_model_desired("g2", "m"): "on_message",
              f"{t.prefix}/bundles/abc/chunks/0": "on_message", "elsewhere/entirely": "on_message"}
    try:
        for topic, where in expect.items():
            seen.clear()
            agent._on_message(topic, b"{}")
            assert seen == [(where, topic)], (topic, seen)
    finally:
        agent.queue.close()


def test_a_profile_job_yields_to_the_busiest_model(tmp_path):
    """The profiler's host answers `busiest_model()` (a slot's `active_model()` is its own model)."""
    from types import SimpleNamespace

    from device_agent.service import Agent

    agent = Agent(load_config(env={}, data_dir=tmp_path / "data", api_port=0))
    try:
        assert agent.busiest_model() is None
        idle, busy = SimpleNamespace(in_flight=0), SimpleNamespace(in_flight=3)
        agent.slots = [SimpleNamespace(model=idle), SimpleNamespace(model=None), SimpleNamespace(model=busy)]
        assert agent.busiest_model() is busy
    finally:
        agent.queue.close()


def test_the_watchdog_asks_each_thread_owner_if_it_is_alive(tmp_path):
    """healthy() (the systemd watchdog's question) asks the API server and each updater `alive()`:
    an updater whose loop ended makes the agent unhealthy; one not started yet does not."""
    from types import SimpleNamespace

    from device_agent.ota.updater import Updater
    from device_agent.service import Agent

    agent = Agent(load_config(env={}, data_dir=tmp_path / "data", api_port=0))
    u = Updater(SimpleNamespace(mqtt=None), tmp_path / "u")  # idle: its loop asks its host nothing
    agent.slots = [SimpleNamespace(updater=u), SimpleNamespace(updater=None)]
    try:
        assert u.alive() and agent.healthy()
        u.start()
        assert u.alive() and agent.healthy()
        u.stop()
        assert not u.alive() and not agent.healthy()
    finally:
        agent.queue.close()


def test_the_in_process_loader_extracts_into_its_cache_never_beside_the_bundle(tmp_path, monkeypatch):
    """device_agent/extracted.py: one folder per bundle (by sha256) in the extraction cache; the least
    recently loaded are evicted past the size limit, never the one just loaded or one in use."""
    import os

    from device_agent import extracted, load_bundle
    from tinybundles import log_bundle

    monkeypatch.setenv(extracted.ENV_DIR, str(tmp_path / "cache"))
    src = tmp_path / "mine"
    bundle = log_bundle(src)
    before = sorted(p.name for p in src.iterdir())
    m = load_bundle(bundle)
    try:
        assert m.infer({"x": np.full((1, 4), np.e, np.float32)})["y"] == pytest.approx(1.0)
        (entry,) = (tmp_path / "cache").iterdir()
        assert extracted.prune(tmp_path / "other", max_bytes=0, now=2e9) == []  # loaded here: held
    finally:
        m.close()
    assert sorted(p.name for p in src.iterdir()) == before  # nothing hidden next to the user's files
    assert (entry / "model.onnx").is_file() and not list(entry.glob(".*.part"))
    assert extracted.prune(tmp_path / "other", max_bytes=0, now=2e9) == [entry]  # closed: evictable
    m = load_bundle(bundle)  # extracted again
    m.close()

    now = 1_000_000.0
    for i, size in enumerate((300, 200, 100)):  # oldest first, all long unused
        d = tmp_path / "cache" / f"old{i}"
        d.mkdir()
        (d / "w.bin").write_bytes(b"x" * size)
        os.utime(d, (now - 3600 + i, now - 3600 + i))
    os.utime(entry, (now - 10, now - 10))  # loaded just now by someone
    keep = tmp_path / "cache" / "old0"
    removed = extracted.prune(keep, max_bytes=250, now=now)
    assert [p.name for p in removed] == ["old1", "old2"]  # old0 is kept (`keep`), the recent one is in use
    assert keep.exists() and entry.exists()
    monkeypatch.setenv(extracted.ENV_LIMIT, "1.5G")
    assert extracted.limit() == int(1.5 * 2**30)
    monkeypatch.setenv(extracted.ENV_LIMIT, "lots")
    with pytest.raises(InputError, match="EDGEPACK_EXTRACT_LIMIT"):
        extracted.limit()
