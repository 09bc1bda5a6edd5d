"""MQTT brokers for tests: Debian's mosquitto on a free loopback port, else the embedded
amqtt broker. Both run as subprocesses so tests can stop and restart them."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import tiers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Broker:
    """start()/stop() on a fixed port, so a restart comes back at the same address."""

    # EDGEPACK_TEST_BROKER=amqtt runs the suite against the embedded broker even where mosquitto exists.
    kind = os.environ.get("EDGEPACK_TEST_BROKER") or ("mosquitto" if shutil.which("mosquitto") else "amqtt")

    def __init__(self, workdir: Path, *, tls: dict | None = None, users: dict | None = None,
                 persistent: bool = False, extra: tuple[str, ...] = ()):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls, self.users, self.persistent = tls, users, persistent
        self.extra = tuple(extra)  # more mosquitto.conf lines (limits, bridges)
        self.proc: subprocess.Popen | None = None
        if (tls or users or persistent or extra) and self.kind != "mosquitto":
            raise RuntimeError("TLS/password/persistence tests need mosquitto")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _config(self) -> list[str]:
        if self.kind == "amqtt":
            cfg = self.dir / "amqtt.yaml"
            cfg.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
                           "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                           "    allow_anonymous: true\n")
            return [str(Path(sys.executable).with_name("amqtt")), "-c", str(cfg)]
        # persistent: retained records and chunks survive a restart, as docs/security.md requires in production
        persist = (["persistence true", f"persistence_location {self.dir}/", "autosave_interval 1"]
                   if self.persistent else ["persistence false"])
        lines = [f"listener {self.port} 127.0.0.1", *persist, "log_dest stderr"]
        if os.geteuid() == 0:
            lines.append("user root")  # else mosquitto drops to 'mosquitto' and cannot read our files
        if self.users:
            pw = self.dir / "passwd"
            pw.write_text("")
            for u, p in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), u, p], check=True, capture_output=True)
            lines += [f"password_file {pw}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        if self.tls:
            lines += [f"cafile {self.tls['ca']}", f"certfile {self.tls['cert']}", f"keyfile {self.tls['key']}",
                      "require_certificate true", "tls_version tlsv1.2"]
        cfg = self.dir / "mosquitto.conf"
        cfg.write_text("\n".join(lines + list(self.extra)) + "\n")
        return ["mosquitto", "-c", str(cfg)]

    def start(self) -> "Broker":
        tiers.require("broker", "an MQTT broker")
        log = open(self.dir / "broker.log", "ab")
        self.proc = subprocess.Popen(self._config(), stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        return self

    def stop(self, sig: str = "term") -> None:
        if self.proc and self.proc.poll() is None:
            (self.proc.kill if sig == "kill" else self.proc.terminate)()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
