"""Reading a .tflite flatbuffer with the generated schema (packager-only): ops and their
versions, inputs/outputs of models no runtime here can load, the precision of a ready model."""
from __future__ import annotations

from collections import Counter

from edgebundle.manifest import TensorSpec
from targets import Precision


def schema():
    """The generated TFLite schema module: LiteRT's (0.5 s to import) where it has one, else
    TensorFlow's (importing TensorFlow costs 5-10 s in every child that only reads a model)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        from tensorflow.lite.python import schema_py_generated
    return schema_py_generated


def op_names() -> dict[int, str]:
    return {v: k for k, v in vars(schema().BuiltinOperator).items() if not k.startswith("_")}


_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


def read_model(data: bytes):
    fb = schema()
    return fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(data, 0))


def write_model(model) -> bytes:
    """A model object (read_model's) as .tflite bytes: what TensorFlow's flatbuffer_utils does,
    without importing TensorFlow into the build's process (~1 GB of it, beside the converters)."""
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def ops_with_versions(data: bytes) -> list[tuple[str, int]]:
    """(op name, op version) of each operator of the main subgraph, in execution order."""
    model = read_model(data)
    names = op_names()
    codes = []
    for oc in model.operatorCodes:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        name = names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            name = (oc.customCode or b"").decode() if isinstance(oc.customCode, bytes) else str(oc.customCode)
        codes.append((name, oc.version))
    return [codes[op.opcodeIndex] for op in model.subgraphs[0].operators]


def describe_flatbuffer(data: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs straight from the flatbuffer (for models this host cannot run,
    e.g. Edge-TPU-compiled ones). Names come from the signature def when there is one."""
    from edgeruntime.base import TensorInfo

    model = read_model(data)
    sg = model.subgraphs[0]
    names_in, names_out = {}, {}
    for sd in model.signatureDefs or []:
        names_in.update({t.tensorIndex: t.name.decode() if isinstance(t.name, bytes) else t.name for t in sd.inputs})
        names_out.update({t.tensorIndex: t.name.decode() if isinstance(t.name, bytes) else t.name for t in sd.outputs})

    def info(idx: int, names: dict) -> TensorInfo:
        t = sg.tensors[idx]
        q = t.quantization
        scale = float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else None
        zp = int(q.zeroPoint[0]) if scale is not None else None
        name = names.get(idx) or (t.name.decode() if isinstance(t.name, bytes) else t.name)
        shape = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
        return TensorInfo(name=name, shape=tuple(int(x) for x in shape), dtype=_TYPES.get(t.type, "float32"),
                          scale=scale, zero_point=zp)

    ins = sorted((info(i, names_in) for i in sg.inputs), key=lambda t: t.name)
    outs = sorted((info(i, names_out) for i in sg.outputs), key=lambda t: t.name)
    return tuple(ins), tuple(outs)


def detect_precision(data: bytes) -> Precision:
    """Best guess of how a ready .tflite was quantized, from its tensor types."""
    model = read_model(data)
    sg = model.subgraphs[0]
    io = set(sg.inputs) | set(sg.outputs)
    const, act = Counter(), Counter()
    for i, t in enumerate(sg.tensors):
        buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
        has_data = buf is not None and buf.data is not None and len(buf.data) > 0
        if has_data:
            const[_TYPES.get(t.type, "?")] += 1
        elif i not in io:  # float I/O around an int8 core says nothing about the core
            act[_TYPES.get(t.type, "?")] += 1
    if act["int16"]:
        return Precision.INT16X8
    if (act["int8"] or act["uint8"]) and not act["float32"]:
        return Precision.INT8
    if const["float16"]:
        return Precision.FP16
    if const["int8"]:
        return Precision.DYNAMIC
    return Precision.FP32

