"""Smoothing for dynamic-range int8 (SmoothQuant's migration, Xiao et al. 2022, on TFLite's hybrid ops).

A hybrid FULLY_CONNECTED quantizes its float input per row on the fly: one scale for a whole token's
features. A transformer's LayerNorm outputs carry a few outlier channels (tens of times the rest),
so that scale leaves the other channels a handful of levels. The product x.W^T does not change when
input channel j is divided by s_j and the weights' column j multiplied by it; choosing
s_j = max|x_j|^a / max|W_j|^(1-a) (a = 0.5) moves the outliers' range into the weights, which are
quantized per output channel once, offline. The division is one MUL before the FULLY_CONNECTED
(elementwise, ~1/768 of its work), shared by every projection that reads the same input.

The activation ranges come from the fp32 model on calibration samples (`ranges`); the weights from
the fp32 model by tensor name, re-quantized here as the converter does (symmetric int8 per output
channel). all-mpnet-base-v2 on arm-cpu: see docs/benchmarks.md (text_models)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from packager.tflite_fb import read_model, schema as fb_schema, write_model

ALPHA = 0.5  # all-mpnet-base-v2: 0.75 lost more neighbours than 0.5 (dynamic and every mixed round failed)
SUFFIX = "/smoothed"  # the divided input's name: the input's, with this


def smooth(dynamic: bytes, weights: dict[bytes, np.ndarray], ranges: Callable[[set[str]], dict[str, np.ndarray]],
           *, alpha: float = ALPHA) -> tuple[bytes, list[str]]:
    """(`dynamic` with its hybrid ops smoothed, the names of the weights it re-quantized). `weights`:
    fp32 constants by tensor name; `ranges(names)`: each named tensor's max |value| per channel (last
    axis) in the fp32 model."""
    from packager.formats.tflite_values import hybrid_ops

    model = read_model(dynamic)
    graph = model.subgraphs[0]
    groups: dict[int, list] = {}
    for op in hybrid_ops(model):
        w = weights.get(graph.tensors[op.inputs[1]].name)
        if w is not None and w.size == int(np.prod(graph.tensors[op.inputs[1]].shape)):
            groups.setdefault(int(op.inputs[0]), []).append(op)
    if not groups:
        return dynamic, []
    maxima = ranges({graph.tensors[i].name.decode() for i in groups})
    done = []
    for x, ops in groups.items():
        act = maxima.get(graph.tensors[x].name.decode())
        mats = [weights[graph.tensors[op.inputs[1]].name].reshape(graph.tensors[op.inputs[1]].shape) for op in ops]
        if act is None or any(m.ndim != 2 or m.shape[1] != act.size for m in mats):
            continue
        w_max = np.max([np.abs(m).max(axis=0) for m in mats], axis=0)
        s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        s = np.clip(s, 1e-3, 1e3).astype(np.float32)
        scaled = _divided(model, x, s)
        for op, m in zip(ops, mats):
            _requantize(model, graph.tensors[op.inputs[1]], m * s[None, :])
            op.inputs = np.array([scaled, *list(op.inputs)[1:]], np.int32)  # (read-only as read)
            done.append(graph.tensors[op.inputs[1]].name.decode())
    return (write_model(model) if done else dynamic), done


def _divided(model, x: int, s: np.ndarray) -> int:
    """A MUL by 1/s after tensor `x`, placed right after x's producer (or first, for a graph input);
    returns its output tensor's index."""
    from packager.formats.tflite_values import empty_buffer, opcode_index

    schema = fb_schema()
    graph = model.subgraphs[0]
    inv = schema.TensorT()
    inv.shape, inv.type, inv.name = [s.size], schema.TensorType.FLOAT32, graph.tensors[x].name + b"/smooth_scale"
    buf = schema.BufferT()
    buf.data = np.frombuffer((1.0 / s).astype(np.float32).tobytes(), np.uint8)
    model.buffers.append(buf)
    inv.buffer = len(model.buffers) - 1
    out = schema.TensorT()
    src = graph.tensors[x]
    out.shape, out.type, out.name = list(src.shape), schema.TensorType.FLOAT32, src.name + SUFFIX.encode()
    out.shapeSignature = src.shapeSignature
    out.buffer = empty_buffer(model)
    graph.tensors += [inv, out]
    mul = schema.OperatorT()
    mul.opcodeIndex = opcode_index(model, schema.BuiltinOperator.MUL, version=1)
    mul.inputs = np.array([x, len(graph.tensors) - 2], np.int32)
    mul.outputs = np.array([len(graph.tensors) - 1], np.int32)
    mul.builtinOptionsType = schema.BuiltinOptions.MulOptions
    mul.builtinOptions = schema.MulOptionsT()
    at = next((i + 1 for i, op in enumerate(graph.operators) if x in list(op.outputs)), 0)
    graph.operators.insert(at, mul)
    return len(graph.tensors) - 1


def _requantize(model, t, w: np.ndarray) -> None:
    """Symmetric int8 per output channel (axis 0), as TFLite's dynamic-range converter quantizes."""
    schema = fb_schema()
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    model.buffers[t.buffer].data = np.frombuffer(q.tobytes(), np.uint8)
    qp = schema.QuantizationParametersT()
    qp.scale, qp.zeroPoint, qp.quantizedDimension = scale.astype(np.float32), np.zeros(scale.size, np.int64), 0
    t.quantization = qp
