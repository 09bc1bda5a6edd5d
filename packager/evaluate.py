"""Numbers against the float reference, and the accuracy gate built on them.

Every output is judged by what it holds:
- class scores (one vector of >1 softmax probabilities per sample, or the primary output when
  labels are given): top-1 agreement with the reference, and accuracy against the labels;
- integer outputs (ids, argmax): exact agreement;
- embeddings (one unit-length vector per sample, what retrieval and similarity search compare):
  cosine and relative error as below, plus a ranking check: each sample's nearest other sample
  (by cosine) is the same in the bundle's space as in the reference's;
- anything else (maps, boxes, embeddings, probabilities, states): cosine similarity and the
  relative L2 error ||bundle - ref|| / ||ref||.

The gate: with labels, the accuracy drop is at most `max_drop` points; class scores agree on
top-1 for at least (100 - max_drop) % of samples; other outputs reach `min_similarity` and a
relative error of at most sqrt(2 (1 - min_similarity)), which is what that cosine allows when
the norms match (0.141 at 0.99), so a model that is right in direction but wrong in scale fails;
embeddings keep the nearest neighbour for at least `min_neighbours` of the samples. A cosine of
0.99 still reorders near ties (texts whose two closest neighbours differ by < 0.01), which is what
a search over these embeddings would return wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from packager.figures import Accuracy, DropMetric, OutputAccuracy

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class Gate:
    enabled: bool = True
    max_drop: float = 1.0  # points of accuracy, or of top-1 agreement without labels
    min_similarity: float = 0.99
    min_neighbours: float = 0.95  # embeddings: share of samples whose nearest neighbour is kept

    @property
    def max_relative_error(self) -> float:
        return math.sqrt(2 * (1 - self.min_similarity))

    def to_dict(self) -> dict:
        return {"enabled": self.enabled, "max_drop_points": self.max_drop, "min_similarity": self.min_similarity,
                "min_neighbours": self.min_neighbours,
                "max_relative_error": round(self.max_relative_error, 4)}


def _stack(rows: list[Feeds], name: str) -> np.ndarray:
    return np.stack([np.asarray(r[name], np.float64).reshape(-1) for r in rows])


def output_kind(rows: list[Feeds], name: str, *, labelled: bool = False) -> str:
    """'class_scores' for one vector per sample of softmax probabilities (or of scores the labels
    refer to); 'embeddings' for one unit-length vector per sample (an L2-normalised sentence or face
    embedding); a vector of landmarks or logits without labels is judged as 'values'."""
    x = np.asarray(rows[0][name])
    if x.dtype.kind in "iub":
        return "integers"
    if x.size > 1 and x.size == x.shape[-1]:
        if labelled:
            return "class_scores"
        r = _stack(rows, name)
        if np.all(r >= -1e-6) and np.allclose(r.sum(axis=1), 1.0, atol=1e-2):
            return "class_scores"
        if x.size >= MIN_EMBEDDING and len(rows) >= 3 and np.allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-3):
            return "embeddings"
    return "values"


MIN_EMBEDDING = 8  # values per sample; shorter unit vectors are directions, not embeddings


def neighbour_agreement(r: np.ndarray, g: np.ndarray) -> float:
    """Share of samples whose nearest other sample (by cosine) is the same in `g` as in `r`."""
    def nearest(e: np.ndarray) -> np.ndarray:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(axis=1)

    return float(np.mean(nearest(r) == nearest(g)))


def _cosines(r: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per sample when a sample holds several values, else one cosine over all samples."""
    if r.shape[1] == 1:
        r, g = r.T, g.T
    nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    both_zero = (nr == 0) & (ng == 0)
    return np.where(both_zero, 1.0, np.sum(r * g, axis=1) / np.maximum(nr * ng, 1e-30))


def accuracy(ref: list[Feeds], got: list[Feeds], outputs: list[str], labels: np.ndarray | None = None) -> Accuracy:
    """Bundle outputs against the reference on the same inputs (see module doc)."""
    per_output = {}
    for name in outputs:
        r, g = _stack(ref, name), _stack(got, name)
        finite = np.isfinite(g)
        clean = np.where(finite, g, 0.0)
        diff = clean - r
        kind = output_kind(ref, name, labelled=labels is not None and name == outputs[0])
        top1 = agreement = kept = None
        if kind == "class_scores":
            top1 = float(np.mean(r.argmax(1) == g.argmax(1)))
        elif kind == "integers":
            agreement = float(np.mean(np.all(r == g, axis=1)))
        elif kind == "embeddings":
            kept = neighbour_agreement(r, clean)
        norm = float(np.linalg.norm(r))
        per_output[name] = OutputAccuracy(
            kind=kind, nan_or_inf=int(np.sum(~finite)), max_abs_error=float(np.max(np.abs(diff))),
            mean_abs_error=float(np.mean(np.abs(diff))), top1_agreement=top1, agreement=agreement,
            neighbour_agreement=kept, cosine_similarity=float(np.mean(_cosines(r, clean))),
            relative_error=float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff) > 0))
    primary = outputs[0]
    p = per_output[primary]
    res = Accuracy(samples=len(ref), primary_output=primary, outputs=per_output, top1_agreement=p.top1_agreement,
                   cosine_similarity=p.cosine_similarity)
    if p.kind == "class_scores":
        if labels is not None:
            y = np.asarray(labels)
            y = (y.argmax(-1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1))[: len(ref)].astype(np.int64)
            ra, ga = _stack(ref, primary).argmax(1), _stack(got, primary).argmax(1)
            on_ref, on_bundle = float(np.mean(ra == y)), float(np.mean(ga == y))
            return replace(res, accuracy_reference=on_ref, accuracy_bundle=on_bundle,
                           accuracy_drop_points=round(100 * (on_ref - on_bundle), 4), drop_metric=DropMetric.ACCURACY)
        return replace(res, accuracy_drop_points=round(100 * (1 - p.top1_agreement), 4), drop_metric=DropMetric.TOP1)
    return res


def compare(ref: list[Feeds], got: list[Feeds], outputs: list[str], labels: np.ndarray | None = None) -> dict:
    """`accuracy` as the report's JSON holds it."""
    return accuracy(ref, got, outputs, labels).to_dict()


def no_worse(acc: Accuracy, than: Accuracy, samples: int) -> bool:
    """Is `acc` as close to the reference as `than`, on the same `samples`? Within one sample's worth
    of agreement (top-1, exact, nearest neighbour) and 1e-4 of cosine: a length bucket against the
    chosen model, which computes the same thing padded further."""
    one = 1 / max(samples, 1)
    for name, m in acc.outputs.items():
        o = than.outputs.get(name)
        if o is None or m.nan_or_inf > o.nan_or_inf:
            return False
        pairs = ((m.top1_agreement, o.top1_agreement, one), (m.agreement, o.agreement, one),
                 (m.neighbour_agreement, o.neighbour_agreement, one), (m.cosine_similarity, o.cosine_similarity, 1e-4))
        if any(a is not None and b is not None and a < b - tol for a, b, tol in pairs):
            return False
    drop, base = acc.accuracy_drop_points, than.accuracy_drop_points
    return drop is None or base is None or drop <= base + 100 * one


def judge(metrics: Accuracy | Mapping, gate: Gate) -> list[str]:
    """Why the bundle fails the gate (empty: it passes). NaN/Inf always fails. `metrics` may be a
    report's JSON (its accuracy section)."""
    acc = Accuracy.from_dict(metrics) if isinstance(metrics, Mapping) else metrics
    why = []
    for name, m in acc.outputs.items():
        if m.nan_or_inf:
            why.append(f"{name}: {m.nan_or_inf} NaN/Inf values")
    if not gate.enabled:
        return why
    for name, m in acc.outputs.items():
        if name == acc.primary_output and acc.accuracy_drop_points is not None:
            drop = acc.accuracy_drop_points
            if drop > gate.max_drop:
                what = (acc.drop_metric or DropMetric.TOP1).text
                why.append(f"{name}: {what} dropped {drop:.2f} points (max {gate.max_drop:g})")
        elif m.kind == "class_scores":
            if 100 * (1 - m.top1_agreement) > gate.max_drop:
                why.append(f"{name}: top-1 agreement {100 * m.top1_agreement:.1f} % "
                           f"(min {100 - gate.max_drop:g} %)")
        elif m.kind == "integers":
            if 100 * (1 - m.agreement) > gate.max_drop:
                why.append(f"{name}: {100 * m.agreement:.1f} % of samples match exactly "
                           f"(min {100 - gate.max_drop:g} %)")
        else:
            if m.cosine_similarity < gate.min_similarity:
                why.append(f"{name}: cosine similarity {m.cosine_similarity:.4f} (min {gate.min_similarity:g})")
            if m.relative_error > gate.max_relative_error:
                why.append(f"{name}: relative error {m.relative_error:.3f} (max {gate.max_relative_error:.3f})")
            kept = m.neighbour_agreement
            if kept is not None and kept < gate.min_neighbours:
                why.append(f"{name}: nearest neighbour kept for {100 * kept:.1f} % of {acc.samples} samples "
                           f"(min {100 * gate.min_neighbours:g} %)")
    return why


GOLDEN_REL_TOL = {"fp32": 1e-3, "fp16": 1e-2, "dynamic": 3e-2, "dynamic-block": 2e-2, "int8": 6e-2, "int16x8": 2e-2}


def golden_tolerance(precision: str, outputs: list[Feeds]) -> float:
    """Absolute tolerance for on-device golden checks: relative to the output range,
    looser for coarser precisions (other CPUs/kernels round differently)."""
    peak = max((float(np.max(np.abs(np.asarray(v, np.float64)))) for o in outputs for v in o.values()), default=1.0)
    return max(GOLDEN_REL_TOL.get(precision, 5e-2) * max(peak, 1e-6), 1e-5)
