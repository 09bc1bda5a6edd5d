"""Inference counters and latency windows, plus host metrics, for telemetry."""
from __future__ import annotations

import bisect
import glob
import math
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass

import numpy as np

from edgeruntime.timing import rss_bytes


# Quantile buckets: 1 us .. 1000 s, each 2 % wider than the last, so a quantile read from a bucket
# (its geometric middle) is within 1 % of the true sample. At most ~1,050 counters per window,
# whatever the request rate: memory is bounded and nothing is ever dropped.
_MIN_MS, _GROWTH = 1e-3, 1.02
_LOG_GROWTH = math.log(_GROWTH)
_NBUCKETS = int(math.log(1e6 / _MIN_MS) / _LOG_GROWTH) + 1

# Prometheus histogram bounds (seconds): 100 us .. 10 s, the usual 1-2.5-5 steps.
PROM_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0, 10.0)


class LogHistogram:
    """Streaming latency quantiles (ms) in bounded memory: a sparse log-bucket histogram plus an
    exact count, sum, min and max. Quantiles are within 1 % of the exact value. Not thread-safe
    (InferenceStats holds the lock)."""

    __slots__ = ("counts", "n", "sum", "min", "max")

    def __init__(self):
        self.counts: dict[int, int] = {}
        self.n, self.sum, self.min, self.max = 0, 0.0, math.inf, 0.0

    def add(self, ms: float) -> None:
        i = int(math.log(ms / _MIN_MS) / _LOG_GROWTH) if ms > _MIN_MS else 0
        i = min(i, _NBUCKETS - 1)
        self.counts[i] = self.counts.get(i, 0) + 1
        self.n += 1
        self.sum += ms
        if ms < self.min:
            self.min = ms
        if ms > self.max:
            self.max = ms

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile (0 < q <= 1), None when empty."""
        if not self.n:
            return None
        rank, seen = max(1, math.ceil(q * self.n)), 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                mid = _MIN_MS * _GROWTH ** (i + 0.5)
                return min(max(mid, self.min), self.max)
        return self.max

    def summary(self) -> dict | None:
        if not self.n:
            return None
        return {"p50": round(self.quantile(0.50), 4), "p95": round(self.quantile(0.95), 4),
                "p99": round(self.quantile(0.99), 4), "mean": round(self.sum / self.n, 4)}


class PromHistogram:
    """A cumulative Prometheus histogram (seconds) over fixed bounds; count and sum are exact."""

    __slots__ = ("counts", "count", "sum")

    def __init__(self):
        self.counts = [0] * (len(PROM_BOUNDS_S) + 1)  # the last one is +Inf
        self.count, self.sum = 0, 0.0

    def observe(self, s: float) -> None:
        self.counts[bisect.bisect_left(PROM_BOUNDS_S, s)] += 1
        self.count += 1
        self.sum += s

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, c in zip(PROM_BOUNDS_S + (math.inf,), self.counts):
            acc += c
            out.append(("+Inf" if bound == math.inf else repr(bound), acc))
        return out


@dataclass(frozen=True)
class Phases:
    """Where one request's time went (seconds), Triton's split: decoding and checking the input,
    waiting for the model (it runs one request at a time), the runtime itself, encoding the output."""

    input_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.input_s + self.queue_s + self.infer_s + self.output_s


OUTCOMES = ("stop", "length", "cancelled", "failed", "queue_full")  # how a generation request ended


@dataclass(frozen=True)
class GenerationRecord:
    """One generation request as the API saw it: how it ended (OUTCOMES), its tokens, time to first
    token and decode time (seconds; the tokens after the first), the queue it met on arrival and the
    KV cache held by every running generation once it started."""

    outcome: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    decode_tokens: int = 0
    decode_s: float = 0.0
    queue_depth: int = 0
    kv_bytes: int = 0


class _GenerationSums:
    """What /metrics' counters and a telemetry window both sum over generations."""

    __slots__ = ("outcomes", "prompt_tokens", "completion_tokens", "decode_tokens", "decode_s")

    def __init__(self):
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.prompt_tokens = self.completion_tokens = self.decode_tokens = 0
        self.decode_s = 0.0

    def add(self, r: GenerationRecord) -> None:
        self.outcomes[r.outcome] = self.outcomes.get(r.outcome, 0) + 1
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.decode_tokens += r.decode_tokens
        self.decode_s += r.decode_s


class GenerationCounters(_GenerationSums):
    """Cumulative per-(model, version) generation counters for /metrics."""

    __slots__ = ("ttft_h", "last_tps")

    def __init__(self):
        super().__init__()
        self.ttft_h = PromHistogram()
        self.last_tps: float | None = None  # decode tokens/s of the last generation with two tokens or more

    def add(self, r: GenerationRecord) -> None:
        super().add(r)
        if r.ttft_s is not None:
            self.ttft_h.observe(r.ttft_s)
        if r.decode_tokens and r.decode_s > 0:
            self.last_tps = r.decode_tokens / r.decode_s


class _GenWindow(_GenerationSums):
    """A telemetry window's generation figures (`inference.generation`)."""

    __slots__ = ("ttft", "queue_max", "kv_max")

    def __init__(self):
        super().__init__()
        self.queue_max = self.kv_max = 0
        self.ttft = LogHistogram()

    def add(self, r: GenerationRecord) -> None:
        super().add(r)
        if r.ttft_s is not None:
            self.ttft.add(r.ttft_s * 1000)
        self.queue_max = max(self.queue_max, r.queue_depth)
        self.kv_max = max(self.kv_max, r.kv_bytes)

    def to_dict(self) -> dict:
        o = self.outcomes
        return {"requests": o["stop"] + o["length"], "cancelled": o["cancelled"], "failed": o["failed"],
                "queue_full": o["queue_full"], "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "ttft_ms": self.ttft.summary(),
                "decode_tokens_per_s": round(self.decode_tokens / self.decode_s, 2) if self.decode_s > 0 else None,
                "queue_depth_max": self.queue_max, "kv_cache_bytes_max": self.kv_max}


class ModelCounters:
    """Cumulative per-(model, version) counters and histograms for /metrics (Triton's names)."""

    __slots__ = ("success", "failure", "rejected", "inferences", "executions", "nonfinite", "request_us", "queue_us",
                 "input_us", "infer_us", "output_us", "request_h", "queue_h", "compute_h", "last_ms", "generation")

    def __init__(self):
        # failure: the model failed on a valid request (HTTP 500); rejected: the request was refused
        # before the model ran (bad input, HTTP 400), the client's error unless an update changed the interface
        self.success = self.failure = self.rejected = self.inferences = self.executions = self.nonfinite = 0
        self.last_ms = 0  # wall-clock milliseconds of the last successful request (Triton's last_inference)
        self.request_us = self.queue_us = self.input_us = self.infer_us = self.output_us = 0
        self.request_h, self.queue_h, self.compute_h = PromHistogram(), PromHistogram(), PromHistogram()
        self.generation: GenerationCounters | None = None  # generative models, from their first generation


class _Window:
    """One telemetry window (reset each time it is taken) and the totals since the start."""

    __slots__ = ("hist", "errors", "rejected", "nonfinite", "since", "total", "total_errors", "total_rejected",
                 "total_nonfinite", "gen")

    def __init__(self):
        self.hist, self.errors, self.rejected, self.nonfinite, self.since = LogHistogram(), 0, 0, 0, time.monotonic()
        self.total = self.total_errors = self.total_rejected = self.total_nonfinite = 0
        self.gen: _GenWindow | None = None  # from the first generation on, every window has its figures

    def add(self, ms: float | None, *, ok: bool, nonfinite: bool, rejected: bool = False) -> None:
        if rejected:
            self.rejected += 1
            self.total_rejected += 1
            return
        if not ok:
            self.errors += 1
            self.total_errors += 1
            return
        self.total += 1
        self.hist.add(ms or 0.0)
        if nonfinite:
            self.nonfinite += 1
            self.total_nonfinite += 1

    def take(self, reset: bool) -> dict:
        hist, errors, rejected, nonfinite, since = self.hist, self.errors, self.rejected, self.nonfinite, self.since
        stats = hist.summary()  # under the caller's lock: a peek must not race the next record()
        gen = self.gen.to_dict() if self.gen is not None else None
        if reset:
            self.hist, self.errors, self.rejected, self.nonfinite, self.since = LogHistogram(), 0, 0, 0, time.monotonic()
            self.gen = _GenWindow() if self.gen is not None else None
        span = max(time.monotonic() - since, 1e-9)
        out = {"count": hist.n, "errors": errors, "rejected": rejected, "nonfinite": nonfinite,
               "window_s": round(span, 3),
               "throughput_ips": round(hist.n / span, 3), "latency_ms": stats}
        if gen is not None:
            out["generation"] = gen
        return out


class InferenceStats:
    """Thread-safe: request handlers record, the telemetry loop takes windows, /metrics reads the
    cumulative counters. Every request is counted (no sample cap); memory stays bounded."""

    MAX_MODELS = 8  # per-model series kept for /metrics (the oldest served model is dropped first)

    MAX_SLOTS = 32  # per-slot windows (one per model name the agent serves)

    def __init__(self):
        self._lock = threading.Lock()
        self._all = _Window()
        self._slots: dict[str, _Window] = {}
        self._models: dict[tuple[str, str], ModelCounters] = {}

    @property
    def total(self) -> int:
        return self._all.total

    @property
    def total_errors(self) -> int:
        return self._all.total_errors

    @property
    def total_nonfinite(self) -> int:
        return self._all.total_nonfinite

    def totals(self, slot: str | None = None) -> dict:
        """Inferences since the start: the agent's, or one slot's (a model name on the device)."""
        w = self._all if slot is None else self._slots.get(slot, _Window())
        return {"count": w.total, "errors": w.total_errors, "rejected": w.total_rejected,
                "nonfinite": w.total_nonfinite}

    def _counters(self, model: tuple[str, str] | None) -> ModelCounters | None:
        if model is None:
            return None
        c = self._models.get(model)
        if c is None:
            if len(self._models) >= self.MAX_MODELS:
                del self._models[next(iter(self._models))]
            c = self._models[model] = ModelCounters()
        return c

    def record(self, ms: float | None, *, ok: bool = True, nonfinite: bool = False,
               model: tuple[str, str] | None = None, phases: Phases | None = None, batch: int = 1,
               slot: str | None = None, rejected: bool = False) -> None:
        """One request: `ms` its latency (successes), `nonfinite` whether a float output held NaN/Inf,
        `rejected` a request refused before the model ran (bad input: not the model's error),
        `model` (name, version) and `phases` for the per-model /metrics series, `slot` (the model's
        name on the device; default the model's own) for its telemetry window."""
        with self._lock:
            c = self._counters(model)
            key = slot or (model[0] if model else None)
            w = None if key is None else self._slots.get(key)
            if w is None and key is not None and len(self._slots) < self.MAX_SLOTS:
                w = self._slots[key] = _Window()
            for win in (self._all, w) if w is not None else (self._all,):
                win.add(ms, ok=ok, nonfinite=nonfinite, rejected=rejected)
            if rejected or not ok:
                if c is not None:
                    c.rejected += rejected
                    c.failure += not rejected
                return
            if c is None:
                return
            c.success += 1
            c.last_ms = int(time.time() * 1000)
            c.executions += 1
            c.inferences += batch
            c.nonfinite += bool(nonfinite)
            total_s = phases.total_s if phases else (ms or 0.0) / 1000
            c.request_us += int(total_s * 1e6)
            c.request_h.observe(total_s)
            if phases:
                c.queue_us += int(phases.queue_s * 1e6)
                c.input_us += int(phases.input_s * 1e6)
                c.infer_us += int(phases.infer_s * 1e6)
                c.output_us += int(phases.output_s * 1e6)
                c.queue_h.observe(phases.queue_s)
                c.compute_h.observe(phases.input_s + phases.infer_s + phases.output_s)

    def record_generation(self, r: GenerationRecord, *, model: tuple[str, str], slot: str | None = None) -> None:
        """A generation request's figures (as well as its record() as a request, where it ran): the
        per-model counters for /metrics and the telemetry windows' `generation`."""
        with self._lock:
            c = self._counters(model)
            c.generation = c.generation or GenerationCounters()
            c.generation.add(r)
            key = slot or model[0]
            w = self._slots.get(key)
            if w is None and len(self._slots) < self.MAX_SLOTS:
                w = self._slots[key] = _Window()
            for win in (self._all, w) if w is not None else (self._all,):
                win.gen = win.gen or _GenWindow()
                win.gen.add(r)

    def window(self, *, reset: bool = True, slot: str | None = None) -> dict:
        """The telemetry window since the last reset (the agent's, or one slot's): count, errors,
        rejected, nonfinite, throughput and latency percentiles (ms). `reset=False` peeks (the HTTP /stats view)."""
        with self._lock:
            w = self._all if slot is None else self._slots.setdefault(slot, _Window())
            return w.take(reset)

    def forget(self, slot: str) -> None:
        """A removed model's window goes with it."""
        with self._lock:
            self._slots.pop(slot, None)

    def per_model(self) -> list[tuple[tuple[str, str], ModelCounters]]:
        """A consistent copy of the per-model counters, for rendering /metrics."""
        import copy

        with self._lock:
            return [(k, copy.deepcopy(v)) for k, v in self._models.items()]


def has_nonfinite(arrays) -> bool:
    """Whether any float array holds NaN or Inf. The fast path is one float64 sum per array (NaN
    and Inf propagate through it; float64 cannot overflow on float32 data); only a non-finite sum
    is confirmed element-wise (a float64 output near 1e308 could overflow the sum)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow and inf - inf are the point here
        for a in arrays:
            if a.dtype.kind == "f" and a.size and not math.isfinite(float(np.sum(a, dtype=np.float64))):
                if not np.isfinite(a).all():
                    return True
    return False


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

    rss_bytes = staticmethod(rss_bytes)

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
