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


@dataclass(frozen=True)
class Blame:
    nodes: tuple[str, ...]  # nodes to keep in float for this finding
    what: str  # "tensor" or "node"
    name: str
    op: str
    error: float

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


def nrmse(ref: np.ndarray, got: np.ndarray, axis: int) -> float:
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape or ref.size == 0:
        return float("nan")
    if ref.ndim >= 2:
        ax = axis if axis >= 0 else ref.ndim + axis
        ref, got = np.moveaxis(ref, ax, -1), np.moveaxis(got, ax, -1)
    ref, got = ref.reshape(-1, ref.shape[-1] if ref.ndim else 1), got.reshape(-1, got.shape[-1] if got.ndim else 1)
    finite = np.isfinite(got)
    if not finite.all():
        return float("inf")
    err = np.sqrt(np.mean((got - ref) ** 2, axis=0))
    # Each channel against its own spread; a (nearly) constant channel against its own magnitude,
    # and an all-zero one against a whisker of the tensor's scale (so it never divides by zero).
    scale = np.maximum(np.std(ref, axis=0), 1e-2 * np.mean(np.abs(ref), axis=0))
    floor = 1e-6 * (float(np.std(ref)) + float(np.mean(np.abs(ref)))) + 1e-12
    # Capped at 1: a channel whose error reaches its own spread has lost its information, and a
    # nearly dead channel must not outweigh the rest. The mean reads as "share of channels lost".
    return float(np.mean(np.minimum(err / np.maximum(scale, floor), 1.0)))


def blame(view: GraphView, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[Blame]:
    """Every finding, worst first (see `significant`). `ref`/`got`: tensors by name, samples
    stacked on axis 0."""

    def resolve(name: str) -> str | None:
        seen = 0
        while name not in ref and name in view.alias and seen < 16:
            name, seen = view.alias[name], seen + 1
        return name if name in ref else None

    def err(name: str) -> float:
        r = resolve(name)
        if r is None or name not in got:
            return float("nan")
        return nrmse(ref[r], got[name], view.channel_axis)

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
        e = nrmse(ref[r], low.fake(ref[r]), view.channel_axis)
        if e > 0:
            nodes = tuple(dict.fromkeys(producers.get(r, []) + consumers.get(r, [])))
            if nodes:
                found.append(Blame(nodes, "tensor", r, kinds.get(nodes[0], "?"), e))
    for op in view.ops:
        outs = [e for e in (err(t) for t in op.outputs) if e == e]
        ins = [e for e in (err(t) for t in op.inputs) if e == e]
        if not outs:
            continue
        added = max(outs) - (max(ins) if ins else 0.0)
        if added > 0:
            found.append(Blame((op.name,), "node", op.name, op.kind, added))
    found.sort(key=lambda b: -b.error)
    unique = {}
    for b in found:  # a tensor can be reached twice (a graph input and its quantized copy)
        unique.setdefault((b.what, b.name), b)
    return list(unique.values())


def significant(b: Blame) -> bool:
    return b.error > (TENSOR_LIMIT if b.what == "tensor" else NODE_LIMIT)


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
