"""Inference counters and latency windows, plus host metrics, for telemetry."""
from __future__ import annotations

import glob
import os
import platform
import shutil
import threading
import time

import numpy as np


class InferenceStats:
    """Thread-safe: request handlers record, the telemetry loop takes windows."""

    def __init__(self, max_samples: int = 100_000):
        self._lock = threading.Lock()
        self._lat: list[float] = []
        self._errors = 0
        self._max = max_samples
        self.total = 0
        self.total_errors = 0
        self._since = time.monotonic()

    def record(self, ms: float | None, *, ok: bool = True) -> None:
        with self._lock:
            if ok:
                self.total += 1
                if len(self._lat) < self._max:
                    self._lat.append(ms or 0.0)
            else:
                self._errors += 1
                self.total_errors += 1

    def window(self) -> dict:
        with self._lock:
            lat, errors, since = self._lat, self._errors, self._since
            self._lat, self._errors, self._since = [], 0, time.monotonic()
        span = max(time.monotonic() - since, 1e-9)
        stats = None
        if lat:
            a = np.asarray(lat)
            stats = {"p50": round(float(np.percentile(a, 50)), 4), "p95": round(float(np.percentile(a, 95)), 4),
                     "p99": round(float(np.percentile(a, 99)), 4), "mean": round(float(a.mean()), 4)}
        return {"count": len(lat), "errors": errors, "window_s": round(span, 3),
                "throughput_ips": round(len(lat) / span, 3), "latency_ms": stats}


class HostMetrics:
    """Linux /proc and /sys readings (Raspberry Pi OS, JetPack); None where absent."""

    def __init__(self, disk_path: str):
        self.disk_path = disk_path
        self._cpu = (time.monotonic(), self._proc_cpu())
        self.started = time.time()

    @staticmethod
    def _proc_cpu() -> float:
        t = os.times()
        return t.user + t.system

    def cpu_percent(self) -> float:
        now, cpu = time.monotonic(), self._proc_cpu()
        then, cpu0 = self._cpu
        self._cpu = (now, cpu)
        return round(100.0 * (cpu - cpu0) / max(now - then, 1e-9), 2)

    @staticmethod
    def rss_bytes() -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    @staticmethod
    def memory() -> dict:
        out = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    k, v = line.split(":", 1)
                    if k in ("MemTotal", "MemAvailable"):
                        out[k] = int(v.split()[0]) * 1024
        except OSError:
            pass
        return {"total_bytes": out.get("MemTotal"), "available_bytes": out.get("MemAvailable")}

    @staticmethod
    def temperature_c() -> float | None:
        temps = []
        for p in glob.glob("/sys/class/thermal/thermal_zone*/temp"):
            try:
                temps.append(int(open(p).read().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return round(max(temps), 1) if temps else None

    def snapshot(self) -> dict:
        try:
            disk_free = shutil.disk_usage(self.disk_path).free
        except OSError:
            disk_free = None
        try:
            sys_uptime = float(open("/proc/uptime").read().split()[0])
        except (OSError, ValueError):
            sys_uptime = None
        mem = self.memory()
        return {"cpu_percent": self.cpu_percent(), "process_rss_bytes": self.rss_bytes(),
                "memory_total_bytes": mem["total_bytes"], "memory_available_bytes": mem["available_bytes"],
                "temperature_c": self.temperature_c(), "disk_free_bytes": disk_free,
                "uptime_s": round(time.time() - self.started, 1), "system_uptime_s": sys_uptime,
                "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def platform_info() -> dict:
    model = None
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            model = open(p).read().strip("\x00\n ")
            break
        except OSError:
            continue
    return {"system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "hostname": platform.node(), "board": model}
