"""Shadow evaluation: before an update switches, the staged model runs beside the serving one on a
sampled share of live requests, off the request path, and must agree with it.

The request thread only samples and enqueues (`offer`: a random draw and a put_nowait; never
blocks): the response never waits for the shadow. One worker runs the candidate on the queued
inputs and compares its primary output with what the serving model answered, the way the build's
gate compares (top-1 for class scores, exact for integers, otherwise cosine and size). The worker
keeps to a CPU budget (a tenth of one core, counting the runtime's threads, and at most 20
comparisons a second): after each run it rests in proportion, and requests sampled while
it is busy or resting are dropped and counted, never queued without bound."""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Callable

import numpy as np

from edgeproto.desired import Shadow

log = logging.getLogger("edgepack.agent.ota")
MIN_COSINE = 0.99  # a float output agrees when its cosine to the serving model's is at least this...
MAX_SCALE_ERROR = 0.1  # ...and its norm is within 10 % of it


def agreement(ref: np.ndarray, got: np.ndarray, *, labelled: bool) -> tuple[int, int, float]:
    """(rows that agree, rows, mean cosine) of one output of a request, row by row (batch)."""
    r, g = np.asarray(ref), np.asarray(got)
    rows = r.shape[0] if r.ndim > 1 and r.shape[0] == g.shape[0] else 1
    r, g = r.reshape(rows, -1), g.reshape(rows, -1)
    if r.shape != g.shape:
        return 0, rows, 0.0
    if r.dtype.kind in "iub":
        return int(np.sum(np.all(r == g, axis=1))), rows, float(np.mean(np.all(r == g, axis=1)))
    r64 = np.where(np.isfinite(r), r, 0.0).astype(np.float64)
    g64 = np.where(np.isfinite(g), g, 0.0).astype(np.float64)
    nr, ng = np.linalg.norm(r64, axis=1), np.linalg.norm(g64, axis=1)
    both_zero = (nr == 0) & (ng == 0)
    cos = np.where(both_zero, 1.0, np.sum(r64 * g64, axis=1) / np.maximum(nr * ng, 1e-30))
    scores = r.shape[1] > 1 and (labelled or (np.all(r64 >= -1e-6) and np.allclose(r64.sum(1), 1.0, atol=1e-2)))
    if scores:
        ok = r64.argmax(1) == g64.argmax(1)
    else:  # direction and size: a scaled output (or a single value off by a factor) does not agree
        scale = np.where(both_zero, 1.0, ng / np.maximum(nr, 1e-30))
        ok = (cos >= MIN_COSINE) & (np.abs(scale - 1.0) <= MAX_SCALE_ERROR)
    return int(np.sum(ok)), rows, float(np.mean(cos))


class ShadowRun:
    """One shadow phase: `offer` from request threads, `summary` for events and telemetry."""

    QUEUE = 4

    def __init__(self, candidate, settings: Shadow, *, output: str, labelled: bool, cpu_share: float = 0.1,
                 max_per_s: float = 20.0, threads: int = 1, draw: Callable[[], float] = random.random):
        """`threads`: cores the candidate's runtime uses per run (the rest scales with them).
        `max_per_s`: comparisons a second at most; a small model's run is cheap, but each comparison
        is Python work under the GIL that live requests wait for (measured: digits at 100/s doubled
        their p99), and 20 a second is a thousand samples a minute."""
        self.candidate, self.settings, self.output, self.labelled = candidate, settings, output, labelled
        self.cpu_share, self.threads, self.draw = cpu_share, max(1, threads), draw
        self.min_gap = 1.0 / max_per_s
        self._q: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sampled = self.dropped = self.compared = self.agreed = self.errors = 0
        self._cos: list[float] = []
        self._ms: list[float] = []
        self.busy_s = 0.0
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)

    def start(self) -> "ShadowRun":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def offer(self, inputs: dict, outputs: dict) -> None:
        """Called on the request path after the response is computed: O(1), never blocks."""
        if self.draw() >= self.settings.rate or self.output not in outputs:
            return
        with self._lock:
            self.sampled += 1
        try:
            self._q.put_nowait((inputs, outputs[self.output]))
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                inputs, ref = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            t0 = time.perf_counter()
            try:
                got = self.candidate.infer(inputs)[self.output]
                ms = (time.perf_counter() - t0) * 1000
                ok, rows, cos = agreement(ref, got, labelled=self.labelled)
            except Exception as e:  # the candidate fails on a request the serving model answered
                log.warning("shadow: the candidate raised %s: %s", type(e).__name__, e)
                ok, rows, cos, ms = 0, 1, 0.0, None
                with self._lock:
                    self.errors += 1
            spent = time.perf_counter() - t0
            with self._lock:
                self.compared += rows
                self.agreed += ok
                self._cos.append(cos)
                if ms is not None and len(self._ms) < 100_000:
                    self._ms.append(ms)
                self.busy_s += spent
            # the CPU budget: rest in proportion, and at least the gap between comparisons
            self._stop.wait(max(spent * (self.threads / self.cpu_share - 1), self.min_gap - spent))

    def summary(self) -> dict:
        with self._lock:
            ms = np.asarray(self._ms) if self._ms else None
            elapsed = max(time.monotonic() - self.started, 1e-9)
            return {"sampled": self.sampled, "compared": self.compared, "agreed": self.agreed,
                    "agreement": round(self.agreed / self.compared, 4) if self.compared else None,
                    "dropped": self.dropped, "errors": self.errors,
                    "cosine_mean": round(float(np.nanmean(self._cos)), 5) if self._cos else None,
                    "candidate_p50_ms": round(float(np.percentile(ms, 50)), 3) if ms is not None else None,
                    "candidate_p95_ms": round(float(np.percentile(ms, 95)), 3) if ms is not None else None,
                    "cpu_share": round(self.threads * self.busy_s / elapsed, 4), "seconds": round(elapsed, 1),
                    "min_agreement": self.settings.min_agreement}

    def verdict(self) -> str | None:
        """Why the candidate is rejected (None: it agrees)."""
        s, want = self.summary(), self.settings
        if s["compared"] < want.min_samples:
            return (f"rejected in shadow: only {s['compared']} sampled request(s) compared in {s['seconds']:.0f} s "
                    f"(at least {want.min_samples} needed; {s['dropped']} dropped while the shadow was busy)")
        if s["agreement"] < want.min_agreement:
            return (f"rejected in shadow: agreement {s['agreement']:.1%} with the serving model over {s['compared']} "
                    f"requests, below {want.min_agreement:.1%}")
        return None


__all__ = ["MIN_COSINE", "ShadowRun", "agreement"]
