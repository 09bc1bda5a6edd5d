"""Interleaved A/B latency: the way to compare two models on a noisy host.

Timing one model, then the other, lets whatever else the machine does (another build, a
thermal step, a TensorFlow thread pool winding down) land on one side only. Here both
models are loaded in the same clean process (only the device runtime, never TensorFlow)
and run in alternating blocks, A B B A A B ..., each block long enough for the timer
to resolve; every round gives one ratio B/A. The figures are the median ratio and its
inter-quartile range over rounds. Rounds stop when the median is stable, when the verdict
is clear (see `compare`), or when the time budget runs out.

`python -m edgeruntime.timing --serve` is the worker the packager starts for its speed
gate: JSON requests on stdin, one JSON reply per line on stdout.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Callable

import numpy as np

BLOCK_SECONDS = 0.01  # long enough that per-block timer and loop overhead vanish
MIN_ROUNDS = 8
MAX_ROUNDS = 400
STABLE = 0.02  # stop once the median ratio is known to about +-2 %
# Differences under 5 % on the build host do not carry over to a device's CPU: "slower" needs
# even the lower quartile of the per-round ratios above 1.05 ("faster": upper quartile < 0.95).
NOISE_FLOOR = 0.05
# A ratio whose inter-quartile range is wider than half its median is not a measurement: tiny
# models (a few microseconds a call) on a busy or 2-core host time bimodally. Such ratios are
# reported as unresolved, never as a figure (the digits demo read 0.50x one run and 1.07x the next).
UNRESOLVED_SPREAD = 0.5


# Another process's load skews a comparison, and not evenly: beside a CPU burner, with the model's
# two threads on two cores, a digits int8 model that runs at 0.36x fp32 timed "slower, 1.91x"
# (benchmarks/auto_repeat.py). So the worker times with no more threads than the cores the rest of
# the host leaves free, and a comparison the host still crowded (its threads plus the others' load
# over the cores) keeps a verdict only when it is beyond what such a host can fake.
BUSY_SLACK = 0.25  # cores: what a quiet host's background uses
BUSY_FACTOR = 2.5  # on a crowded host, "slower" needs even the quartile's interval above this


class HostLoad:
    """Cores the rest of the host kept busy since `start` (/proc/stat's busy time less this process's
    own CPU time); None where /proc/stat is not there."""

    def __init__(self):
        self._start = self._sample()

    @staticmethod
    def _sample():
        """(busy seconds of this process's CPUs, this process's CPU seconds, now); None without /proc/stat."""
        try:
            mine = os.sched_getaffinity(0)
        except AttributeError:
            mine = None
        try:
            with open("/proc/stat") as f:
                rows = [line.split() for line in f if line.startswith("cpu")]
        except OSError:
            return None
        # the CPUs this process may run on (a container pinned to 2 of 32 cores reads its own 2), else all
        picked = [r for r in rows[1:] if mine is not None and r[0][3:].isdigit() and int(r[0][3:]) in mine]
        busy = 0
        try:
            for r in picked or rows[:1]:
                v = [int(x) for x in r[1:9]]
                busy += sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
        except (ValueError, IndexError):
            return None
        t = os.times()
        return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.monotonic()

    def other_cores(self) -> float | None:
        end = self._sample()
        if self._start is None or end is None or end[2] - self._start[2] < 0.05:
            return None
        return max(0.0, ((end[0] - self._start[0]) - (end[1] - self._start[1])) / (end[2] - self._start[2]))

    @classmethod
    def now(cls, seconds: float = 0.3) -> float | None:
        load = cls()
        time.sleep(seconds)
        return load.other_cores()


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_for(profile_threads: int) -> int:
    """Threads to time with: the profile's, but never more than this host has cores
    (oversubscribed threads make latency noise, not a measurement)."""
    cores = host_cores()
    return min(profile_threads, cores) if profile_threads > 0 else cores


class Speed(str, Enum):
    """A timing's verdict on B (the candidate) against A (fp32)."""

    SLOWER = "slower"
    FASTER = "faster"
    WITHIN_NOISE = "within noise"
    UNRESOLVED = "unresolved"  # the rounds disagree, or a crowded host: a tie


@dataclass(frozen=True)
class Ratio:
    median: float
    q1: float
    q3: float
    # the lower end of the lower quartile's ~95 % interval (q1_interval); None: not known (one figure)
    q1_low: float | None = None

    @property
    def resolved(self) -> bool:
        """Whether the rounds agree well enough for the median to mean something."""
        return self.q3 - self.q1 <= UNRESOLVED_SPREAD * self.median

    @property
    def verdict(self) -> Speed:
        """'slower' / 'faster' only when the whole inter-quartile range says so, beyond the floor.
        'slower' stands even when the rounds are spread (three rounds in four slower is evidence,
        and rejecting a candidate only falls back to fp32); a claim of 'faster' needs resolved
        rounds, else 'unresolved' (the gate lets it pass, as within noise)."""
        if self.q1 > 1 + NOISE_FLOOR:
            # slower only once the quartile's interval says so: a loaded host's odd rounds must not flip
            # a build's choice from one run to the next (then it is a tie, and the smaller candidate ships)
            return Speed.SLOWER if self.q1_low is None or self.q1_low > 1 + NOISE_FLOOR else Speed.UNRESOLVED
        if not self.resolved:
            return Speed.UNRESOLVED
        if self.q3 < 1 - NOISE_FLOOR:
            return Speed.FASTER
        return Speed.WITHIN_NOISE


@dataclass(frozen=True)
class Comparison:
    """B (candidate) against A (baseline), from interleaved rounds."""

    a_ms: float  # median per-call latency over blocks
    b_ms: float
    ratio: Ratio
    rounds: int
    calls_per_block: int
    seconds: float
    stable: bool  # stopped because the median settled or the verdict was clear, not by the budget

    def to_dict(self) -> dict:
        d = asdict(self)
        low = self.ratio.q1_low
        d["ratio"] = {"median": round(self.ratio.median, 4), "q1": round(self.ratio.q1, 4),
                      "q3": round(self.ratio.q3, 4), "verdict": self.ratio.verdict.value,
                      "resolved": self.ratio.resolved,
                      "q1_low": round(low, 4) if low is not None and math.isfinite(low) else None}
        d["a_ms"], d["b_ms"], d["seconds"] = round(self.a_ms, 5), round(self.b_ms, 5), round(self.seconds, 2)
        return d


def _block(call: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - t0) / n


def q1_interval(ratios: list[float]) -> tuple[float, float]:
    """A distribution-free ~95 % interval for the lower quartile of the rounds' ratios (order
    statistics: the k-th smallest of n rounds lies below the true quartile with probability
    P(Binomial(n, 1/4) >= k)); infinite ends until there are enough rounds to bound them."""
    x, n = sorted(ratios), len(ratios)
    pmf = [math.comb(n, i) * 0.25 ** i * 0.75 ** (n - i) for i in range(n + 1)]
    below = list(itertools.accumulate(pmf))  # below[k] = P(Binomial <= k)
    k_lo = max((k for k in range(1, n + 1) if 1 - below[k - 1] >= 0.975), default=0)
    k_hi = min((k for k in range(1, n + 1) if below[k - 1] >= 0.975), default=n + 1)
    return (x[k_lo - 1] if k_lo else -math.inf), (x[k_hi - 1] if k_hi <= n else math.inf)


def compare(a: Callable[[], object], b: Callable[[], object], *, budget_s: float = 3.0,
            min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS, question: str = "verdict",
            slower_bound: Callable[[], float] = lambda: 1 + NOISE_FLOOR) -> Comparison:
    """Time `b` against `a` in alternating blocks until the median ratio is stable, the verdict is
    clear (or `budget_s` is spent, with at least `min_rounds` rounds). A `question` of "slower" says
    the caller needs only to know whether `b` is slower (a speed gate, for a candidate that does not
    need to be faster to be worth it): the rounds then also stop once that answer is settled.
    `slower_bound()`: what the lower quartile's interval must clear before the rounds stop on "slower"
    (the worker raises it while the host is crowded, where the verdict will need that much)."""
    t_start = time.perf_counter()
    for _ in range(3):  # warm-up: first calls allocate, JIT kernels, fill caches
        a()
        b()
    single = max(min(_block(a, 1) for _ in range(3)), min(_block(b, 1) for _ in range(3)), 1e-7)
    n = int(min(max(BLOCK_SECONDS / single, 1), 20_000))
    ta, tb, ratios = [], [], []
    deadline = t_start + budget_s
    stable = decided = False
    for i in range(max_rounds):
        if i % 2 == 0:  # A B, then B A: drift within a round cancels out over rounds
            x, y = _block(a, n), _block(b, n)
        else:
            y, x = _block(b, n), _block(a, n)
        ta.append(x)
        tb.append(y)
        ratios.append(y / x)
        if i + 1 >= min_rounds:
            q1, med, q3 = np.percentile(ratios, [25, 50, 75])
            # Half-width of the median's ~95 % interval (the box plot's notch).
            notch = 1.58 * (q3 - q1) / np.sqrt(len(ratios))
            lo, hi = q1_interval(ratios)
            bound = slower_bound()
            # A stable median is not enough while a 'slower' verdict is unsure (its interval not yet above
            # the bound, which a crowded host raises): more rounds settle it.
            stable = notch <= STABLE * med and not (q1 > 1 + NOISE_FLOOR and lo <= bound)
            # Far from a tie, and the verdict already says so: a median far above 1 over bimodal rounds
            # (lower quartile still near 1) reads 'within noise', so such rounds go on to the budget,
            # as do spread rounds where a claim of faster may still resolve.
            now = Ratio(float(med), float(q1), float(q3), lo).verdict
            decided = (med - notch > 1 + 2 * NOISE_FLOOR and now is Speed.SLOWER and lo > bound) or (
                med + notch < 1 - 2 * NOISE_FLOOR and now is Speed.FASTER)
            if not (stable or decided):
                # 'slower' is the lower quartile above the floor: once its interval is wholly above, more
                # rounds will not undo it; wholly below, they will not make it slower.
                decided = lo > bound or (question == "slower" and hi <= 1 + NOISE_FLOOR)
            if stable or decided or time.perf_counter() > deadline:
                break
    q1, med, q3 = (float(v) for v in np.percentile(ratios, [25, 50, 75]))
    return Comparison(a_ms=float(np.median(ta)) * 1e3, b_ms=float(np.median(tb)) * 1e3,
                      ratio=Ratio(med, q1, q3, _known(q1_interval(ratios)[0])), rounds=len(ratios), calls_per_block=n,
                      seconds=time.perf_counter() - t_start, stable=bool(stable or decided))


def _known(low: float) -> float | None:
    """The interval's lower end, or None while too few rounds bound it (a slow model may get fewer
    than 13 in its budget): the verdict then falls back to the lower quartile itself."""
    return low if math.isfinite(low) else None


def median_latency(call: Callable[[], object], *, budget_s: float = 1.0) -> float:
    """Median per-call milliseconds over blocks, for a model on its own."""
    for _ in range(3):
        call()
    n = int(min(max(BLOCK_SECONDS / max(_block(call, 1), 1e-7), 1), 20_000))
    times, deadline = [], time.perf_counter() + budget_s
    while len(times) < MIN_ROUNDS or (time.perf_counter() < deadline and len(times) < MAX_ROUNDS):
        times.append(_block(call, n))
    return float(np.median(times)) * 1e3


@dataclass(frozen=True)
class ModelSpec:
    """A model file and the runtime settings the device will use for it."""

    path: str
    format: str
    threads: int = 0
    delegates: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(path=str(d["path"]), format=str(d["format"]), threads=int(d.get("threads") or 0),
                   delegates=tuple(d.get("delegates") or ()),
                   providers=tuple(d.get("providers") or ("CPUExecutionProvider",)))


class Worker:
    """Keeps loaded models between requests (the fp32 baseline is compared with several
    candidates) and answers `compare` requests."""

    def __init__(self):
        self._loaded: dict[ModelSpec, object] = {}
        self.rss: dict[ModelSpec, int | None] = {}  # RSS growth from loading and first running each model

    def _runtime(self, spec: ModelSpec, feeds: dict):
        if spec not in self._loaded:
            from edgeruntime.base import LoadSpec
            from edgeruntime.registry import load_runtime

            _import_runtime(spec.format)  # the library is the agent's once, not each model's
            before = rss_bytes()
            rt = load_runtime(spec.path, LoadSpec(format=spec.format, threads=spec.threads, delegates=spec.delegates,
                                                  providers=spec.providers, allow_cpu_fallback=True))
            rt.run(rt.prepare(feeds))  # arenas are allocated on the first run (the build's own sample)
            after = rss_bytes()
            self.rss[spec] = max(after - before, 0) if before and after else None
            self._loaded[spec] = rt
        return self._loaded[spec]

    def handle(self, req: dict) -> dict:
        with np.load(req["feeds"], allow_pickle=False) as z:
            feeds = {k: z[k] for k in z.files}
        a = ModelSpec.from_dict(req["a"])
        ra = self._runtime(a, feeds)
        if req.get("b") is None:  # one model on its own: the baseline itself was chosen
            fa = ra.prepare(feeds)
            ms = median_latency(lambda: ra.run(fa), budget_s=float(req.get("budget_s", 1.0)))
            return {"a_ms": round(ms, 5), "b_ms": round(ms, 5), "baseline": True, "threads": [a.threads],
                    "host_cores": host_cores(), "runtime": [ra.details], "rss_bytes": [self.rss.get(a)]}
        b = ModelSpec.from_dict(req["b"])
        cores = host_cores()
        threads = max(a.threads or cores, b.threads or cores)
        before = HostLoad.now()
        free = max(1, int(cores - before + BUSY_SLACK)) if before is not None else threads
        if free < threads:  # the rest of the host is busy: time with the cores it leaves
            a, b, threads = replace(a, threads=free), replace(b, threads=free), free
            ra = self._runtime(a, feeds)
        rb = self._runtime(b, feeds)
        fa, fb = ra.prepare(feeds), rb.prepare(feeds)  # native dtypes: time the model, not our I/O
        load = HostLoad()

        def crowded_now(during: float | None) -> bool:
            return during is not None and threads + during > cores + BUSY_SLACK

        # On a crowded host "slower" must clear BUSY_FACTOR (crowded_verdict): the rounds go on until it does
        # or the budget ends, rather than stop at the quiet host's bound and then read a tie.
        res = compare(lambda: ra.run(fa), lambda: rb.run(fb), budget_s=float(req.get("budget_s", 3.0)),
                      max_rounds=int(req.get("max_rounds", MAX_ROUNDS)), question=str(req.get("question", "verdict")),
                      slower_bound=lambda: BUSY_FACTOR if crowded_now(load.other_cores()) else 1 + NOISE_FLOOR)
        during = load.other_cores()
        d = res.to_dict()
        crowded = crowded_now(during)
        if crowded:
            d["ratio"]["verdict"] = crowded_verdict(res.ratio).value
        d["host_load"] = {"others_cores_before": _round(before), "others_cores": _round(during),
                          "threads": threads, "crowded": crowded}
        return dict(d, threads=[a.threads, b.threads], host_cores=cores,
                    runtime=[ra.details, rb.details], question=str(req.get("question", "verdict")),
                    rss_bytes=[self.rss.get(a), self.rss.get(b)])


def crowded_verdict(ratio: Ratio) -> Speed:
    """The verdict of rounds timed on a crowded host: 'slower' beyond what the crowd can fake, else a
    tie ('unresolved': the build keeps the smaller candidate)."""
    if ratio.verdict is Speed.SLOWER and ratio.q1_low is not None and ratio.q1_low > BUSY_FACTOR:
        return Speed.SLOWER
    return Speed.UNRESOLVED


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def rss_bytes(pid: int | str = "self") -> int | None:
    """A process's resident memory (this one's by default; None where /proc cannot say)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _import_runtime(fmt: str) -> None:
    try:
        if fmt == "onnx":
            import onnxruntime  # noqa: F401
        elif fmt == "tflite":
            import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:  # load_runtime says what is missing
        pass


def serve(inp=sys.stdin, out=sys.stdout) -> None:
    worker = Worker()
    for line in inp:
        if not line.strip():
            continue
        try:
            reply = {"ok": True, **worker.handle(json.loads(line))}
        except Exception as e:  # one bad request must not kill the worker: report it to the caller
            reply = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        out.write(json.dumps(reply, default=str) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m edgeruntime.timing --serve")
    serve()
