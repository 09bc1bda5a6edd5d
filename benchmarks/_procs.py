"""Processes the benchmarks start: a loopback mosquitto and a device agent."""
from __future__ import annotations

from packager.demo import api_ready, free_port, port_open, wait_for
from packager.demo import stop_processes as stop  # noqa: F401  (used by the scripts)

import os
import shutil
import subprocess
import sys
from pathlib import Path


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


def agent(workdir: Path, bundle: Path, broker_port: int, *, device: str = "bench") -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--device-id", device, "--data-dir",
                          str(workdir / f"agent-{device}"), "--bundle", str(bundle), "--api-port", str(port),
                          "--broker", f"mqtt://127.0.0.1:{broker_port}", "--telemetry-interval", "60",
                          "--log-format", "text"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: api_ready(base), 30, "agent ready")
    return p, base
