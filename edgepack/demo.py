"""`edgepack demo`: the whole loop on embedded defaults, about a minute on 2 cores.

Train the digits CNN on real data, build signed bundles for every built-in target, start a
broker (embedded amqtt unless --broker) and a device agent, send inference requests through
the KServe v2 API, show telemetry, build and sign v1.1.0, push it while 8 clients keep sending
requests, show the update and the swap, print a summary, and stop every process it started."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgeproto.broker import BrokerConfig
from edgeproto.desired import Probation
from edgebundle.errors import EdgepackError

Say = Callable[[str], None]


class DemoError(EdgepackError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise DemoError(f"timed out after {timeout:.0f} s waiting for {what}")


def api_ready(base: str) -> bool:
    """Does the agent at `base` answer /v2/health/ready with 200?"""
    try:
        with urllib.request.urlopen(base + "/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class Clients:
    """Background clients sending real digits through the v2 API, counting every outcome."""

    base: str
    images: np.ndarray
    labels: np.ndarray
    ok: int = 0
    failed: int = 0
    correct: int = 0
    versions: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, i: int) -> None:
        x = self.images[i % len(self.images)][None]
        body = json.dumps({"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]}).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.base}/v2/models/digits/infer", data=body),
                                        timeout=10) as r:
                res = json.loads(r.read())
            pred = int(np.argmax(res["outputs"][0]["data"]))
            with self._lock:
                self.ok += 1
                self.correct += int(pred == self.labels[i % len(self.labels)])
                self.versions[res["model_version"]] = self.versions.get(res["model_version"], 0) + 1
        except (OSError, ValueError, KeyError):
            with self._lock:
                self.failed += 1

    def run(self, n_threads: int, limit: int = 200_000) -> list[threading.Thread]:
        def loop(k):
            i = k
            while not self._stop.is_set() and i < limit:
                self.one(i)
                i += n_threads

        threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(n_threads)]
        for t in threads:
            t.start()
        return threads

    def stop(self, threads) -> None:
        self._stop.set()
        for t in threads:
            t.join(15)


def run_demo(*, workdir: Path | None = None, broker_url: str | None = None, say: Say = print) -> dict:
    import fleet
    from edgebundle.signing import generate_keys
    from packager.build import BuildOptions, build
    from packager.examples.digits import train
    from packager.report import build_table
    from targets import builtin_names

    t_start = time.perf_counter()
    work = Path(workdir or tempfile.mkdtemp(prefix="edgepack-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "agent-data", ignore_errors=True)  # a re-run starts the device from 1.0.0 again
    procs: list[subprocess.Popen] = []
    summary: dict = {"workdir": str(work)}
    try:
        say("== 1. train a CNN on scikit-learn's digits (real data)")
        info = train(work / "v1", epochs=15)
        say(f"   test accuracy {info['test_accuracy']:.4f} on {info['test']} held-out images")
        if not (work / "demo.key").exists():
            generate_keys(work / "demo.key", work / "demo.pub")
        say("== 2. build signed bundles for every built-in target")
        opts = BuildOptions(model=info["model"], targets=tuple(builtin_names()), out_dir=work / "bundles",
                            overwrite=True,
                            calibration=str(work / "v1" / "calibration.npz"),
                            validation=str(work / "v1" / "validation.npz"), labels=work / "v1" / "labels.txt",
                            name="digits", version="1.0.0", max_accuracy_drop=1.0, sign_key=work / "demo.key",
                            bench_runs=30, bench_seconds=1.0)
        res = build(opts, progress=lambda m: say(f"   {m}"))
        say(build_table(res.to_dict()))
        from packager import html_report

        say(f"   report page: {html_report.write(res.to_dict(), work / 'bundles' / 'digits-1.0.0-report.html')}")
        if not res.ok:
            raise DemoError("some bundles failed to build; see the table above")
        v1 = next(r.bundle for r in res.results if r.target == "arm-cpu")

        say("== 3. broker and device agent")
        if broker_url is None:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "edgepack.cli", "broker", "--port", str(port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_for(lambda: port_open(port), 20, "the embedded broker")
            broker_url = f"mqtt://127.0.0.1:{port}"
            say(f"   embedded MQTT broker on {broker_url}")
        broker = BrokerConfig(url=broker_url).validate()
        api_port = free_port()
        agent_log = open(work / "agent.log", "ab")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "run", "--device-id", "demo-pi", "--group", "demo",
             "--broker", broker_url, "--data-dir", str(work / "agent-data"), "--bundle", str(v1),
             "--api-port", str(api_port), "--telemetry-interval", "2", "--trusted-key", str(work / "demo.pub")],
            stdout=agent_log, stderr=subprocess.STDOUT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")))
        base = f"http://127.0.0.1:{api_port}"
        wait_for(lambda: api_ready(base), 30, "the agent to be ready")
        say(f"   agent demo-pi serving digits 1.0.0 on {base} (log: {work / 'agent.log'})")

        say("== 4. inference through the KServe v2 API")
        val = np.load(work / "v1" / "validation.npz")
        clients = Clients(base, val["image"], val["y"])
        for i in range(100):
            clients.one(i)
        say(f"   100 requests: {clients.ok} ok, accuracy {clients.correct / max(clients.ok, 1):.2%}")
        tel = wait_for(lambda: _telemetry(broker), 20, "telemetry")
        inf = tel["inference"]
        say(f"   telemetry from {tel['device_id']}: {tel['totals']['count']} inferences so far, "
            f"p95 {((inf.get('latency_ms') or {}).get('p95'))} ms, RSS "
            f"{(tel['system']['process_rss_bytes'] or 0) / 1e6:.1f} MB, cpu {tel['system']['cpu_percent']}%")

        say("== 5. build and sign v1.1.0 (trained longer)")
        info2 = train(work / "v2", epochs=15, start=info["model"])  # v1 plus 15 epochs
        res2 = build(BuildOptions(model=info2["model"], targets=("arm-cpu",), out_dir=work / "bundles", overwrite=True,
                                  calibration=str(work / "v2" / "calibration.npz"),
                                  validation=str(work / "v2" / "validation.npz"), name="digits", version="1.1.0",
                                  max_accuracy_drop=1.0, sign_key=work / "demo.key", bench_runs=30,
                                  bench_seconds=1.0))
        if not res2.ok:
            raise DemoError(f"v1.1.0 failed to build: {res2.results[0].error}")
        v2 = res2.results[0].bundle
        say(f"   {v2.name}: test accuracy {info2['test_accuracy']:.4f}")

        say("== 6. push v1.1.0 to group 'demo' while 8 clients keep sending requests")
        before = dict(clients.versions)
        threads = clients.run(8)
        t0 = time.perf_counter()
        def progress(dev: str, ev: dict) -> None:
            say(f"   {dev}: {ev['state']}" + (f" {ev['progress']['percent']}%" if ev.get("progress") else "")
                + (f" ({ev['error']})" if ev.get("error") else ""))

        push = fleet.push(v2, broker, fleet.PushOptions(
            group="demo", terms=fleet.Terms(probation=Probation(seconds=5, requests=500)), sign_key=work / "demo.key",
            follow=fleet.Follow(timeout=120, expect=("demo-pi",), progress=progress)))
        update_s = time.perf_counter() - t0
        time.sleep(1.0)
        clients.stop(threads)
        with urllib.request.urlopen(base + "/v2/models/digits", timeout=5) as r:
            serving = json.loads(r.read())["versions"][0]
        during = {k: v - before.get(k, 0) for k, v in clients.versions.items()}
        say(f"   requests during the update: {sum(during.values())} ok by version {during}, "
            f"{clients.failed} failed")

        say("== 7. fleet status")
        for row in fleet.status(broker, listen_s=2.5):
            say(f"   {row['device_id']}: online={row['online']} {row['model']} {row['version']} "
                f"update={row['update']} p95={row['p95_ms']} ms errors={row['errors']}")
        ev = push.devices.get("demo-pi", {})
        summary.update({
            "bundles_built": sum(r.ok for r in res.results), "from_version": "1.0.0", "to_version": serving,
            "update_state": ev.get("state"), "update_seconds": round(update_s, 1),
            "requests_ok": clients.ok, "requests_failed": clients.failed,
            "accuracy": round(clients.correct / max(clients.ok, 1), 4),
            "seconds": round(time.perf_counter() - t_start, 1)})
        return summary
    finally:
        stop_processes(*reversed(procs))


def stop_processes(*procs: subprocess.Popen) -> None:
    """SIGTERM each process, SIGKILL any that has not exited 15 s later."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _telemetry(broker: BrokerConfig) -> dict | None:
    from edgeproto.topics import Topics
    from fleet.conn import Collector

    rows = Collector(broker, [Topics(broker.topic_prefix).telemetry("demo-pi")], name="demo")
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with rows.cond:
                if rows.messages:
                    return json.loads(rows.messages[-1][1])
                rows.cond.wait(0.5)
    finally:
        rows.stop()
    return None
