"""Processes the benchmarks start: a loopback mosquitto and a device agent; and client load on it."""
from __future__ import annotations

from edgepack.demo import api_ready, free_port, port_open, wait_for
from edgepack.demo import stop_processes as stop  # noqa: F401  (used by the scripts)

import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def binary_body(name: str, x) -> tuple[bytes, dict]:
    """A v2 request in the binary tensor extension (what tritonclient sends for images): a JSON
    header, then the raw tensor bytes; no JSON float parsing on the device."""
    import numpy as np

    x = np.ascontiguousarray(x, np.float32)
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def mosquitto(workdir: Path) -> tuple[subprocess.Popen, int]:
    if not shutil.which("mosquitto"):
        raise SystemExit("this benchmark needs mosquitto (apt-get install mosquitto mosquitto-clients)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    # set_tcp_nodelay: mosquitto leaves Nagle on by default, which holds small packets (SUBACK,
    # a one-chunk bundle) for a delayed ACK: ~40 ms per round trip on loopback.
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))
    p = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    wait_for(lambda: port_open(port), 10, "mosquitto")
    return p, port


def agent(workdir: Path, bundle: Path | list[Path], broker_port: int | None, *,
          device: str = "bench") -> tuple[subprocess.Popen, str]:
    """An agent serving `bundle` (a list: several models in one agent), on the broker when given."""
    port = free_port()
    bundles = [a for b in (bundle if isinstance(bundle, list) else [bundle]) for a in ("--bundle", str(b))]
    broker = ["--broker", f"mqtt://127.0.0.1:{broker_port}"] if broker_port else []
    p = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--device-id", device, "--data-dir",
                          str(workdir / f"agent-{device}"), *bundles, "--api-port", str(port), *broker,
                          "--telemetry-interval", "60", "--log-format", "text"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: api_ready(base), 30, "agent ready")
    return p, base


class Load:
    """Clients posting a model's inference (default: the digits model) in a loop over keep-alive
    connections; each request recorded as (wall time, ms, HTTP status; 0 when the connection failed)."""

    BODY = json.dumps({"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()

    def __init__(self, base: str, *, model: str = "digits", body: bytes | None = None, headers: dict | None = None):
        self.host, self.port = base.split("//")[1].split(":")
        self.path, self.body, self.headers = f"/v2/models/{model}/infer", body or self.BODY, headers or {}
        self.samples: list[tuple[float, float, int]] = []
        self._lock, self._halt, self._threads = threading.Lock(), threading.Event(), []

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, int(self.port), timeout=10)

    def _client(self) -> None:
        conn, n = self._conn(), 0
        while not self._halt.is_set() and n < 500_000:
            n += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", self.path, body=self.body, headers=self.headers)
                r = conn.getresponse()
                r.read()
                status = r.status
            except OSError:
                status, conn = 0, self._conn()
            with self._lock:
                self.samples.append((time.time(), (time.perf_counter() - t0) * 1000, status))

    def start(self, clients: int) -> None:
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(15)
