"""Embedding tables quantized per row in a dynamic-range model.

TFLite's dynamic-range converter stores a GATHER's constant table as int8 with one scale for the whole
table, and DEQUANTIZEs the gathered rows. A transformer's token embeddings have rows of very different
sizes, so one scale is coarse: all-mpnet-base-v2's 30527 x 768 table gets a step of 0.0217 (its
largest value is 2.76) where most values are a few hundredths. Here each row gets its own scale: the
table holds round(w / s_row) with a unit scale, and the gathered rows are multiplied by their scales
(one more GATHER, of a [rows, 1] float vector, and a MUL). Same bytes (plus 4 per row), same speed.
all-mpnet-base-v2 arm-cpu, 176 held-out sentences against torch, its 384 model: cosine 0.9983 mean /
0.9942 min -> 0.9993 / 0.9984, neighbours kept 93.8 -> 96.6 % (int16 tables, twice the bytes: 0.9994 /
0.9987); the built bundle 97.2 % (docs/benchmarks.md)."""
from __future__ import annotations

import numpy as np

from packager.tflite_fb import op_names, read_model, schema as fb_schema, write_model

SUFFIX = b"/row_scales"


def per_row(dynamic: bytes, weights: dict[bytes, np.ndarray]) -> tuple[bytes, list[str]]:
    """(`dynamic` with each int8 GATHER table that a DEQUANTIZE reads quantized per row, the tables'
    names). `weights`: the fp32 model's constants by tensor name (tflite_values.float_weights)."""
    schema = fb_schema()
    model = read_model(dynamic)
    graph = model.subgraphs[0]
    names = op_names()

    def kind(op) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")

    readers: dict[int, list] = {}
    for op in graph.operators:
        for i in op.inputs:
            readers.setdefault(int(i), []).append(op)
    holders: dict[int, int] = {}  # buffer -> tensors over it, in every subgraph (a length bucket's included)
    for g in model.subgraphs:
        for t in g.tensors:
            holders[t.buffer] = holders.get(t.buffer, 0) + 1
    done = []
    for op in list(graph.operators):
        if kind(op) != "GATHER" or len(op.inputs) != 2:
            continue
        table = graph.tensors[op.inputs[0]]
        q = table.quantization
        w = weights.get(table.name)
        users = readers.get(int(op.outputs[0]), [])
        axis = getattr(op.builtinOptions, "axis", 0)
        if (table.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) != 1
                or w is None or len(table.shape) != 2 or w.size != int(np.prod(table.shape)) or axis != 0
                or getattr(op.builtinOptions, "batchDims", 0) or len(users) != 1 or kind(users[0]) != "DEQUANTIZE"
                or len(readers[int(op.inputs[0])]) != 1 or holders[table.buffer] != 1):  # a table read elsewhere
            # (a tied output projection) keeps its one scale: the other reader knows no row scales
            continue
        _split(model, op, users[0], w.reshape(table.shape))
        done.append(table.name.decode())
    return (write_model(model) if done else dynamic), done


def _unit(t) -> None:
    qp = fb_schema().QuantizationParametersT()
    qp.scale, qp.zeroPoint = np.array([1.0], np.float32), np.array([0], np.int64)
    t.quantization = qp


def _split(model, gather, deq, w: np.ndarray) -> None:
    schema = fb_schema()
    graph = model.subgraphs[0]
    table = graph.tensors[gather.inputs[0]]
    scale = (np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0).astype(np.float32)
    model.buffers[table.buffer].data = np.frombuffer(
        np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8).tobytes(), np.uint8)
    _unit(table)
    _unit(graph.tensors[gather.outputs[0]])
    out_i = int(deq.outputs[0])  # the float rows: now the MUL's output, under the same name
    out = graph.tensors[out_i]

    def tensor(name: bytes, shape, data: np.ndarray | None = None, signature=None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name, list(shape), schema.TensorType.FLOAT32
        if signature is not None:
            t.shapeSignature = list(signature)
        if data is None:
            from packager.formats.tflite_values import empty_buffer

            t.buffer = empty_buffer(model)
        else:
            buf = schema.BufferT()
            buf.data = np.frombuffer(data.tobytes(), np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    from packager.formats.tflite_values import opcode_index

    scales = tensor(table.name + SUFFIX, (scale.size, 1), scale)
    sig = None if out.shapeSignature is None else list(out.shapeSignature)
    picked = tensor(out.name + SUFFIX, list(out.shape[:-1]) + [1], signature=sig and sig[:-1] + [1])
    raw = tensor(out.name + b"/unscaled", out.shape, signature=sig)
    deq.outputs = np.array([raw], np.int32)
    pick = schema.OperatorT()
    pick.opcodeIndex, pick.inputs, pick.outputs = gather.opcodeIndex, np.array([scales, gather.inputs[1]], np.int32), \
        np.array([picked], np.int32)
    pick.builtinOptionsType, pick.builtinOptions = gather.builtinOptionsType, gather.builtinOptions
    mul = schema.OperatorT()
    mul.opcodeIndex = opcode_index(model, schema.BuiltinOperator.MUL, version=1)
    mul.inputs, mul.outputs = np.array([raw, picked], np.int32), np.array([out_i], np.int32)
    mul.builtinOptionsType, mul.builtinOptions = schema.BuiltinOptions.MulOptions, schema.MulOptionsT()
    at = next(i for i, o in enumerate(graph.operators) if o is deq) + 1
    graph.operators[at:at] = [pick, mul]
