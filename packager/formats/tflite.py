"""TFLite output: TFLiteConverter from a (static-shape) SavedModel, or a ready .tflite as is.
Sources it does not read itself come through a registry.Bridge (ONNX: packager/formats/onnx_tflite.py).
Its precisions, its `auto` ladder and the converter for each precision (MODES) live here.

int8 candidates share one calibration pass: the converter calibrates once
(`_experimental_calibrate_only`), and each int8 candidate (full, or with nodes kept in float)
is quantized from those statistics by the MLIR quantizer, which is what `convert()` does
internally. int16x8 goes through the converter's own path (the MLIR quantizer cannot do it).
These steps, and a first load and run of every int8/int16x8 model (and of any model before the
sensitivity analysis runs it without delegates), happen in a child process (tflite_worker.py):
TFLite's integer kernels and quantizers can abort, and an abort must fail one candidate, not the
build. Float and dynamic-range models load in-process (a child per model cost the suite minutes)."""
from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgebundle.errors import ConversionError, InputError, UnsupportedOpError
from packager.candidates import Step
from packager.formats import tflite_converter, tflite_layout, tflite_smooth, tflite_tables, tflite_values
from packager.formats.sensitivity import GraphView, Lowered, Op, fake_quant
from packager.lint import Finding, Level
from packager.registry import Artifact, Backend, ConvertContext, bridge, register
from packager.sources import Source, SourceKind
from packager.tflite_fb import describe_flatbuffer, detect_precision, ops_with_versions, read_model, write_model
from targets import Format, Precision, TargetProfile

_FLEX = re.compile(r"TF Select ops:\s*([^\n]+)")
_CUSTOM = re.compile(r"Custom ops:\s*([^\n]+)")
_EMPTY = re.compile(r"Empty min/max for tensor (?:serving_default_)?([^\s:]+)")


def _saved_model(ctx: ConvertContext) -> Path:
    via = bridge(ctx.source.kind.value, Format.TFLITE)
    return via.saved_model(ctx) if via else ctx.source.static_saved_model()


def _converted(ctx: ConvertContext) -> dict:
    """What the artifact records about a bridged source's conversion (empty for TF sources)."""
    via = bridge(ctx.source.kind.value, Format.TFLITE)
    return via.details(ctx) if via else {}


def _tflite(ctx: ConvertContext, mode: str) -> bytes:
    """The SavedModel converted by TFLiteConverter (`mode`: fp32, fp16 or dynamic; tflite_converter.py).
    A big one made by a bridge (onnx2tf) converts in a child of its own, which gives the converter's
    memory back when it exits (MPNet: 4 GB, most of it kept by the process that converted)."""
    saved = _saved_model(ctx)  # first: a bridge refuses unconvertible ops before TensorFlow loads
    bridged = bridge(ctx.source.kind.value, Format.TFLITE) is not None
    if bridged and tflite_converter.saved_model_bytes(saved) >= tflite_converter.CHILD_BYTES:
        return _in_child("convert", ctx, what=f"the {mode} conversion", samples=[], saved_model=saved, mode=mode,
                         allow_flex=ctx.allow_flex, lean_import=True)
    conv = tflite_converter.converter(str(saved), mode, allow_flex=ctx.allow_flex, lean_import=bridged)
    try:
        return conv.convert()
    except Exception as e:  # ConverterError, plus assorted MLIR/RuntimeErrors
        raise _conversion_error(str(e), ctx) from None


def _in_child(step: str, ctx: ConvertContext, *, what: str, samples: list[dict] | None = None, **req) -> bytes:
    """A step that can abort the process, in tflite_worker's child: a crash fails this candidate only."""
    from packager.formats import tflite_worker  # not at import: `python -m` runs it as __main__

    samples = ctx.calibration.samples if samples is None else samples
    try:
        out = tflite_worker.run(step, ctx.out_dir, samples=samples, what=what, **req)
    except ConversionError as e:
        raise (_conversion_error(e.text, ctx) if hasattr(e, "text") else e) from None
    return out.read_bytes() if out.is_file() else b""


def _probe(path: Path, ctx: ConvertContext, what: str, *, mode: str = "device") -> None:
    """Load and run `path` once in a child before this process does: as the device runs it
    (validation), or with every tensor kept and no delegate (`analysis`, the sensitivity analysis)."""
    _in_child("probe", ctx, what=what, samples=[ctx.sample] if ctx.sample else [], model=path, mode=mode)


def _calibrated(ctx: ConvertContext) -> Path:
    """The float model with calibration statistics: one pass over the calibration data per build."""
    out = ctx.cache.path("tflite-calibrated.tflite")
    if not out.is_file():
        data = _in_child("calibrate", ctx, what="the calibration pass", saved_model=_saved_model(ctx),
                         allow_flex=ctx.allow_flex)
        out.write_bytes(data)
    return out


def _int8(ctx: ConvertContext) -> tuple[bytes, dict]:
    io = ctx.profile.quantized_io
    keep = list(ctx.candidate.keep_float)
    calibrated = _calibrated(ctx)  # its error (e.g. the op TFLite lacks) reaches the build as it is
    data = _in_child("int8", ctx, what=f"the {ctx.candidate.label} model", samples=[], calibrated=calibrated,
                     io=io.value, keep=keep)
    details = {"weights": "int8", "activations": "int8", "io": io.value, "per_channel": True,
               "calibration_samples": len(ctx.calibration)}
    if keep:
        details["float_nodes"] = keep
    return data, details


def _fp16(ctx: ConvertContext) -> tuple[bytes, dict]:
    return _tflite(ctx, "fp16"), {"weights": "float16", "activations": "float32"}


def _dynamic(ctx: ConvertContext) -> tuple[bytes, dict]:
    """Dynamic-range int8; a transformer's attention value projections stay in float, and the weights
    the candidate keeps in float (tflite_values.py). The converter runs once per build: a candidate
    keeping weights in float is that model with those weights put back."""
    out = ctx.cache.path("tflite-dynamic.tflite")
    if not out.is_file():
        out.write_bytes(_tflite(ctx, "dynamic"))
    data = out.read_bytes()
    details = {"weights": "int8", "activations": "float32 (quantized on the fly)"}
    keep = tuple(ctx.candidate.keep_float)
    converted = read_model(data)
    transformer = bool(tflite_values.value_projections(converted))
    if not keep and not transformer:
        return data, details  # as the converter wrote it
    weights = _float_weights(ctx, converted)  # read once, for every step
    data, kept = tflite_values.float_values(data, weights, keep)
    parts = ["the attention value projections"] * transformer + [f"{len(keep)} more projections"] * bool(keep)
    details.update(weights=f"int8; in float (stored as fp16): {' and '.join(parts)}", float_nodes=kept)
    if transformer:  # the LayerNorm outputs' outlier channels
        data, smoothed = tflite_smooth.smooth(data, weights, lambda names: _ranges(ctx, names))
        if smoothed:
            details["smoothed"] = len(smoothed)  # projections whose inputs are divided per channel (tflite_smooth.py)
    data, tables = tflite_tables.per_row(data, weights)  # the embeddings: a scale per row, not per table
    if tables:
        details["tables_per_row"] = tables
    return data, details


def _float_weights(ctx: ConvertContext, dynamic) -> Mapping[bytes, np.ndarray]:
    """The fp32 model's weights by tensor name. A length bucket's are the main model's (the same graph
    through onnx2tf at another length: the same constants under the same names), which saves converting
    its fp32 model (MPNet: ~20 s and a 5.9 GB converter a bucket); when one it needs is missing there or
    of another size, its own fp32 model is converted."""
    shared = ctx.cache.weights
    if "length" in ctx.cache.keyed and shared and tflite_values.covered(dynamic, shared):
        return shared
    weights = tflite_values.float_weights(read_model(TFLiteBackend().fp32(ctx).read_bytes()))
    if "length" not in ctx.cache.keyed:
        shared.keep(weights, ctx.cache.path("float-weights"))
    return weights


RANGE_SAMPLES = 16  # calibration samples the smoothing's activation ranges come from


def _ranges(ctx: ConvertContext, names: set[str]) -> dict[str, np.ndarray]:
    """Max |value| per channel (last axis) of the named fp32 tensors on calibration samples, from the
    main model (at max_length): kept in the build cache, which the length buckets share, and in the
    cache across builds beside the candidate, so that a bucket converted after a main model that came
    from there gets the same ranges, hence the same weights (shared), as when it was converted."""
    have = ctx.cache.ranges
    if names - have.keys():
        have.update(_stored_ranges(ctx))
    missing = names - have.keys()
    samples = ctx.calibration.samples[:RANGE_SAMPLES] if ctx.calibration else ([ctx.sample] if ctx.sample else [])
    if missing and samples:
        have.update(_channel_maxima(TFLiteBackend().fp32(ctx).read_bytes(), samples, missing))
        if "length" not in ctx.cache.keyed:  # the main model's: what its buckets must use
            _keep_ranges(ctx, have)
    return {n: have[n] for n in names if n in have}


def _ranges_key(ctx: ConvertContext) -> str | None:
    k, store = ctx.cache.keyed, ctx.cache.store
    return store.key({"what": "smoothing-ranges", "model": k.get("model"), "inputs": k.get("inputs"),
                      "calibration": k.get("calibration"), "allow_flex": ctx.allow_flex}) if store else None


def _stored_ranges(ctx: ConvertContext) -> dict[str, np.ndarray]:
    key = _ranges_key(ctx)
    hit = ctx.cache.store.get(key, ctx.cache.path("ranges")) if key else None
    if hit is None:
        return {}
    with np.load(hit.path) as z:
        return {n: z[f"r{i}"] for i, n in enumerate(hit.info.get("names", []))}


def _keep_ranges(ctx: ConvertContext, ranges: dict[str, np.ndarray]) -> None:
    key = _ranges_key(ctx)
    if key:
        names = sorted(ranges)
        out = ctx.cache.path("smoothing-ranges.npz")
        np.savez(out, **{f"r{i}": ranges[n] for i, n in enumerate(names)})
        ctx.cache.store.put(key, out, {"names": names})


def _int16x8(ctx: ConvertContext) -> tuple[bytes, dict]:
    data = _in_child("int16x8", ctx, what="the int16x8 model", saved_model=_saved_model(ctx))
    return data, {"weights": "int8", "activations": "int16", "io": "float32",
                  "calibration_samples": len(ctx.calibration)}


MODES = {Precision.FP16: _fp16, Precision.DYNAMIC: _dynamic, Precision.INT8: _int8, Precision.INT16X8: _int16x8}


def _conversion_error(text: str, ctx: ConvertContext) -> ConversionError:
    flex = _FLEX.search(text)
    if flex:
        ops = [o.strip() for o in flex.group(1).split(",") if o.strip()]
        err = UnsupportedOpError(
            f"the model needs TensorFlow ops that the TFLite runtime does not have: {', '.join(ops)}",
            hint="replace those ops with TFLite builtins, pick an ONNX target (e.g. --target x86-cpu), "
                 "or pass --allow-flex (the device then needs a LiteRT build with the Flex delegate)")
        err.ops = ops
        return err
    empty = _EMPTY.search(text)
    ints = {s.name for s in ctx.source.inputs if np.dtype(s.dtype).kind in "iub"}
    if empty and empty.group(1) in ints:
        return ConversionError(f"{ctx.candidate.label}: TFLite's int16x8 quantizer wants a float range for the integer "
                               f"input {empty.group(1)!r} (token ids and masks are never quantized) and cannot "
                               "leave it out in this model",
                               hint="dynamic int8, fp16 or fp32 keep integer inputs as they are")
    custom = _CUSTOM.search(text)
    if custom:
        return UnsupportedOpError(f"the model needs custom ops the converter cannot lower: {custom.group(1)}")
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines() or ["no message"]
    return ConversionError(f"TFLite conversion ({ctx.candidate.label}) failed: {lines[-1].strip()[:400]}",
                           hint="try another --quantize mode (fp16 or fp32), or an ONNX target")


@register
class TFLiteBackend(Backend):
    format = Format.TFLITE
    sources = ("savedmodel", "keras", "tflite")
    precisions = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8, Precision.INT16X8)
    calibrated = (Precision.INT8, Precision.INT16X8)
    ladder_steps = (Step(Precision.INT8), Step(Precision.INT8, mixed=True), Step(Precision.INT16X8),
                    Step(Precision.FP16), Step(Precision.FP32))

    def skip(self, step: Step, slower: frozenset[Precision], profile: TargetProfile) -> str | None:
        if step.precision is Precision.INT16X8 and Precision.INT8 in slower:
            return "int8 was already slower than fp32 here, and int16x8 kernels are slower than int8"
        return None

    def packages_as_is(self, source: Source) -> bool:
        return source.kind is SourceKind.TFLITE

    def reads_calibration(self, precision: Precision) -> bool:
        return super().reads_calibration(precision) or precision is Precision.DYNAMIC  # smoothing's ranges

    def plan(self, source: Source, profile: TargetProfile, asked: Precision) -> tuple[Step, ...]:
        """A ready .tflite is packaged as it is: its own precision is the only candidate. Graphs whose
        weights sit in MatMul/Gemm (transformers) try dynamic-range int8 first on CPU targets, as the
        ONNX backend does: weights in int8, activations quantized per call, nothing calibrated (full
        int8 quantizes LayerNorm and Softmax, where transformers lose the accuracy); the speed gate decides."""
        if not self.packages_as_is(source):
            steps = super().plan(source, profile, asked)
            if asked is Precision.AUTO and profile.is_cpu and Precision.DYNAMIC in profile.precisions and _dense(source):
                return ((Step(Precision.DYNAMIC), Step(Precision.DYNAMIC, mixed=True))
                        + tuple(s for s in steps if s.precision is not Precision.DYNAMIC))
            return steps
        if source.edgetpu_compiled:
            raise InputError(f"{source.path.name} is already compiled for the Edge TPU; edgepack cannot validate it "
                             "here", hint="build from the uncompiled int8 model on a host with edgetpu_compiler on "
                                          "PATH: edgepack compiles it and validates the int8 model it came from")
        detected = detect_precision(source.data)
        if detected not in profile.precisions:
            raise InputError(f"{source.path.name} is a {detected.value} TFLite model and {profile.name} runs only "
                             f"{', '.join(x.value for x in profile.precisions)}; edgepack cannot re-quantize a .tflite",
                             hint="build from the original SavedModel/Keras model, which edgepack can quantize")
        if asked not in (Precision.AUTO, detected):
            raise InputError(
                f"{source.path.name} is already a {detected.value} TFLite model; edgepack cannot re-quantize "
                f"a .tflite to {asked.value}",
                hint="use --quantize auto to package it as is, or build from the original SavedModel/Keras model")
        return (Step(detected),)

    def needs_flex(self, art: Artifact) -> bool:
        return any(n.startswith("Flex") for n, _ in ops_with_versions(art.path.read_bytes()))

    def fp32(self, ctx: ConvertContext) -> Path:
        cache = ctx.cache
        if Format.TFLITE not in cache.fp32:
            out = cache.path("fp32.tflite")
            if self.packages_as_is(ctx.source):
                shutil.copyfile(ctx.source.path, out)
            else:
                out.write_bytes(_tflite(ctx, "fp32"))
            cache.fp32[Format.TFLITE] = out
        return cache.fp32[Format.TFLITE]

    def convert(self, ctx: ConvertContext) -> Artifact:
        out = ctx.out_dir / "model.tflite"
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        if self.packages_as_is(ctx.source):
            return self._as_is(ctx, out)
        if ctx.precision is Precision.FP32:
            self._write(out, self.fp32(ctx).read_bytes())
            return Artifact(path=out, format=self.format, precision=Precision.FP32, quantization=_converted(ctx))
        data, details = MODES[ctx.precision](ctx)
        self._write(out, data)
        if ctx.precision in self.calibrated:  # integer kernels are where LiteRT aborted (a BERT's full int8)
            _probe(out, ctx, f"the {ctx.candidate.label} model")
        return Artifact(path=out, format=self.format, precision=ctx.precision,
                        quantization={**details, **_converted(ctx)})

    def _write(self, out: Path, data: bytes) -> None:
        """A converted model, in the canonical layout that keeps unchanged tensors' bytes across
        versions for delta updates (tflite_layout.py), before anything validates it. A delegate's
        backend (Edge TPU) hands its compiler the converter's file as it is."""
        out.write_bytes(tflite_layout.canonical(data)[0] if self.delegate is None else data)

    def _as_is(self, ctx: ConvertContext, out: Path) -> Artifact:
        """A ready .tflite is packaged unchanged; asking for another precision is an error."""
        src = ctx.source
        detected = detect_precision(src.data)
        if ctx.precision is not detected:
            raise InputError(
                f"{src.path.name} is already a {detected.value} TFLite model; edgepack cannot re-quantize "
                f"a .tflite to {ctx.precision.value}",
                hint="use --quantize auto to package it as is, or build from the original SavedModel/Keras model")
        shutil.copyfile(src.path, out)
        return Artifact(path=out, format=self.format, precision=detected,
                        quantization={"source": "packaged as is", "detected_precision": detected.value})

    def variant(self, ctx: ConvertContext) -> str:
        return ctx.profile.quantized_io.value if ctx.precision is Precision.INT8 else ""

    def lint(self, art: Artifact, profile: TargetProfile, *, allow_flex: bool, inputs, outputs) -> list[Finding]:
        ops = ops_with_versions(art.path.read_bytes())
        out = []
        flex = sorted({n for n, _ in ops if n.startswith("Flex")})
        if flex:
            out.append(Finding(Level.WARNING if allow_flex else Level.ERROR, "flex-ops",
                               f"needs the TF Select (Flex) delegate for {', '.join(flex)}; "
                               "stock LiteRT/tflite-runtime wheels on devices cannot run these"))
        if profile.static_shapes:
            for t in list(inputs) + list(outputs):
                if any(d < 0 for d in (t.shape_signature or ())):
                    out.append(Finding(Level.ERROR, "dynamic-shape", f"{t.name!r} has dynamic shape "
                                       f"{t.shape_signature}; {profile.name} needs static shapes"))
        return out

    def gate_hint(self, profile: TargetProfile, precision: Precision, *, lossy) -> str:
        return ("try more representative calibration data (--calibration-samples 500), --quantize int16x8 or fp16, "
                "or keep sensitive layers in float (--quantize auto does this for you)")

    def describe(self, path: Path):
        return describe_flatbuffer(path.read_bytes())

    def graph_view(self, art: Artifact, ctx: ConvertContext, samples: list[dict]):
        fp32 = self.fp32(ctx)
        probe = replace(ctx, out_dir=art.path.parent / "analysis")
        if art.precision is Precision.DYNAMIC:  # what it can keep in float: a hybrid op's weights
            for path, what in ((fp32, "fp32"), (art.path, art.precision.value)):
                _probe(path, probe, f"the {what} model without delegates", mode="analysis")
            return self._hybrid(art, fp32, samples)
        if fp32 not in ctx.cache.float_tensors:
            _probe(fp32, probe, "the fp32 model without delegates", mode="analysis")
            ctx.cache.float_tensors[fp32] = _tensors(fp32.read_bytes(), samples)[0]
        _probe(art.path, probe, f"the {art.precision.value} model without delegates", mode="analysis")
        ref = ctx.cache.float_tensors[fp32]
        got, interp = _tensors(art.path.read_bytes(), samples)
        details = {d["index"]: d for d in interp.get_tensor_details()}
        ops, alias, lowered = [], {}, []
        for op in interp._get_ops_details():
            ins = [details[i]["name"] for i in op["inputs"] if i >= 0]
            outs = [details[i]["name"] for i in op["outputs"] if i >= 0]
            if op["op_name"] in ("QUANTIZE", "DEQUANTIZE") and ins and outs:
                a, b = ins[0], outs[0]
                if b in ref and a not in ref:
                    alias[a] = b
                else:
                    alias[b] = a
            elif op["op_name"] != "DELEGATE" and outs:
                ops.append(Op(name=outs[0], kind=op["op_name"], inputs=tuple(ins), outputs=tuple(outs)))
        seen = {t for op in interp._get_ops_details() for t in op["outputs"]}
        seen |= {d["index"] for d in interp.get_input_details()}
        for idx in seen:
            d = details[idx]
            scale, zp = _qparams(d)
            if scale is not None:
                lowered.append(Lowered(d["name"], fake_quant(scale, zp, np.dtype(d["dtype"]))))
        return GraphView(tuple(ops), alias, tuple(lowered), channel_axis=-1), ref, got

    def _hybrid(self, art: Artifact, fp32: Path, samples: list[dict]):
        """A dynamic-range model's view: only the ops with int8 weights (the rest compute in float, and
        keeping them in float changes nothing), each named by its weight tensor, which a candidate keeps
        in float (tflite_values.float_values); each compared on its input and output alone, the same
        tensor names in the fp32 model (every tensor of all-mpnet-base-v2 at 384 tokens on 4 samples,
        both models: ~8 GB)."""
        model = read_model(art.path.read_bytes())
        graph, ops = model.subgraphs[0], []
        for op in tflite_values.hybrid_ops(model):
            name = lambda i: graph.tensors[i].name.decode()  # noqa: E731
            # a smoothed op's input: the tensor before the division (tflite_smooth.py), which the fp32 model has
            ops.append(Op(name=name(op.inputs[1]), kind="FULLY_CONNECTED",
                          inputs=(name(op.inputs[0]).removesuffix(tflite_smooth.SUFFIX),),
                          outputs=tuple(name(i) for i in op.outputs)))
        del model, graph
        names = {t for op in ops for t in op.inputs + op.outputs}
        ref = _tensors(fp32.read_bytes(), samples, names)[0]
        got = _tensors(art.path.read_bytes(), samples, names)[0]
        return GraphView(tuple(ops), {}, (), channel_axis=-1, node_limit=0.0), ref, got


def _dense(source: Source) -> bool:
    """Most weights feed MatMul/Gemm (an ONNX source: transformers, MLPs), not convolutions."""
    return getattr(source, "matmul_weight_share", 0.0) >= 0.5


def _qparams(d: dict) -> tuple[float | None, int | None]:
    q = d.get("quantization_parameters") or {}
    scales = q.get("scales")
    if np.dtype(d["dtype"]).kind not in "iu" or scales is None or len(scales) != 1 or scales[0] <= 0:
        return None, None
    return float(scales[0]), int(q["zero_points"][0])



def _channel_maxima(data: bytes, samples: list[dict], names: set[str]) -> dict[str, np.ndarray]:
    """Max |value| per channel (last axis) over `samples` of the named tensors (not scalars) of a float
    model: made outputs of the graph and run as the device runs it (XNNPACK), not with every
    tensor kept by the reference kernels (MPNet's 384-token model: 0.36 s a sample instead of 3.1 s).
    Reduced sample by sample: MPNet's would be 3 GB kept. Names not in the graph are left out."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeruntime.litert import without_xnnpack_info

    model = read_model(data)
    graph = model.subgraphs[0]
    index = {t.name.decode(): i for i, t in enumerate(graph.tensors)}
    extra = [index[n] for n in sorted(names) if n in index]
    graph.outputs = np.array(list(graph.outputs) + [i for i in extra if i not in set(graph.outputs)], np.int32)
    with without_xnnpack_info():
        interp = Interpreter(model_content=bytes(write_model(model)))
        interp.allocate_tensors()
    sigs = interp._get_full_signature_list() or {}
    sig = sigs.get("serving_default") or (sigs[sorted(sigs)[0]] if sigs else None)
    by_name = {d["name"]: d["index"] for d in interp.get_input_details()}
    dtypes = {d["index"]: d["dtype"] for d in interp.get_input_details()}
    maxima: dict[int, np.ndarray] = {}
    for feeds in samples:
        for name, x in feeds.items():
            idx = sig["inputs"][name] if sig and name in sig["inputs"] else by_name[name]
            interp.set_tensor(idx, np.asarray(x).astype(dtypes[idx]))
        interp.invoke()
        for i in extra:
            t = interp.get_tensor(i)
            if t.ndim >= 1:
                m = np.abs(t).reshape(-1, t.shape[-1]).max(axis=0)
                maxima[i] = np.maximum(maxima[i], m) if i in maxima else m
    return {graph.tensors[i].name.decode(): m for i, m in maxima.items()}


def _tensors(data: bytes, samples: list[dict], names: set[str] | None = None):
    """Every op's output (dequantized) on `samples`, stacked on axis 0; by tensor name (those in
    `names` only, when given)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=data, experimental_preserve_all_tensors=True,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    sigs = interp._get_full_signature_list() or {}
    sig = sigs.get("serving_default") or (sigs[sorted(sigs)[0]] if sigs else None)
    by_name = {d["name"]: d for d in interp.get_input_details()}
    details = {d["index"]: d for d in interp.get_tensor_details()}
    wanted = {t for op in interp._get_ops_details() for t in op["outputs"] if t >= 0}
    wanted |= set(by_name[n]["index"] for n in by_name)
    if names is not None:
        wanted = {t for t in wanted if details[t]["name"] in names}
    rows: dict[str, list] = {}
    for feeds in samples:
        for name, x in feeds.items():
            idx = sig["inputs"][name] if sig and name in sig["inputs"] else by_name[name]["index"]
            d = details[idx]
            scale, zp = _qparams(d)
            x = np.asarray(x)
            if scale is not None and x.dtype.kind == "f":
                lim = np.iinfo(np.dtype(d["dtype"]))
                x = np.clip(np.round(x / scale) + zp, lim.min, lim.max)
            interp.set_tensor(idx, x.astype(d["dtype"]))
        interp.invoke()
        for idx in wanted:
            d = details[idx]
            try:
                v = interp.get_tensor(idx)
            except ValueError:  # tensors the interpreter did not keep
                continue
            scale, zp = _qparams(d)
            v = (v.astype(np.float64) - zp) * scale if scale is not None else v
            rows.setdefault(d["name"], []).append(np.array(v))
    return {k: np.concatenate([r.reshape((1,) + r.shape) for r in v]) for k, v in rows.items()
            if all(r.shape == v[0].shape for r in v)}, interp
