"""Which nodes lose the accuracy: the float model's intermediate tensors against the
candidate's, on a few validation samples.

Two kinds of loss are blamed, each measured as a per-channel normalised RMS error (RMS error
of a channel over the channel's spread in the float model, capped at 1 and averaged over
channels, so a small-range feature next to a large one counts as much as the large one):
- a tensor the candidate stores in low precision that cannot hold its values: the float
  values put through the same storage (the candidate's own int8 scale and zero point, or
  fp16) lose too much. Keeping it in float means keeping its producer and consumers in float.
- a node that computes badly in low precision: its output is much further from the float
  model than its inputs are (e.g. a BatchNormalization with tiny variances in fp16).

Each format gives a GraphView of its candidate (ops, aliases of float tensors, low-precision
tensors); this module ranks and picks the nodes to keep in float."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

TENSOR_LIMIT = 0.1  # a stored tensor losing more than this (normalised RMS) is blamed
NODE_LIMIT = 0.1  # a node adding more than this is blamed


@dataclass(frozen=True)
class Op:
    name: str  # the name the format's quantizer takes to keep it in float
    kind: str
    inputs: tuple[str, ...]  # candidate tensor names
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Lowered:
    """A tensor the candidate stores in lower precision, and what storing does to floats."""

    name: str  # candidate tensor name
    fake: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GraphView:
    ops: tuple[Op, ...]
    alias: dict  # candidate tensor name -> float model tensor name holding the same value
    lowered: tuple[Lowered, ...]
    channel_axis: int  # -1 for NHWC (TFLite), 1 for NCHW (ONNX)
    # What a node must add to be blamed for certain. A view of only the ops that can be kept in float
    # (dynamic range: its hybrid ops) ranks them all: 0.
    node_limit: float = NODE_LIMIT


@dataclass(frozen=True)
class Blame:
    nodes: tuple[str, ...]  # nodes to keep in float for this finding
    what: str  # "tensor" or "node"
    name: str
    op: str
    error: float
    limit: float = NODE_LIMIT  # above it the finding is significant

    def text(self) -> str:
        if self.what == "tensor":
            return f"tensor {self.name} (loses {self.error:.2f} when stored in low precision)"
        return f"{self.op} {self.name} (adds {self.error:.2f} error)"

    def to_dict(self) -> dict:
        return {"what": self.what, "name": self.name, "op": self.op, "error": round(self.error, 4),
                "keep_float": list(self.nodes)}


def fake_quant(scale: float, zp: int, dtype: np.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """What storing floats as `dtype` with this scale and zero point does to them."""
    lim = np.iinfo(dtype)
    return lambda x: (np.clip(np.round(np.asarray(x) / scale) + zp, lim.min, lim.max) - zp) * scale


class _Ref:
    """A reference tensor laid out as (values, channels) in float64, with each channel's scale:
    computed once per tensor, since every tensor is compared as some op's input and output."""

    __slots__ = ("shape", "axis", "flat", "scale")

    def __init__(self, ref: np.ndarray, axis: int):
        ref = np.asarray(ref)
        self.shape, self.axis = ref.shape, axis
        self.flat = _channels_last(ref, axis)
        # Each channel against its own spread; a (nearly) constant channel against its own magnitude,
        # and an all-zero one against a whisker of the tensor's scale (so it never divides by zero).
        scale = np.maximum(np.std(self.flat, axis=0), 1e-2 * np.mean(np.abs(self.flat), axis=0))
        floor = 1e-6 * (float(np.std(self.flat)) + float(np.mean(np.abs(self.flat)))) + 1e-12
        self.scale = np.maximum(scale, floor)

    def nrmse(self, got: np.ndarray) -> float:
        got = np.asarray(got)
        if got.shape != self.shape or got.size == 0:
            return float("nan")
        return self.nrmse_flat(_channels_last(got, self.axis))

    def nrmse_flat(self, got: np.ndarray) -> float:
        """`got` already laid out (and sampled) like `flat`."""
        if not np.isfinite(got).all():
            return float("inf")
        err = np.sqrt(np.mean(np.square(got - self.flat), axis=0))
        # Capped at 1: a channel whose error reaches its own spread has lost its information, and a
        # nearly dead channel must not outweigh the rest. The mean reads as "share of channels lost".
        return float(np.mean(np.minimum(err / self.scale, 1.0)))


# Rows (positions) compared per tensor: an image model's feature maps hold millions of values, and
# a regular sample of a few thousand positions per channel estimates the error just as well at a
# small fraction of the cost (the analysis ran ~30 s on a text detector before).
MAX_ROWS = 8192


def _channels_last(x: np.ndarray, axis: int) -> np.ndarray:
    """(positions, channels) in float64, at most MAX_ROWS positions: the same seeded draw for the
    reference and the candidate (a regular stride could alias with an image's width)."""
    if x.ndim >= 2:
        x = np.moveaxis(x, axis if axis >= 0 else x.ndim + axis, -1)
    x = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    if x.shape[0] > MAX_ROWS:
        x = x[np.sort(np.random.default_rng(0).integers(0, x.shape[0], MAX_ROWS))]
    return np.asarray(x, np.float64)


def nrmse(ref: np.ndarray, got: np.ndarray, axis: int) -> float:
    """Per-channel normalised RMS error of `got` against `ref`, each channel capped at 1, averaged."""
    if np.shape(ref) != np.shape(got) or np.size(ref) == 0:
        return float("nan")
    return _Ref(ref, axis).nrmse(got)


def blame(view: GraphView, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[Blame]:
    """Every finding, worst first (see `significant`). `ref`/`got`: tensors by name, samples
    stacked on axis 0."""

    def resolve(name: str) -> str | None:
        seen = 0
        while name not in ref and name in view.alias and seen < 16:
            name, seen = view.alias[name], seen + 1
        return name if name in ref else None

    refs: dict[str, _Ref] = {}
    errs: dict[str, float] = {}

    def reference(r: str) -> _Ref:
        if r not in refs:
            refs[r] = _Ref(ref[r], view.channel_axis)
        return refs[r]

    def err(name: str) -> float:
        if name not in errs:
            r = resolve(name)
            ok = r is not None and name in got and np.size(ref[r]) and np.shape(ref[r]) == np.shape(got[name])
            errs[name] = reference(r).nrmse(got[name]) if ok else float("nan")
        return errs[name]

    producers, consumers = {}, {}
    for op in view.ops:
        for t in op.outputs:
            if resolve(t):
                producers.setdefault(resolve(t), []).append(op.name)
        for t in op.inputs:
            if resolve(t):
                consumers.setdefault(resolve(t), []).append(op.name)
    found: list[Blame] = []
    kinds = {op.name: op.kind for op in view.ops}
    for low in view.lowered:
        r = resolve(low.name)
        if r is None:
            continue
        e = reference(r).nrmse_flat(np.asarray(low.fake(reference(r).flat), np.float64)) if np.size(ref[r]) else float("nan")
        if e > 0:
            nodes = tuple(dict.fromkeys(producers.get(r, []) + consumers.get(r, [])))
            if nodes:
                found.append(Blame(nodes, "tensor", r, kinds.get(nodes[0], "?"), e, TENSOR_LIMIT))
    for op in view.ops:
        outs = [e for e in (err(t) for t in op.outputs) if e == e]
        ins = [e for e in (err(t) for t in op.inputs) if e == e]
        if not outs:
            continue
        added = max(outs) - (max(ins) if ins else 0.0)
        if added > 0:
            found.append(Blame((op.name,), "node", op.name, op.kind, added, view.node_limit))
    found.sort(key=lambda b: -b.error)
    unique = {}
    for b in found:  # a tensor can be reached twice (a graph input and its quantized copy)
        unique.setdefault((b.what, b.name), b)
    return list(unique.values())


def significant(b: Blame) -> bool:
    return b.error > b.limit


def pick(found: list[Blame], already: tuple[str, ...], *, limit: int) -> tuple[str, ...]:
    """`already` plus the nodes of the significant findings not yet covered, worst first and
    at most about `limit` new ones; the single worst finding when none is significant."""
    keep = list(already)
    for b in found:
        new = [n for n in b.nodes if n not in keep]
        if not new:
            continue
        if len(keep) > len(already) and (not significant(b) or len(keep) - len(already) + len(new) > limit):
            break
        keep += new
    return tuple(keep)
