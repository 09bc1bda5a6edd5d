"""Numbers against the float reference: agreement, error, cosine similarity, accuracy."""
from __future__ import annotations

import numpy as np

Feeds = dict[str, np.ndarray]


def _stack(rows: list[Feeds], name: str) -> np.ndarray:
    return np.stack([np.asarray(r[name], np.float64).reshape(-1) for r in rows])


def is_class_scores(rows: list[Feeds], name: str) -> bool:
    """One vector of >1 scores per sample (shape (C,) or (1, C))."""
    x = np.asarray(rows[0][name])
    return x.size > 1 and x.size == x.shape[-1]


def compare(ref: list[Feeds], got: list[Feeds], outputs: list[str], labels: np.ndarray | None = None) -> dict:
    """Compare bundle outputs with the reference on the same inputs.

    The first output is the primary one: top-1 agreement and accuracy use it when
    it holds class scores. `accuracy_drop_points` is the accuracy drop in points when
    labels exist, else 100 * (1 - top-1 agreement)."""
    per_output = {}
    for name in outputs:
        r, g = _stack(ref, name), _stack(got, name)
        nr, ng = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
        dot = np.sum(r * g, axis=1)
        both_zero = (nr == 0) & (ng == 0)
        cos = np.where(both_zero, 1.0, dot / np.maximum(nr * ng, 1e-30))
        per_output[name] = {"max_abs_error": float(np.max(np.abs(r - g))),
                            "mean_abs_error": float(np.mean(np.abs(r - g))),
                            "mean_cosine_similarity": float(np.mean(cos)),
                            "nan_or_inf": int(np.sum(~np.isfinite(g)))}
    res = {"samples": len(ref), "primary_output": outputs[0], "outputs": per_output,
           "top1_agreement": None, "accuracy_reference": None, "accuracy_bundle": None,
           "accuracy_drop_points": None, "drop_metric": None}
    primary = outputs[0]
    if ref and is_class_scores(ref, primary):
        r, g = _stack(ref, primary).argmax(1), _stack(got, primary).argmax(1)
        res["top1_agreement"] = float(np.mean(r == g))
        if labels is not None:
            y = np.asarray(labels)
            y = (y.argmax(-1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(-1))[: len(r)].astype(np.int64)  # one-hot ok
            res["accuracy_reference"] = float(np.mean(r == y))
            res["accuracy_bundle"] = float(np.mean(g == y))
            res["accuracy_drop_points"] = round(100 * (res["accuracy_reference"] - res["accuracy_bundle"]), 4)
            res["drop_metric"] = "accuracy"
        else:
            res["accuracy_drop_points"] = round(100 * (1 - res["top1_agreement"]), 4)
            res["drop_metric"] = "top1_agreement"
    return res


GOLDEN_REL_TOL = {"fp32": 1e-3, "fp16": 1e-2, "dynamic": 3e-2, "int8": 6e-2, "int16x8": 2e-2}


def golden_tolerance(precision: str, outputs: list[Feeds]) -> float:
    """Absolute tolerance for on-device golden checks: relative to the output range,
    looser for coarser precisions (other CPUs/kernels round differently)."""
    peak = max((float(np.max(np.abs(np.asarray(v, np.float64)))) for o in outputs for v in o.values()), default=1.0)
    return max(GOLDEN_REL_TOL.get(precision, 5e-2) * max(peak, 1e-6), 1e-5)
