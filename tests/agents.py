"""Helpers to run real agents (subprocesses) and watch MQTT topics in tests. Every wait is bounded."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import tiers
from brokers import free_port


def wait_until(pred, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout}s")


class AgentProc:
    def __init__(self, data_dir: Path, *, bundle: Path | None, broker: str | None = None, device_id: str = "dev1",
                 interval: float = 0.5, extra: tuple = (), port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.data_dir, self.device_id = Path(data_dir), device_id
        self.cmd = [sys.executable, "-m", "device_agent.cli", "run", "--device-id", device_id, "--data-dir",
                    str(data_dir), "--api-port", str(self.port), "--telemetry-interval", str(interval), *extra]
        if bundle:
            self.cmd += ["--bundle", str(bundle)]
        if broker:
            self.cmd += ["--broker", broker]
        self.env = env
        self.preexec = None  # e.g. resource limits for the agent process
        self.proc: subprocess.Popen | None = None
        self.log = Path(data_dir).parent / f"{device_id}-{self.port}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, wait_ready: bool = True) -> "AgentProc":
        tiers.require("agent", "a device agent process")
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        import os

        env = dict(os.environ, **(self.env or {}))
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=self.preexec)
        if wait_ready:
            wait_until(lambda: self._get("/v2/health/ready") == 200 or self.proc.poll() is not None, 60,
                       what="agent ready")
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return self

    def metadata(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.base + "/v2/models/" + self.model_name, timeout=2) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    model_name = "digits"

    def _get(self, path: str, timeout: float = 1.0) -> int | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def stop(self, sig: str = "term") -> int | None:
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if sig == "kill" else self.proc.terminate)()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else None


class Watcher:
    """Subscribes to topics and keeps every message (payload parsed as JSON when possible)."""

    def __init__(self, url: str, topics: list[str], **tls):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, object, bool]] = []
        self._lock = threading.Lock()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if tls.get("username"):
            c.username_pw_set(tls["username"], tls.get("password"))
        if url.startswith("mqtts"):
            c.tls_set(ca_certs=tls["ca"], certfile=tls.get("cert"), keyfile=tls.get("key"))
        c.on_message = self._on_message
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        host, port = url.split("://")[1].split(":")
        c.connect(host, int(port))
        c.loop_start()
        for t in topics:
            c.subscribe(t, qos=1)
        subscribed.wait(5)
        self.client = c

    def _on_message(self, client, userdata, msg):
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload
        with self._lock:
            self.messages.append((msg.topic, payload, bool(msg.retain)))

    def of(self, suffix: str) -> list:
        with self._lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def wait(self, suffix: str, pred=lambda p: True, timeout: float = 15.0):
        return wait_until(lambda: next((p for p in reversed(self.of(suffix)) if pred(p)), None), timeout,
                          what=f"message on *{suffix}")

    def stop(self):
        self.client.loop_stop()
        self.client.disconnect()
