"""Dynamic-range int8 for transformers, with each attention's value projection back in float.

Dynamic range quantizes a FULLY_CONNECTED's input per row on the fly, and BERT's LayerNorm outputs
carry outlier channels that make that coarse. The query and key projections' error is damped by the
Softmax; the value projection's reaches the output as it is. Measured on all-MiniLM-L6-v2 (176
held-out sentences against torch, each of the 36 projections put back in float in turn): the value
projections are the most sensitive group (cosine 0.99878 -> 0.99922; queries and keys change nothing),
and with those 6 of 36 in float the nearest neighbour is kept for 97.2 % of texts instead of 94.9 %,
at 0.43-0.45x fp32 instead of 0.38-0.40x (weights dequantized from int8 instead: 96.0 %).

A value projection is found by shape, not by name: the FULLY_CONNECTED that feeds (through reshapes
and transposes) the second operand of a BATCH_MATMUL whose first operand comes from a SOFTMAX. Its
weights come back from the fp32 model, matched by tensor name. A graph without that pattern is
left as the converter wrote it.

Other models lose elsewhere (all-mpnet-base-v2 keeps 92 % of neighbours with the value projections
in float): a candidate may name more weights to put back (`keep`, weight tensor names, which stay the
same across length buckets), chosen by the sensitivity analysis over the hybrid ops (`hybrid_ops`)."""
from __future__ import annotations

import numpy as np

from packager.tflite_fb import op_names, read_model, schema as fb_schema, write_model

_THROUGH = frozenset({"RESHAPE", "TRANSPOSE"})


def float_values(dynamic: bytes, weights: dict[bytes, np.ndarray],
                 keep: tuple[str, ...] = ()) -> tuple[bytes, list[str]]:
    """(the dynamic-range model with its attention value projections' weights, and those of the hybrid
    ops whose weight tensors `keep` names, in float (stored as fp16); the names of the weights put back).
    `weights`: the fp32 model's constants by tensor name (float_weights)."""
    schema = fb_schema()
    model = read_model(dynamic)
    graph = model.subgraphs[0]
    names = []
    wanted = set(keep)
    ops = value_projections(model) + [op for op in hybrid_ops(model)
                                      if graph.tensors[op.inputs[1]].name.decode() in wanted]
    for op in dict.fromkeys(ops):
        t = graph.tensors[op.inputs[1]]
        w = weights.get(t.name)
        if t.type != schema.TensorType.INT8 or w is None or w.size != int(np.prod(t.shape)):
            continue
        _half(model, op, w)
        names.append(t.name.decode())
    return (write_model(model) if names else dynamic), names


def _half(model, op, w: np.ndarray) -> None:
    """`op`'s weight tensor becomes the float32 output of a DEQUANTIZE from an fp16 constant: how
    TFLite's fp16 models store weights (XNNPACK and the reference kernels unpack them once, at
    load), half the bytes of fp32 and the same float FULLY_CONNECTED. all-mpnet-base-v2 on arm-cpu:
    18 of 72 projections kept in float cost 92 MB in fp32, 46 in fp16 (the bundle 0.41x -> 0.31x)."""
    schema = fb_schema()
    graph = model.subgraphs[0]
    t = graph.tensors[op.inputs[1]]
    half = schema.TensorT()
    half.shape, half.type, half.name = list(t.shape), schema.TensorType.FLOAT16, t.name + b"/fp16"
    half.buffer = t.buffer  # its buffer now holds the fp16 values; the float32 tensor has none
    model.buffers[t.buffer].data = np.frombuffer(w.astype(np.float16).tobytes(), np.uint8)
    t.type, t.quantization, t.buffer = schema.TensorType.FLOAT32, None, empty_buffer(model)
    graph.tensors.append(half)
    deq = schema.OperatorT()
    deq.opcodeIndex = opcode_index(model, schema.BuiltinOperator.DEQUANTIZE, version=3)  # version 3: fp16 input
    deq.inputs, deq.outputs = np.array([len(graph.tensors) - 1], np.int32), np.array([op.inputs[1]], np.int32)
    graph.operators.insert(next(i for i, o in enumerate(graph.operators) if o is op), deq)


def empty_buffer(model) -> int:
    """Index of a buffer without data (TFLite's convention: buffer 0), added when there is none."""
    schema = fb_schema()
    if model.buffers and (model.buffers[0].data is None or len(model.buffers[0].data) == 0):
        return 0
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


def opcode_index(model, builtin: int, *, version: int) -> int:
    """Index of the builtin's operator code (raised to `version`), added when the model has none."""
    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == builtin:
            oc.version = max(oc.version, version)
            return i
    oc = fb_schema().OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def hybrid_ops(model) -> list:
    """The FULLY_CONNECTED ops of the main subgraph with int8 weights (dynamic range: float in and out)."""
    graph, names, schema = model.subgraphs[0], op_names(), fb_schema()
    out = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) != "FULLY_CONNECTED" or len(op.inputs) < 2:
            continue
        w = graph.tensors[op.inputs[1]]
        if w.type == schema.TensorType.INT8 and graph.tensors[op.inputs[0]].type == schema.TensorType.FLOAT32:
            out.append(op)
    return out


def value_projections(model) -> list:
    """The FULLY_CONNECTED ops of the main subgraph that compute an attention's values."""
    graph, names = model.subgraphs[0], op_names()

    def kind(op) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")

    producer = {t: op for op in graph.operators for t in op.outputs}

    def source(tensor: int):
        op = producer.get(tensor)
        while op is not None and kind(op) in _THROUGH:
            op = producer.get(op.inputs[0])
        return op

    out = []
    for op in graph.operators:
        if kind(op) != "BATCH_MATMUL" or len(op.inputs) < 2:
            continue
        probs, values = source(op.inputs[0]), source(op.inputs[1])
        if probs is not None and kind(probs) == "SOFTMAX" and values is not None and kind(values) == "FULLY_CONNECTED":
            out.append(values)
    return out


def covered(model, weights: dict[bytes, np.ndarray]) -> bool:
    """Whether `weights` holds, at their sizes, every int8 constant of `model`'s main subgraph: what the
    dynamic recipe may put back in float or re-quantize (projection weights, embedding tables)."""
    schema = fb_schema()
    for t in model.subgraphs[0].tensors:
        data = model.buffers[t.buffer].data
        if t.type == schema.TensorType.INT8 and data is not None and len(data):
            w = weights.get(t.name)
            if w is None or w.size != int(np.prod(t.shape)):
                return False
    return True


def float_weights(model) -> dict[bytes, np.ndarray]:
    """float32 constants of the main subgraph, by tensor name."""
    schema = fb_schema()
    out = {}
    for t in model.subgraphs[0].tensors:
        data = model.buffers[t.buffer].data
        if t.type == schema.TensorType.FLOAT32 and data is not None and len(data):
            out[t.name] = np.frombuffer(bytes(data), np.float32)
    return out
