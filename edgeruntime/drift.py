"""Input and output drift: the reference statistics a build records in the manifest, and the same
statistics a device keeps over live traffic, compared by the Population Stability Index.

Why PSI over fixed bins (and not a KS statistic or a streaming quantile sketch): the build fixes each
channel's bin edges at the deciles of the reference data, so the device only counts values into 10
bins per channel: a few hundred integers per tensor whatever the traffic, a searchsorted per sampled
value, windows that add up, nothing to sort or merge. PSI compares two histograms on the same bins;
its usual reading (under 0.1 stable, 0.1-0.25 moderate, over 0.25 shifted) is what operators know. A KS
statistic needs the live sample's CDF, i.e. a quantile sketch on the device (datasketches' KLL is a
native wheel of ~1 MB, not built for every board the agent runs on); binned at the same deciles, KS is
available from the same counts (`ks` below) and reported beside PSI.

Kinds: `values` (float inputs and outputs: each feature on its own when a sample holds 2-64 values
(an 8x8 image's pixels: a spatial shift shows), else per colour channel (images NHWC with 2-64
channels), else the whole tensor; the score is the mean PSI over them, `psi_max` the worst), `tokens` (integer token inputs: the
length of each sample, non-zero ids), `classes` (class-score outputs: the distribution of the top-1)."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

BINS = 10
MAX_CHANNELS = 64
SAMPLE = 1024  # values per channel and request at most (strided): bounded cost per request
EPS = 1e-4  # empty bins: PSI's log needs a floor
PSI_SHIFTED = 0.25


@dataclass(frozen=True)
class TensorRef:
    """The reference of one tensor: per channel, the inner bin edges and the reference fractions."""

    name: str
    kind: str  # values | tokens | classes
    edges: tuple[tuple[float, ...], ...]
    fractions: tuple[tuple[float, ...], ...]
    mean: float
    std: float
    samples: int

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "edges": [list(e) for e in self.edges],
                "fractions": [list(f) for f in self.fractions], "mean": self.mean, "std": self.std,
                "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorRef":
        edges = tuple(tuple(float(v) for v in e) for e in d["edges"])
        fractions = tuple(tuple(float(v) for v in f) for f in d["fractions"])
        if d["kind"] not in ("values", "tokens", "classes") or len(edges) != len(fractions) or any(
                len(f) != len(e) + 1 for e, f in zip(edges, fractions)):
            raise ValueError(f"drift reference of {d.get('name')!r} is malformed")
        return cls(name=str(d["name"]), kind=d["kind"], edges=edges, fractions=fractions, mean=float(d["mean"]),
                   std=float(d["std"]), samples=int(d["samples"]))


def kind_of(x: np.ndarray, *, output: bool) -> str:
    """What a tensor's drift is measured on (x: samples on axis 0)."""
    if x.dtype.kind in "iub":
        return "tokens" if not output else "values"
    if output and x.ndim == 2 and x.shape[1] > 1 and np.all(x >= -1e-6) and np.allclose(x.sum(1), 1.0, atol=1e-2):
        return "classes"
    return "values"


def channels(x: np.ndarray, kind: str, limit: int | None = None) -> np.ndarray:
    """(channels, values) of one batch of samples (axis 0), the way the kind counts them; `limit`:
    at most that many values per channel, strided before anything is copied (a device's request)."""
    if kind == "tokens":
        lengths = np.count_nonzero(x.reshape(x.shape[0], -1), axis=1)
        return lengths.astype(np.float64)[None, :]
    if kind == "classes":
        return x.reshape(x.shape[0], -1).argmax(1).astype(np.float64)[None, :]
    per_sample = int(np.prod(x.shape[1:])) if x.ndim > 1 else 1
    if 1 < per_sample <= MAX_CHANNELS:  # small tensors: each feature (pixel, value) its own histogram
        rows = x.reshape(x.shape[0], -1)
    elif x.ndim >= 3 and 1 < x.shape[-1] <= MAX_CHANNELS:  # images: one per colour channel
        rows = x.reshape(-1, x.shape[-1])
    else:
        rows = x.reshape(-1, 1)
    if limit and rows.shape[0] > limit:
        rows = rows[::math.ceil(rows.shape[0] / limit)]
    return np.asarray(rows, np.float64).T


def reference(name: str, x: np.ndarray, *, output: bool = False) -> TensorRef:
    """The reference of tensor `name` from samples stacked on axis 0 (calibration/validation data, or
    the float model's outputs on them)."""
    x = np.asarray(x)
    kind = kind_of(x, output=output)
    ch = channels(x, kind)
    finite = ch[np.isfinite(ch)] if ch.size else ch
    edges, fractions = [], []
    for values in ch:
        values = values[np.isfinite(values)]
        if kind == "classes":
            n = int(x.reshape(x.shape[0], -1).shape[1])
            inner = np.arange(n - 1, dtype=np.float64) + 0.5
        else:
            inner = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1])) if values.size else np.zeros(0)
        counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(inner) + 1)
        edges.append(tuple(round(float(v), 7) for v in inner))
        fractions.append(tuple(round(float(c) / max(values.size, 1), 6) for c in counts))
    return TensorRef(name=name, kind=kind, edges=tuple(edges), fractions=tuple(fractions),
                     mean=float(np.mean(finite)) if finite.size else 0.0,
                     std=float(np.std(finite)) if finite.size else 0.0, samples=int(x.shape[0]))


def psi(expected, counts) -> float:
    """Population Stability Index of live `counts` against reference `expected` fractions."""
    e = np.maximum(np.asarray(expected, np.float64), EPS)
    c = np.asarray(counts, np.float64)
    a = np.maximum(c / max(c.sum(), 1.0), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(expected, counts) -> float:
    """The KS statistic on the reference's bins (the largest gap between the two binned CDFs)."""
    c = np.asarray(counts, np.float64)
    return float(np.max(np.abs(np.cumsum(expected) - np.cumsum(c / max(c.sum(), 1.0)))))


class Monitor:
    """Live counts on the references' bins, one window at a time; thread-safe, bounded memory, and
    vectorized: one comparison against every channel's edges at once (edges padded with +inf)."""

    def __init__(self, refs: list[TensorRef]):
        self.refs = {r.name: r for r in refs}
        width = {r.name: max((len(e) for e in r.edges), default=0) for r in refs}
        self._edges = {r.name: np.array([list(e) + [np.inf] * (width[r.name] - len(e)) for e in r.edges],
                                        np.float64).reshape(len(r.edges), width[r.name]) for r in refs}
        self._lock = threading.Lock()
        self._counts = self._empty()

    def _empty(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((e.shape[0], e.shape[1] + 1), np.int64) for n, e in self._edges.items()}

    def observe(self, name: str, x) -> None:
        """One request's tensor (samples on axis 0): at most SAMPLE values per channel, strided."""
        ref = self.refs.get(name)
        if ref is None:
            return
        x = np.asarray(x)
        v = channels(x.reshape(1) if x.ndim == 0 else x, ref.kind, limit=SAMPLE)
        edges = self._edges[name]
        if v.shape[0] != edges.shape[0]:
            return  # another layout than the reference's: nothing comparable
        ok = np.isfinite(v)
        v = np.where(ok, v, 0.0)
        if v.shape[1] > 64:  # few channels, many values: a binary search per channel
            bins = np.stack([np.searchsorted(e, row, side="right") for e, row in zip(edges, v)])
        else:  # many features, a value or a few each: one comparison against every edge at once
            bins = (edges[:, None, :] <= v[..., None]).sum(-1)
        width = edges.shape[1] + 1
        flat = (np.arange(edges.shape[0])[:, None] * width + bins)[ok]
        add = np.bincount(flat, minlength=edges.shape[0] * width).reshape(edges.shape[0], width)
        with self._lock:
            self._counts[name] += add

    def window(self, *, reset: bool = True) -> dict:
        """Per tensor: PSI (mean over features/channels, and the worst), binned KS (the worst) and how many
        values were counted."""
        with self._lock:
            counts = self._counts
            if reset:
                self._counts = self._empty()
        out = {}
        for name, c in counts.items():
            n, ref = int(c.sum()), self.refs[name]
            if n == 0:
                out[name] = {"psi": None, "psi_max": None, "ks": None, "values": 0}
                continue
            rows = [(f, row[:len(f)]) for f, row in zip(ref.fractions, c) if row.sum()]
            ps = [psi(f, row) for f, row in rows]
            out[name] = {"psi": round(float(np.mean(ps)), 4), "psi_max": round(max(ps), 4),
                         "ks": round(max(ks(f, row) for f, row in rows), 4), "values": n}
        return out


__all__ = ["BINS", "Monitor", "PSI_SHIFTED", "TensorRef", "channels", "kind_of", "ks", "psi", "reference"]
