"""Installing the agent as a systemd service: `edgepack-agent install` into a staging root, the unit
checked by systemd-analyze, the sd_notify protocol (READY/STATUS/WATCHDOG/STOPPING) of a real agent
against a real unix datagram socket standing in for systemd, and the `building engine` state."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from agents import AgentProc, Watcher
from brokers import free_port
from tinybundles import log_bundle

ROOT = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-m", "device_agent.cli"]


def _pem(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = Ed25519PrivateKey.generate().public_key()
    path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def _toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    return tomllib.loads(path.read_text())


# ---- install ----
@pytest.mark.agent
def test_install_stages_a_working_service(tmp_path):
    bundle = log_bundle(tmp_path / "b")
    key = _pem(tmp_path / "fleet.pem")
    ca, cert, ckey = (tmp_path / n for n in ("ca.crt", "dev.crt", "dev.key"))
    for p in (ca, cert, ckey):
        p.write_text("-----BEGIN X-----\n")
    root = tmp_path / "root"
    r = subprocess.run(AGENT + ["install", "--root", str(root), "--prefix", sys.prefix, "--device-id", "pi-1",
                                "--group", "kitchen", "--broker", "mqtts://broker.example.com:8883",
                                "--broker-password", 'p"w d', "--broker-ca-file", str(ca), "--broker-cert-file",
                                str(cert), "--broker-key-file", str(ckey), "--bundle", str(bundle),
                                "--trusted-key", str(key), "--allow-url", "https://models.example.com/fleet/"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "systemctl daemon-reload && systemctl enable --now edgepack-agent.service" in r.stdout
    etc = root / "etc/edgepack"
    conf_path = etc / "agent.toml"
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(conf_path) == 0o640 and mode(etc / "keys/dev.key") == 0o640 and mode(etc / "keys/fleet.pem") == 0o644
    assert (root / "var/lib/edgepack").is_dir()
    conf = _toml(conf_path)
    assert conf["device_id"] == "pi-1" and conf["groups"] == ["kitchen"] and conf["data_dir"] == "/var/lib/edgepack"
    assert conf["broker"] == {"url": "mqtts://broker.example.com:8883", "password": 'p"w d',
                              "ca_file": "/etc/edgepack/keys/ca.crt", "cert_file": "/etc/edgepack/keys/dev.crt",
                              "key_file": "/etc/edgepack/keys/dev.key"}
    assert conf["ota"] == {"trusted_keys": ["/etc/edgepack/keys/fleet.pem"],
                           "allowed_urls": ["https://models.example.com/fleet/"]}
    # every path in it is the device's final path and the file is there under the staging root
    for p in (conf["bundle"], *conf["ota"]["trusted_keys"], *(conf["broker"][k] for k in ("ca_file", "key_file"))):
        assert (root / p.lstrip("/")).read_bytes() == Path({"ca.crt": ca, "dev.key": ckey, "fleet.pem": key}.get(
            Path(p).name, bundle)).read_bytes()
    unit = (root / "etc/systemd/system/edgepack-agent.service").read_text()
    assert f"ExecStart={sys.prefix}/bin/edgepack-agent run --config /etc/edgepack/agent.toml" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "StateDirectory=edgepack" in unit
    # the staged config runs a real agent once its paths point into the staging root (without the
    # broker, which is not here, and the fleet key, which did not sign this test bundle)
    local = conf_path.read_text().replace('"/etc/', f'"{root}/etc/').replace('"/var/', f'"{root}/var/')
    local = local.split("[broker]")[0]
    (tmp_path / "local.toml").write_text(local.replace("port = 8080", f"port = {free_port()}"))
    a = AgentProc(root / "var/lib/edgepack", bundle=None, extra=("--config", str(tmp_path / "local.toml")))
    a.cmd = AGENT + ["run", "--config", str(tmp_path / "local.toml"), "--api-port", str(a.port)]
    a.start()
    try:
        assert json.loads(urllib.request.urlopen(a.base + "/v2/health/ready", timeout=5).read())["state"] == "serving"
    finally:
        a.stop()
    # a second install does not overwrite without --force; with it, it does
    again = subprocess.run(AGENT + ["install", "--root", str(root), "--prefix", sys.prefix], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1 and "already installed" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr
    forced = subprocess.run(AGENT + ["install", "--root", str(root), "--prefix", sys.prefix, "--force"],
                            capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert "device_id" not in (root / "etc/edgepack/agent.toml").read_text()


def test_install_refuses_clearly_without_rights(tmp_path):
    r = subprocess.run(AGENT + ["install", "--root", str(tmp_path / "r"), "--prefix", str(tmp_path / "novenv")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "bin/edgepack-agent does not exist" in r.stderr
    if os.geteuid() != 0:
        r = subprocess.run(AGENT + ["install"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "run it as root" in r.stderr and "--root" in r.stderr
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and no setpriv to drop privileges")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="edgepack-install-"))  # pytest's own tmp is 0700: nobody cannot look in
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o755)  # root's: not writable for nobody
        drop = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        for args, expect in ((["install"], "run it as root"),
                             (["install", "--root", str(locked / "stage")], "not a writable folder")):
            r = subprocess.run(drop + AGENT + args + ["--prefix", sys.prefix], capture_output=True, text=True,
                               timeout=60, env=dict(os.environ, HOME=str(base)), cwd=str(ROOT))
            if r.returncode != 1 and "Permission denied" in r.stderr and "edgepack" not in r.stderr:
                pytest.skip(f"the test venv is not usable by an unprivileged user: {r.stderr[-300:]}")
            assert r.returncode == 1 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (locked / "stage").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as installed (ExecStart must name an existing executable: systemd-analyze checks it,
    so the repository's template is verified through an install pointing at this venv)."""
    root = tmp_path / "root"
    subprocess.run(AGENT + ["install", "--root", str(root), "--prefix", sys.prefix], check=True,
                   capture_output=True, timeout=60)
    unit = root / "etc/systemd/system/edgepack-agent.service"
    assert (ROOT / "deploy/systemd/edgepack-agent.service").read_text().replace(
        "/opt/edgepack/venv", sys.prefix) == unit.read_text()
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path))
    assert r.returncode == 0 and "edgepack-agent.service" not in r.stderr, r.stderr
    # the check can fail: a typo in a key and a missing executable are reported
    bad = tmp_path / "bad" / "edgepack-agent.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict")
                   .replace(f"{sys.prefix}/bin/edgepack-agent", str(tmp_path / "nowhere/edgepack-agent")))
    r = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60,
                       cwd=str(tmp_path))
    assert "ProtectSystm" in r.stderr and "nowhere" in r.stderr and r.returncode != 0


# ---- sd_notify ----
class FakeSystemd:
    """A real unix datagram socket where NOTIFY_SOCKET points: collects what the agent tells systemd."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def collect(self, until, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except socket.timeout:
                pass
            if until([m for _, m in self.messages]):
                return [m for _, m in self.messages]
        raise TimeoutError(f"systemd was not told what was expected; got {[m for _, m in self.messages]}")

    def close(self):
        self.sock.close()


@pytest.mark.agent
def test_notify_and_watchdog_protocol_with_a_real_agent(tmp_path):
    sd = FakeSystemd(tmp_path / "notify")
    a = AgentProc(tmp_path / "data", bundle=log_bundle(tmp_path / "b"),
                  env={"NOTIFY_SOCKET": sd.path, "WATCHDOG_USEC": "400000"})
    a.start(wait_ready=False)
    try:
        msgs = sd.collect(lambda m: any("READY=1" in x for x in m))
        # READY only once the API serves the model: readiness answers 200 right away
        with urllib.request.urlopen(a.base + "/v2/health/ready", timeout=2) as r:
            assert r.status == 200
        ready = next(x for x in msgs if "READY=1" in x)
        assert ready.split("\n") == ["READY=1", "STATUS=serving"]
        assert any(x.startswith("STATUS=loading model") for x in msgs[:msgs.index(ready)])
        assert not any("WATCHDOG=1" in x for x in msgs[:msgs.index(ready)])
        t_ready = time.monotonic()
        msgs = sd.collect(lambda m: sum(x == "WATCHDOG=1" for x in m) >= 4, timeout=5)
        pets = [t for t, x in sd.messages if x == "WATCHDOG=1"]
        assert pets[3] - t_ready < 2.0  # every WatchdogSec/2 = 0.2 s, well inside the 0.4 s deadline
        a.proc.send_signal(signal.SIGTERM)
        msgs = sd.collect(lambda m: any("STOPPING=1" in x for x in m), timeout=10)
        assert next(x for x in msgs if "STOPPING=1" in x).split("\n") == ["STOPPING=1", "STATUS=stopping"]
        assert a.proc.wait(10) == 0
    finally:
        a.stop()
        sd.close()


def test_no_notify_socket_is_a_no_op_and_abstract_sockets_work(tmp_path):
    from device_agent.lifecycle import SdNotify

    assert not SdNotify(env={}).enabled and SdNotify(env={}).send("READY=1") is False
    assert SdNotify(env={"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "1000000",
                         "WATCHDOG_PID": "1"}).watchdog_s is None  # the watchdog is for another process
    name = f"edgepack-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2)
    try:
        n = SdNotify(env={"NOTIFY_SOCKET": "@" + name})
        assert n.send("STATUS=hello") and s.recv(100) == b"STATUS=hello"
        n.close()
    finally:
        s.close()
    gone = SdNotify(env={"NOTIFY_SOCKET": str(tmp_path / "missing")})
    assert gone.send("READY=1") is False  # systemd away: logged once, never raised


def test_watchdog_stops_while_unhealthy(tmp_path):
    from device_agent.lifecycle import AgentState, Lifecycle, SdNotify

    sd = FakeSystemd(tmp_path / "notify")
    healthy = threading.Event()
    healthy.set()
    life = Lifecycle(notify=SdNotify(env={"NOTIFY_SOCKET": sd.path, "WATCHDOG_USEC": "100000"}),
                     healthy=healthy.is_set)
    try:
        life.set(AgentState.SERVING)
        life.start_watchdog()
        sd.collect(lambda m: m.count("WATCHDOG=1") >= 3, timeout=5)
        healthy.clear()
        time.sleep(0.2)  # a pet may be in flight
        n = len(sd.messages)
        time.sleep(0.5)  # ten periods
        try:
            sd.collect(lambda m: len(m) > n, timeout=0.3)
            raise AssertionError(f"petted while unhealthy: {sd.messages[n:]}")
        except TimeoutError:
            pass
        healthy.set()
        sd.collect(lambda m: len(m) > n and m[-1] == "WATCHDOG=1", timeout=5)
    finally:
        life.close()
        sd.close()


# ---- TensorRT's first start ----
def test_building_engine_is_visible_in_status_and_readiness(tmp_path, monkeypatch, broker, caplog):
    """The TensorRT EP is not on this host, so the slow load is stood in for: `slow_load` says an
    engine build is coming and the runtime load waits for the test. Everything around it is real:
    the agent in process, its API, mosquitto and the retained status."""
    import device_agent.service as service
    import device_agent.slot as slot  # where each model loads (one slot per model)
    from device_agent.config import load_config

    import logging

    caplog.set_level(logging.INFO, logger="edgepack")
    release = threading.Event()
    real_load = slot.load_bundle
    monkeypatch.setattr(slot, "slow_load", lambda manifest, cache_dir: "TensorRT engines for this model")

    def slow(*args, **kw):
        assert release.wait(30), "never released"
        return real_load(*args, **kw)

    monkeypatch.setattr(slot, "load_bundle", slow)
    port = free_port()
    cfg = load_config(env={}, device_id="jet1", data_dir=tmp_path / "data", bundle=log_bundle(tmp_path / "b"),
                      api_port=port, broker=broker.url, telemetry_interval=5)
    w = Watcher(broker.url, ["edgepack/v1/devices/jet1/status"])
    agent = service.Agent(cfg)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        st = w.wait("/status", lambda p: (p.get("state") or {}).get("state") == "building engine", timeout=15)
        assert st["state"]["detail"] == "TensorRT engines for this model" and st["model"] is None
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
            raise AssertionError("ready while building")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.loads(e.read()) == {"ready": False, "state": "building engine"}
        assert any("can take minutes" in r.getMessage() for r in caplog.records)
        release.set()
        st = w.wait("/status", lambda p: (p.get("state") or {}).get("state") == "serving", timeout=15)
        assert st["model"]["name"] == "logm"
        # the last retained status is the serving one (a new subscriber sees it)
        w2 = Watcher(broker.url, ["edgepack/v1/devices/jet1/status"])
        try:
            assert w2.wait("/status", timeout=5)["state"]["state"] == "serving"
        finally:
            w2.stop()
    finally:
        release.set()
        agent.request_stop()
        t.join(15)
        w.stop()
    assert not t.is_alive()


def test_onnx_slow_load_predicate(tmp_path):
    """Without the TensorRT EP (this host) nothing is slow; CPU-only bundles never are."""
    import onnxruntime as ort

    from edgeruntime.onnxrt import OnnxRuntime

    assert OnnxRuntime.slow_load(providers=("CPUExecutionProvider",), cache_dir=str(tmp_path)) is None
    trt = OnnxRuntime.slow_load(providers=("TensorrtExecutionProvider", "CPUExecutionProvider"),
                                cache_dir=str(tmp_path), trt_cache=True)
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        assert trt is None
    else:  # a Jetson or a GPU host: an empty cache means a build; a cached engine means none
        assert "first start" in trt
        (tmp_path / "TensorrtExecutionProvider_TRTKernel_graph_x.engine").write_bytes(b"x")
        assert OnnxRuntime.slow_load(providers=("TensorrtExecutionProvider",), cache_dir=str(tmp_path),
                                     trt_cache=True) is None
