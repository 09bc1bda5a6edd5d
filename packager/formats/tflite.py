"""TFLite output: TFLiteConverter from a (static-shape) SavedModel, one function per
quantization mode, plus readers for the flatbuffer (ops, versions, tensor types)."""
from __future__ import annotations

import re
import warnings
from collections import Counter

from edgebundle.errors import ConversionError, InputError, UnsupportedOpError
from edgebundle.manifest import TensorSpec
from packager.registry import Artifact, ConvertContext, register
from packager.sources import SourceKind
from targets import Format, IOType, Precision

_FLEX = re.compile(r"TF Select ops:\s*([^\n]+)")
_CUSTOM = re.compile(r"Custom ops:\s*([^\n]+)")


def _mode_fp32(conv, ctx: ConvertContext) -> dict:
    return {}


def _mode_fp16(conv, ctx: ConvertContext) -> dict:
    import tensorflow as tf

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return {"weights": "float16", "activations": "float32"}


def _mode_dynamic(conv, ctx: ConvertContext) -> dict:
    import tensorflow as tf

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    return {"weights": "int8", "activations": "float32 (quantized on the fly)"}


def _mode_int8(conv, ctx: ConvertContext) -> dict:
    import tensorflow as tf

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(ctx)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    io = ctx.profile.quantized_io
    if io is not IOType.FLOAT32:
        conv.inference_input_type = tf.int8 if io is IOType.INT8 else tf.uint8
        conv.inference_output_type = conv.inference_input_type
    return {"weights": "int8", "activations": "int8", "io": io.value, "per_channel": True,
            "calibration_samples": len(ctx.calibration)}


def _mode_int16x8(conv, ctx: ConvertContext) -> dict:
    import tensorflow as tf

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = _representative(ctx)
    conv.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return {"weights": "int8", "activations": "int16", "io": "float32",
            "calibration_samples": len(ctx.calibration)}


MODES = {Precision.FP32: _mode_fp32, Precision.FP16: _mode_fp16, Precision.DYNAMIC: _mode_dynamic,
         Precision.INT8: _mode_int8, Precision.INT16X8: _mode_int16x8}


def _representative(ctx: ConvertContext):
    samples = ctx.calibration.samples

    def gen():
        for feeds in samples:
            yield {k: v for k, v in feeds.items()}

    return gen


@register(kinds=(SourceKind.SAVED_MODEL, SourceKind.KERAS), fmt=Format.TFLITE, precisions=tuple(MODES))
def tflite_from_tf(ctx: ConvertContext) -> Artifact:
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(ctx.source.static_saved_model()))
    details = MODES[ctx.precision](conv, ctx)
    if ctx.allow_flex:
        conv.target_spec.supported_ops = list(conv.target_spec.supported_ops) + [tf.lite.OpsSet.SELECT_TF_OPS]
    try:
        with warnings.catch_warnings():  # the converter's calibrator uses the deprecated tf.lite.Interpreter
            warnings.filterwarnings("ignore", message=r"[\s\S]*tf.lite.Interpreter is deprecated")
            data = conv.convert()
    except Exception as e:  # ConverterError, plus assorted MLIR/RuntimeErrors
        raise _conversion_error(e, ctx) from None
    out = ctx.out_dir / "model.tflite"
    out.write_bytes(data)
    return Artifact(path=out, format=Format.TFLITE, precision=ctx.precision, quantization=details)


def _conversion_error(e: Exception, ctx: ConvertContext) -> ConversionError:
    text = str(e)
    flex = _FLEX.search(text)
    if flex:
        ops = [o.strip() for o in flex.group(1).split(",") if o.strip()]
        err = UnsupportedOpError(
            f"the model needs TensorFlow ops that the TFLite runtime does not have: {', '.join(ops)}",
            hint="replace those ops with TFLite builtins, pick an ONNX target (e.g. --target x86-cpu), "
                 "or pass --allow-flex (the device then needs a LiteRT build with the Flex delegate)")
        err.ops = ops
        return err
    custom = _CUSTOM.search(text)
    if custom:
        return UnsupportedOpError(f"the model needs custom ops the converter cannot lower: {custom.group(1)}")
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines() or [type(e).__name__]
    return ConversionError(f"TFLite conversion ({ctx.precision.value}) failed: {lines[-1].strip()[:400]}",
                           hint="try another --quantize mode (fp16 or dynamic), or an ONNX target")


# ---- reading a .tflite flatbuffer (TF's generated schema; packager-only) ----

def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _op_names() -> dict[int, str]:
    schema = _schema()
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


_TYPES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


def read_model(data: bytes):
    schema = _schema()
    return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))


def ops_with_versions(data: bytes) -> list[tuple[str, int]]:
    """(op name, op version) of each operator of the main subgraph, in execution order."""
    model = read_model(data)
    names = _op_names()
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
    from device_agent.runtimes.base import TensorInfo

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


@register(kinds=(SourceKind.TFLITE,), fmt=Format.TFLITE, precisions=tuple(MODES))
def tflite_as_is(ctx: ConvertContext) -> Artifact:
    """A ready .tflite is packaged unchanged; asking for another precision is an error."""
    import shutil

    src = ctx.source
    detected = detect_precision(src.data)
    if ctx.precision is not detected:
        raise InputError(
            f"{src.path.name} is already a {detected.value} TFLite model; edgepack cannot re-quantize "
            f"a .tflite to {ctx.precision.value}",
            hint="use --quantize auto to package it as is, or build from the original SavedModel/Keras model")
    out = ctx.out_dir / "model.tflite"
    shutil.copyfile(src.path, out)
    return Artifact(path=out, format=Format.TFLITE, precision=detected,
                    quantization={"source": "packaged as is", "detected_precision": detected.value})
