"""Pre-flight and post-conversion checks per target: Flex ops, dynamic shapes, and for the
Edge TPU the I/O types, unmappable ops and where the graph would fall back to the CPU."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from targets import TargetProfile

# TFLite builtins the Edge TPU compiler can map (Coral's published supported-op table).
EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "HARD_SWISH", "L2_NORMALIZATION", "LOGISTIC", "LSTM", "MAXIMUM", "MAX_POOL_2D",
    "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX", "REDUCE_MIN", "RELU",
    "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE",
    "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUARED_DIFFERENCE", "SQUEEZE", "STRIDED_SLICE", "SUB", "SUM",
    "TANH", "TRANSPOSE", "TRANSPOSE_CONV", "edgetpu-custom-op",
})
# Newest op versions edgetpu_compiler 16 accepts, where newer TF emits newer ones (seen in practice).
EDGETPU_MAX_VERSION = {"CONV_2D": 5, "EXP": 1}


class Level(str, Enum):
    ERROR = "error"  # the target fails
    WARNING = "warning"  # the bundle is built; the report says what to watch
    INFO = "info"


@dataclass(frozen=True)
class Finding:
    level: Level
    code: str
    message: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level"] = self.level.value
        return d


def lint_source(source, profile: TargetProfile) -> list[Finding]:
    """Before converting: shapes the target needs static, batch size."""
    out = []
    for s in source.inputs:
        if s.dynamic and profile.static_shapes:
            out.append(Finding(Level.INFO, "static-shape",
                               f"input {s.name!r} {s.signature} fixed to {s.shape} for {profile.name}"))
        if profile.batch and s.shape and s.shape[0] != profile.batch and len(s.shape) > 1:
            out.append(Finding(Level.ERROR, "batch-size",
                               f"{profile.name} runs batch {profile.batch}; input {s.name!r} has shape {s.shape}"))
    if "edgetpu" in profile.delegates:
        for s in source.inputs:
            if s.dtype not in ("float32", "int8", "uint8"):
                out.append(Finding(Level.WARNING, "edgetpu-io",
                                   f"input {s.name!r} is {s.dtype}; the Edge TPU maps only 8-bit tensors"))
    return out


def lint_tflite(data: bytes, profile: TargetProfile, *, allow_flex: bool, inputs, outputs) -> list[Finding]:
    """On the converted model: Flex ops, dynamic shapes, Edge TPU mapping."""
    from packager.formats.tflite import ops_with_versions

    ops = ops_with_versions(data)
    out = []
    flex = sorted({n for n, _ in ops if n.startswith("Flex")})
    if flex:
        out.append(Finding(Level.WARNING if allow_flex else Level.ERROR, "flex-ops",
                           f"needs the TF Select (Flex) delegate for {', '.join(flex)}; "
                           "stock LiteRT/tflite-runtime wheels on devices cannot run these"))
    if profile.static_shapes:
        for t in list(inputs) + list(outputs):
            if any(d < 0 for d in (t.shape_signature or ())):
                out.append(Finding(Level.ERROR, "dynamic-shape",
                                   f"{t.name!r} has dynamic shape {t.shape_signature}; {profile.name} needs static shapes"))
    if "edgetpu" in profile.delegates:
        out += _edgetpu(ops, inputs, outputs, profile)
    return out


def _edgetpu(ops, inputs, outputs, profile: TargetProfile) -> list[Finding]:
    out = []
    for t in list(inputs) + list(outputs):
        if t.dtype not in ("int8", "uint8"):
            out.append(Finding(Level.ERROR, "edgetpu-io",
                               f"{t.name!r} is {t.dtype}; the Edge TPU needs int8/uint8 I/O so QUANTIZE/DEQUANTIZE "
                               "stay off the CPU (set quantized_io: uint8 or int8 in the profile)"))
    first_bad = next((i for i, (name, _) in enumerate(ops) if name not in EDGETPU_OPS), None)
    if first_bad is not None:
        bad = sorted({n for n, _ in ops if n not in EDGETPU_OPS})
        out.append(Finding(Level.WARNING, "edgetpu-fallback",
                           f"op #{first_bad} {ops[first_bad][0]} cannot run on the Edge TPU; it and the "
                           f"{len(ops) - first_bad - 1} ops after it fall back to the CPU "
                           f"({first_bad} of {len(ops)} ops on the TPU). Unmappable: {', '.join(bad)}"))
    else:
        out.append(Finding(Level.INFO, "edgetpu-mapping", f"all {len(ops)} ops are on Coral's supported list"))
    too_new = sorted({f"{n} v{v}" for n, v in ops if v > EDGETPU_MAX_VERSION.get(n, 99)})
    if too_new:
        out.append(Finding(Level.WARNING, "edgetpu-op-version",
                           f"edgetpu_compiler 16 rejects op versions {', '.join(too_new)} that this TensorFlow "
                           "emits; avoid the features that need them (e.g. grouped or dilated convolutions)"))
    return out


def lint_onnx(path, profile: TargetProfile) -> list[Finding]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = []
    custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx", "com.microsoft")})
    if custom:
        out.append(Finding(Level.WARNING, "custom-domain", f"custom op domains {custom} need their own kernels"))
    if profile.static_shapes:
        for vi in model.graph.input:
            dims = vi.type.tensor_type.shape.dim
            if any(not d.HasField("dim_value") for d in dims):
                out.append(Finding(Level.ERROR, "dynamic-shape", f"input {vi.name!r} has dynamic dimensions"))
    return out


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level is Level.ERROR]
