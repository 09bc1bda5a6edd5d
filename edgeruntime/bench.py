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


def bench_runtime(runtime, *, warmup: int = 5, runs: int = 100, max_seconds: float = 10.0,
                  feeds: dict | None = None) -> LatencyStats:
    """Benchmark a loaded runtime adapter on `feeds` (default: random inputs of its own shapes)."""
    feeds = runtime.prepare(feeds) if feeds is not None else runtime.sample_inputs()
    return measure(lambda: runtime.run(feeds), warmup=warmup, runs=runs, max_seconds=max_seconds)


def bench_bundle(path, *, warmup: int = 10, runs: int = 200, max_seconds: float = 20.0, threads: int | None = None,
                 allow_cpu_fallback: bool = False) -> tuple[LatencyStats, dict]:
    """Verify a bundle, load its model with the manifest's runtime settings, benchmark it."""
    import tempfile

    from edgeruntime.registry import load_from_manifest
    from edgebundle.archive import open_bundle

    bundle = open_bundle(path)
    m = bundle.manifest
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        files = bundle.extract(tmp, [m.model_file] + (["golden.npz"] if m.golden else []))  # hashes checked
        rt = load_from_manifest(str(files[m.model_file]), m, threads=threads, allow_cpu_fallback=allow_cpu_fallback)
        try:
            stats = bench_runtime(rt, warmup=warmup, runs=runs, max_seconds=max_seconds,
                                  feeds=_golden_input(files.get("golden.npz"), m))
        finally:
            rt.close()
    return stats, rt.details


def _golden_input(path, manifest) -> dict | None:
    """The first golden input of a bundle: a real sample (random values would crash models that
    take ids or sample rates)."""
    if path is None:
        return None
    with np.load(path, allow_pickle=False) as z:
        return {t.name: z[f"input.0.{t.name}"] for t in manifest.inputs}


def _open_model(path, tmp: str, *, like=None, threads: int | None):
    """A bundle (verified, its manifest's runtime settings) or a bare .tflite/.onnx file (run
    with the settings of `like`, the other bundle's manifest). Returns (runtime, manifest)."""
    from pathlib import Path

    from edgeruntime.base import LoadSpec
    from edgeruntime.registry import load_from_manifest, load_runtime, runtime_for_format
    from edgeruntime.timing import threads_for
    from edgebundle.archive import open_bundle
    from edgebundle.errors import InputError

    path = Path(path)
    if path.suffix in (".tflite", ".onnx"):
        if like is None:
            raise InputError(f"{path.name}: compare a bundle against a model file, not two model files")
        rt, fmt = like.runtime, path.suffix[1:]
        return load_runtime(path, LoadSpec(format=fmt, threads=threads or threads_for(rt.threads),
                                           delegates=runtime_for_format(fmt).plain_delegates(tuple(rt.delegates)),
                                           providers=tuple(rt.providers), allow_cpu_fallback=True)), None
    bundle = open_bundle(path)
    m = bundle.manifest
    files = bundle.extract(Path(tmp) / path.name, [m.model_file] + (["golden.npz"] if m.golden else []))
    rt = load_from_manifest(str(files[m.model_file]), m, threads=threads or threads_for(m.runtime.threads),
                            allow_cpu_fallback=True)
    return rt, (m, files.get("golden.npz"))


def compare_bundles(path, against, *, threads: int | None = None, budget_s: float = 20.0,
                    max_rounds: int = 400) -> dict:
    """BUNDLE against another bundle or model file, interleaved in this process (see
    edgeruntime.timing): the same measurement the build's speed gate makes."""
    import tempfile

    from edgeruntime.timing import compare, host_cores

    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        rb, (m, golden) = _open_model(path, tmp, threads=threads)
        ra, _ = _open_model(against, tmp, like=m, threads=threads)
        feeds = _golden_input(golden, m) or rb.sample_inputs()  # the build times the first golden input too
        fb, fa = rb.prepare(feeds), ra.prepare(feeds)
        res = compare(lambda: ra.run(fa), lambda: rb.run(fb), budget_s=budget_s, max_rounds=max_rounds)
        out = dict(res.to_dict(), bundle=str(path), against=str(against), host_cores=host_cores(),
                   runtime=[rb.details, ra.details])
        rb.close()
        ra.close()
    return out


def compare_text(res: dict) -> str:
    r = res["ratio"]
    threads = res["runtime"][0].get("threads")
    return (f"{res['bundle']}: {res['b_ms']:.4f} ms per inference\n"
            f"{res['against']}: {res['a_ms']:.4f} ms per inference\n"
            f"ratio {r['median']:.3f}x (inter-quartile {r['q1']:.3f}-{r['q3']:.3f}, {res['rounds']} interleaved rounds of "
            f"{res['calls_per_block']} calls, {threads or 'default'} threads on {res['host_cores']} cores): "
            f"{r['verdict']}" + ("" if r.get("resolved", True) else
                                 "; UNRESOLVED: the rounds disagree too much for the median to mean anything "
                                 "(a model this fast, or a busy host)"))
