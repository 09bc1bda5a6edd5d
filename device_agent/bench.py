"""Latency percentiles and throughput of one callable; shared by `edgepack bench`,
`edgepack build` reports and `edgepack-agent bench` so all report the same numbers."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    runs: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float  # inferences per second, sequential

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def measure(call: Callable[[], object], *, warmup: int = 5, runs: int = 100, max_seconds: float = 10.0) -> LatencyStats:
    """Run `call` `warmup` times, then up to `runs` times (stopping early after
    `max_seconds`, with at least 5 timed runs) and summarise the latencies."""
    for _ in range(max(0, warmup)):
        call()
    times = []
    deadline = time.perf_counter() + max_seconds
    for i in range(max(1, runs)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > deadline:
            break
    ms = np.asarray(times) * 1000.0
    return LatencyStats(
        runs=len(ms), warmup=warmup,
        p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
        p95_ms=float(np.percentile(ms, 95)), p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()), min_ms=float(ms.min()),
        throughput_ips=float(len(ms) / ms.sum() * 1000.0) if ms.sum() > 0 else 0.0)


def bench_text(stats: dict, details: dict) -> str:
    """The report `edgepack bench` and `edgepack-agent bench` both print."""
    who = details.get("provider") or details.get("delegate") or ""
    return (f"{details.get('runtime')} {details.get('version') or ''} {who}\n"
            f"runs {stats['runs']} (warm-up {stats['warmup']})\n"
            f"p50 {stats['p50_ms']:.3f} ms  p90 {stats['p90_ms']:.3f} ms  p95 {stats['p95_ms']:.3f} ms  "
            f"p99 {stats['p99_ms']:.3f} ms  mean {stats['mean_ms']:.3f} ms\n"
            f"throughput {stats['throughput_ips']:.1f} inferences/s")


def bench_runtime(runtime, *, warmup: int = 5, runs: int = 100, max_seconds: float = 10.0) -> LatencyStats:
    """Benchmark a loaded runtime adapter on random inputs of its own shapes."""
    feeds = runtime.sample_inputs()
    return measure(lambda: runtime.run(feeds), warmup=warmup, runs=runs, max_seconds=max_seconds)


def bench_bundle(path, *, warmup: int = 10, runs: int = 200, max_seconds: float = 20.0, threads: int | None = None,
                 allow_cpu_fallback: bool = False) -> tuple[LatencyStats, dict]:
    """Verify a bundle, load its model with the manifest's runtime settings, benchmark it."""
    import tempfile

    from device_agent.runtimes.registry import load_from_manifest
    from edgebundle.archive import open_bundle

    bundle = open_bundle(path)
    m = bundle.manifest
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        files = bundle.extract(tmp, [m.model_file])  # hashes checked while extracting
        rt = load_from_manifest(str(files[m.model_file]), m, threads=threads, allow_cpu_fallback=allow_cpu_fallback)
        try:
            stats = bench_runtime(rt, warmup=warmup, runs=runs, max_seconds=max_seconds)
        finally:
            rt.close()
    return stats, rt.details
