"""ONNX output: one clean fp32 graph per build (tf2onnx for TensorFlow sources, the model
itself for ONNX sources), then ONNX Runtime's quantizers. Static int8 calibrates once per
build (ORT's calibration cache); candidates that keep nodes in float reuse the ranges. Its precisions,
its `auto` ladder and the quantizer for each precision (MODES) live here."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from edgebundle.errors import ConversionError
from packager.candidates import Step
from packager.formats import onnx_graph
from packager.formats.sensitivity import GraphView, Lowered, Op, fake_quant
from packager.lint import Finding, Level
from packager.registry import Artifact, Backend, ConvertContext, Finished, register
from targets import CalibrationMethod, Format, IOType, Precision, TargetProfile

_METHODS = {CalibrationMethod.MINMAX: "MinMax", CalibrationMethod.ENTROPY: "Entropy",
            CalibrationMethod.PERCENTILE: "Percentile"}
_PASS_THROUGH = ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity")


class _Reader:
    """onnxruntime CalibrationDataReader over the build's calibration samples."""

    def __init__(self, samples):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def _preprocessed(ctx: ConvertContext, fp32: Path) -> Path:
    """ORT's recommended pre-processing (shape inference + optimisation) before quantizing; where it
    fails even without symbolic shapes, the plain graph, and `cache.onnx_unprocessed` says why."""
    cache = ctx.cache
    if cache.onnx_preprocessed is None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        out = cache.path("fp32-pre.onnx")
        fp32 = _opset13(fp32, cache.path("fp32-opset13.onnx"))
        t0 = time.time()
        # its logger prints a full traceback for a graph it gives up on; the fallbacks below say what happened
        with onnx_graph.quiet("onnxruntime.quantization.shape_inference", level=logging.CRITICAL):
            try:
                quant_pre_process(str(fp32), str(out), skip_symbolic_shape=False)
            except Exception:  # symbolic shape inference gives up on some graphs: pre-process without it
                onnx_graph.remove_symbolic_leftovers(since=t0)
                try:
                    quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
                except Exception as e:  # e.g. the optimizer rejects a subgraph: quantize the plain graph, and say so
                    out = fp32
                    cache.onnx_unprocessed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        cache.onnx_preprocessed = out
    return cache.onnx_preprocessed


def _unprocessed(ctx: ConvertContext) -> dict:
    """The quantization details' record of a graph quantized without ORT's pre-processing."""
    why = ctx.cache.onnx_unprocessed
    return {PRE_PROCESSING: f"failed ({why}): the graph was quantized as it is"} if why else {}


PRE_PROCESSING = "graph_preprocessing"  # in the quantization details, only when it was skipped


def _opset13(path: Path, out: Path) -> Path:
    """Per-channel Q/DQ needs opset 13 (the `axis` of DequantizeLinear): older graphs (PaddleOCR's
    exports are opset 11) are converted first, or ORT writes a model it then refuses to load."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    if (_opset_of(model) or 13) >= 13:
        return path
    try:
        onnx.save(version_converter.convert_version(model, 13), str(out))
    except Exception as e:  # the converter lacks adapters for some ops
        raise ConversionError(f"int8 needs ONNX opset 13 and the model's opset {_opset_of(model)} could not be "
                              f"converted: {str(e).splitlines()[0][:200]}", hint="re-export the model at opset 13+") from None
    return out


def _quantized_nodes(path: Path) -> int:
    """QuantizeLinear nodes anywhere in the graph (If/Loop bodies too)."""
    import onnx

    def count(g) -> int:
        n = sum(1 for node in g.node if node.op_type == "QuantizeLinear")
        return n + sum(count(a.g) for node in g.node for a in node.attribute if a.HasField("g"))

    return count(onnx.load(str(path), load_external_data=False).graph)


def _int8(ctx: ConvertContext, fp32: Path, out: Path) -> dict:
    from onnxruntime.quantization import CalibrationMethod as OrtMethod, QuantFormat, QuantType, quantize_static

    act = ctx.profile.activation_dtype
    method = ctx.calibration_method
    calib_cache = ctx.cache.onnx_calibration.setdefault(method, ctx.cache.path(f"ort-calibration-{method.value}.json"))
    # uint8 asymmetric activations use ORT's fast U8S8 CPU kernels (MobileNetV2 here: 0.56x fp32
    # vs 0.95x for S8S8); int8 activations are made symmetric, as TensorRT requires.
    try:
        with onnx_graph.quiet(""):
            quantize_static(str(_preprocessed(ctx, fp32)), str(out), _Reader(ctx.calibration.samples),
                            quant_format=QuantFormat.QDQ, per_channel=ctx.per_channel,
                            activation_type=QuantType.QUInt8 if act is IOType.UINT8 else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=getattr(OrtMethod, _METHODS[method]),
                            nodes_to_exclude=list(ctx.candidate.keep_float), calibration_cache_path=str(calib_cache),
                            extra_options={"ActivationSymmetric": act is IOType.INT8, "WeightSymmetric": True})
    except Exception as e:  # ORT's quantizer raises plain exceptions
        raise ConversionError(f"onnxruntime static quantization failed: {str(e).splitlines()[0][:300]}",
                              hint="try --quantize fp16, or another --calibration-method") from None
    if not _quantized_nodes(out):
        raise ConversionError("onnxruntime's quantizer quantized no node of this graph (its work may sit in "
                              "If/Loop bodies, which it does not enter)", hint="use --quantize fp16 or fp32")
    details = {"weights": "int8", "activations": act.value, "format": "QDQ", "per_channel": ctx.per_channel,
               "calibration_method": method.value, "calibration_samples": len(ctx.calibration), "io": "float32",
               **_unprocessed(ctx)}
    if ctx.candidate.keep_float:
        details["float_nodes"] = list(ctx.candidate.keep_float)
    return details


def _fp16(ctx: ConvertContext, fp32: Path, out: Path) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = list(ctx.candidate.keep_float)
    try:
        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True, node_block_list=keep or None)
        onnx.save(model, str(out))
    except Exception as e:
        raise ConversionError(f"fp16 conversion failed: {str(e).splitlines()[0][:300]}",
                              hint="use --quantize fp32") from None
    details = {"weights": "float16", "activations": "float16", "io": "float32"}
    if keep:
        details["float_nodes"] = keep
    return details


def _dynamic(ctx: ConvertContext, fp32: Path, out: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        # DefaultTensorType: ORT cannot always infer the type of a weight fed through a reshape (BERT's
        # attention output); every weight it quantizes is float32.
        quantize_dynamic(str(_preprocessed(ctx, fp32)), str(out), weight_type=QuantType.QInt8,
                         per_channel=ctx.per_channel, extra_options={"DefaultTensorType": 1})
    except Exception as e:
        raise ConversionError(f"onnxruntime dynamic quantization failed: {str(e).splitlines()[0][:300]}") from None
    return {"weights": "int8", "activations": "float32 (quantized on the fly)", "per_channel": ctx.per_channel,
            **_unprocessed(ctx)}


def _dynamic_block(ctx: ConvertContext, fp32: Path, out: Path) -> dict:
    """int8 weights in blocks of BLOCK values along the input axis, each with its own scale, in ORT's
    MatMulNBits; accuracy level 4 multiplies in int8 with the activations quantized per block on the
    fly. ORT's per-tensor dynamic int8 gives a whole activation one scale, and a transformer's outlier
    channels cost it the ranking of near ties (MiniLM: cosine 0.993, nearest neighbour kept for 87 %);
    per block: cosine 0.999, 97 %, at 0.7-0.8x fp32 against dynamic's 0.5x."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    cfg = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True, accuracy_level=4, bits=8)
    try:
        with onnx_graph.quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
            q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=8, block_size=BLOCK, is_symmetric=True,
                                     accuracy_level=4, algo_config=cfg)
            q.process()
            q.model.save_model_to_file(str(out), use_external_data_format=False)
    except Exception as e:
        raise ConversionError(f"onnxruntime block quantization failed: {str(e).splitlines()[0][:300]}",
                              hint="try --quantize dynamic or fp32") from None
    if not any(n.op_type == "MatMulNBits" for n in onnx.load(str(out), load_external_data=False).graph.node):
        raise ConversionError("no MatMul of this graph has constant weights that block quantization can take",
                              hint="try --quantize dynamic or int8")
    return {"weights": f"int8 per block of {BLOCK}", "activations": f"int8 per block of {BLOCK}, on the fly",
            "op": "com.microsoft.MatMulNBits", "accuracy_level": 4}


BLOCK = 128  # MiniLM: 128 keeps the neighbours for 97 % (64: 97 %, 256: 95.5 %) at the lowest latency
MODES = {Precision.FP16: _fp16, Precision.DYNAMIC: _dynamic, Precision.DYNAMIC_BLOCK: _dynamic_block,
         Precision.INT8: _int8}


@register
class OnnxBackend(Backend):
    format = Format.ONNX
    sources = ("savedmodel", "keras", "onnx")
    precisions = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.DYNAMIC_BLOCK, Precision.INT8)
    calibrated = (Precision.INT8,)
    ladder_steps = (Step(Precision.INT8), Step(Precision.INT8, mixed=True), Step(Precision.FP16),
                    Step(Precision.FP16, mixed=True), Step(Precision.FP32))

    def plan(self, source, profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
        """Graphs whose weights sit in MatMul/Gemm (transformers) try dynamic int8 first on CPU targets,
        then int8 per block: ORT's int8 MatMul kernels quantize activations per call, so nothing is
        calibrated (static int8 loses such models to the attention mask and Softmax), and the gates
        decide. Other graphs never try these (ORT's dynamic int8 is ~15x slower on CNNs)."""
        steps = super().plan(source, profile, asked)
        first = tuple(p for p in (Precision.DYNAMIC, Precision.DYNAMIC_BLOCK) if p in profile.precisions)
        if asked is Precision.AUTO and profile.is_cpu and first and _matmul_heavy(source):
            return tuple(Step(p) for p in first) + tuple(s for s in steps if s.precision not in first)
        return steps

    def skip(self, step: Step, slower: frozenset[Precision], profile: TargetProfile) -> str | None:
        if step.precision is Precision.FP16 and not step.mixed and profile.is_cpu:
            return ("fp16 on a CPU runs as casts around fp32 kernels (1.1-1.3x slower than fp32, measured): "
                    "auto keeps fp32; --quantize fp16 builds it when half the size matters more")
        return None

    def fp32(self, ctx: ConvertContext) -> Path:
        import onnx

        cache = ctx.cache
        if Format.ONNX not in cache.fp32:
            out = cache.path(f"fp32-opset{ctx.opset}.onnx")
            if ctx.source.kind.value == "onnx":
                model = onnx.load(str(ctx.source.path))
            else:
                onnx_graph.tf_to_onnx(ctx.source, out, ctx.opset)
                model = onnx.load(str(out))
            onnx_graph.sanitize(model)
            onnx.save(model, str(out))
            cache.fp32[Format.ONNX] = out
        return cache.fp32[Format.ONNX]

    def convert(self, ctx: ConvertContext) -> Artifact:
        import shutil

        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        out = ctx.out_dir / "model.onnx"
        fp32 = self.fp32(ctx)
        if ctx.precision is Precision.FP32:
            shutil.copyfile(fp32, out)
            details = {}
        else:
            details = MODES[ctx.precision](ctx, fp32, out)
        return Artifact(path=out, format=self.format, precision=ctx.precision,
                        quantization=dict(details, opset=_opset(out)))

    def finish(self, art: Artifact, profile: TargetProfile, work: Path, *, name: str, version: str) -> Finished:
        """As converted; a model quantized without ORT's pre-processing says so in the report's warnings."""
        skipped = art.quantization.get(PRE_PROCESSING)
        warnings = (f"the {art.precision.value} model skipped onnxruntime's graph pre-processing (shape inference "
                    f"and optimisation), which may cost it speed or accuracy: {skipped}",) if skipped else ()
        return Finished(path=art.path, name=art.path.name, warnings=warnings)

    def variant(self, ctx: ConvertContext) -> str:
        if ctx.precision is Precision.INT8:
            return f"{ctx.profile.activation_dtype.value}-{ctx.per_channel}-{ctx.calibration_method.value}"
        return str(ctx.per_channel) if ctx.precision is Precision.DYNAMIC else ""

    def lint(self, art: Artifact, profile: TargetProfile, *, allow_flex: bool, inputs, outputs) -> list[Finding]:
        import onnx

        model = onnx.load(str(art.path), load_external_data=False)
        out = []
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx", "com.microsoft")})
        if custom:
            out.append(Finding(Level.WARNING, "custom-domain", f"custom op domains {custom} need their own kernels"))
        if profile.static_shapes:
            for vi in model.graph.input:
                if any(not d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim):
                    out.append(Finding(Level.ERROR, "dynamic-shape", f"input {vi.name!r} has dynamic dimensions"))
        return out

    def gate_hint(self, profile: TargetProfile, precision: Precision, *, lossy) -> str:
        return ("try per-channel quantization (--per-channel), another --calibration-method (entropy, percentile), "
                "more representative calibration data, or --quantize fp16 (--quantize auto tries these for you)")

    def graph_view(self, art: Artifact, ctx: ConvertContext, samples: list[dict]):
        import onnx
        from onnx import numpy_helper

        fp32 = self.fp32(ctx)
        base = _preprocessed(ctx, fp32) if art.precision in (Precision.INT8, Precision.DYNAMIC) else fp32
        if base not in ctx.cache.float_tensors:
            ctx.cache.float_tensors[base] = onnx_graph.intermediates(onnx.load(str(base)), samples)
        ref = ctx.cache.float_tensors[base]
        model = onnx.load(str(art.path))
        got = onnx_graph.intermediates(model, samples)
        init = {t.name: t for t in model.graph.initializer}
        ops, alias, lowered = [], {}, []
        for n in model.graph.node:
            if n.op_type == "Cast" and not any(a.name == "to" and a.i in (1, 10) for a in n.attribute):
                ops.append(Op(n.name, n.op_type, tuple(n.input), tuple(n.output)))  # a real type change
            elif n.op_type in _PASS_THROUGH:
                a, b = n.input[0], n.output[0]
                if b in ref and a not in ref:
                    alias[a] = b
                else:
                    alias[b] = a
                if n.op_type == "QuantizeLinear" and len(n.input) >= 3 and n.input[1] in init:
                    scale = numpy_helper.to_array(init[n.input[1]])
                    zp = numpy_helper.to_array(init[n.input[2]]) if n.input[2] in init else np.zeros((), np.uint8)
                    if scale.size == 1:
                        lowered.append(Lowered(a, fake_quant(float(scale), int(zp), zp.dtype)))
            elif n.op_type != "Constant":
                ops.append(Op(n.name, n.op_type, tuple(n.input), tuple(n.output)))
        if art.precision is Precision.FP16:
            lowered += [Lowered(t, lambda x: np.asarray(x, np.float32).astype(np.float16).astype(np.float64))
                        for t, v in got.items() if v.dtype == np.float16]
        return GraphView(tuple(ops), alias, tuple(lowered), channel_axis=1), ref, got



def _matmul_heavy(source) -> bool:
    return getattr(source, "matmul_weight_share", 0.0) >= 0.5


def _opset(path: Path) -> int | None:
    import onnx

    return _opset_of(onnx.load(str(path), load_external_data=False))


def _opset_of(model) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
