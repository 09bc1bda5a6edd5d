"""`edgepack build` as a library: one model, several targets, shared work.

The model, TensorFlow, the float reference on the validation set and the
calibration data are loaded/computed once; each target then converts, lints,
measures and either writes its bundle atomically or fails with nothing written.
"""
from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from device_agent.bench import measure
from device_agent.runtimes import load_runtime
from edgebundle.archive import write_bundle
from edgebundle.errors import (AccuracyGateError, CalibrationError, EdgepackError, InputError,
                               RuntimeUnavailableError, UnsupportedOpError)
from edgebundle.manifest import Manifest, Quantization, TensorSpec, parse_version
from packager import edgetpu, lint
from packager.data import Dataset, ImagePreprocessing, load_dataset, random_dataset
from packager.evaluate import compare, golden_tolerance
from packager.registry import Artifact, ConvertContext, get_converter
from packager.sources import Source, SourceKind, load_source, resolve_shapes
from targets import CalibrationMethod, Format, Precision, TargetProfile, load_profile

CALIBRATED = (Precision.INT8, Precision.INT16X8)
QUANTIZED = (Precision.DYNAMIC, Precision.INT8, Precision.INT16X8)
GOLDEN_COUNT = 3
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    targets: tuple[str, ...]
    out_dir: Path
    precision: Precision = Precision.AUTO
    calibration: str | None = None  # path or "random"
    calibration_samples: int = 200
    validation: str | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    max_accuracy_drop: float | None = None
    allow_flex: bool = False
    name: str | None = None
    version: str = "1.0.0"
    opset: int = 17
    per_channel: bool | None = None  # None = the profile's choice
    calibration_method: CalibrationMethod | None = None
    image_prep: ImagePreprocessing = ImagePreprocessing()
    labels: Path | None = None
    bench_runs: int = 50
    bench_seconds: float = 3.0
    sign_key: Path | None = None  # Ed25519 private key: bundles are written signed


@dataclass
class TargetResult:
    target: str
    ok: bool
    bundle: Path | None = None
    report: dict = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None
    exc: EdgepackError | None = None  # for callers that map errors (the CLI's exit codes)

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "bundle": str(self.bundle) if self.bundle else None,
                "error": self.error, "error_kind": self.error_kind, **self.report}


@dataclass
class BuildResult:
    model: str
    source_format: str
    results: list[TargetResult]
    seconds: float
    shared: dict

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        return {"schema": "edgepack.build-report/1", "model": self.model, "source_format": self.source_format,
                "ok": self.ok, "seconds": round(self.seconds, 2), "shared": self.shared,
                "targets": [r.to_dict() for r in self.results]}


def build(opts: BuildOptions, *, progress: Progress = lambda _m: None) -> BuildResult:
    t0 = time.perf_counter()
    if not opts.targets:
        raise InputError("no --target given", hint="e.g. --target arm-cpu (see: edgepack targets list)")
    try:
        parse_version(opts.version)
    except EdgepackError as e:
        raise InputError(f"--version: {e}", hint=e.hint) from None
    profiles = [load_profile(t) for t in opts.targets]  # fail fast, before TensorFlow loads
    signer = None
    if opts.sign_key:
        from edgebundle import signing

        key = signing.load_private_key(opts.sign_key)
        signer = lambda manifest_bytes: signing.sign(manifest_bytes, key)  # noqa: E731
    if opts.calibration_samples < 1:
        raise InputError("--calibration-samples must be at least 1")
    name = opts.name or _default_name(opts.model)
    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp:
        work = Path(tmp)
        progress(f"loading {opts.model}")
        source = load_source(opts.model, workdir=work)
        resolve_shapes(source.inputs, dict(opts.input_shapes))
        plans = [(p, _resolve_precision(p, opts.precision, source)) for p in profiles]
        calib, valid = _datasets(opts, source, plans, progress)
        progress(f"float reference on {len(valid)} validation samples")
        reference = [source.reference(s) for s in valid.samples]
        shared = {"workdir": work}
        results = []
        for profile, precision in plans:
            progress(f"[{profile.name}] {profile.format.value} {precision.value}")
            try:
                results.append(_build_target(opts, name=name, source=source, profile=profile, precision=precision,
                                             calib=calib, valid=valid, reference=reference, shared=shared,
                                             work=work / profile.name, progress=progress, signer=signer))
            except EdgepackError as e:
                progress(f"[{profile.name}] FAILED: {str(e).splitlines()[0]}")
                results.append(TargetResult(target=profile.name, ok=False, error=str(e), error_kind=type(e).__name__, exc=e,
                                            report={"format": profile.format.value, "precision": precision.value}))
        info = {"calibration": _data_info(calib), "validation": _data_info(valid),
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in source.inputs]}
        return BuildResult(model=str(opts.model), source_format=source.kind.value, results=results,
                           seconds=time.perf_counter() - t0, shared=info)


def _default_name(model: Path) -> str:
    stem = Path(model).name if Path(model).is_dir() else Path(model).stem
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".-") or "model"


def _resolve_precision(profile: TargetProfile, asked: Precision, source: Source) -> Precision:
    if source.kind is SourceKind.TFLITE:
        from packager.formats.tflite import detect_precision

        detected = detect_precision(source.data)
        if asked not in (Precision.AUTO, detected):
            raise InputError(
                f"{source.path.name} is already a {detected.value} TFLite model; edgepack cannot re-quantize "
                f"a .tflite to {asked.value}",
                hint="use --quantize auto to package it as is, or build from the original SavedModel/Keras model")
        prec = detected
    else:
        prec = profile.default_precision if asked is Precision.AUTO else asked
    if prec not in profile.precisions:
        raise InputError(f"target {profile.name} does not take precision {prec.value!r}",
                         hint=f"{profile.name} takes: {', '.join(p.value for p in profile.precisions)}")
    get_converter(source.kind.value, profile.format, prec)  # unsupported pairs fail before any work
    return prec


def _datasets(opts: BuildOptions, source: Source, plans, progress: Progress) -> tuple[Dataset | None, Dataset]:
    needs_calib = source.kind is not SourceKind.TFLITE and any(p in CALIBRATED for _, p in plans)
    calib = valid = None
    if opts.validation:
        valid = load_dataset(opts.validation, source.inputs, what="validation", image_prep=opts.image_prep)
    if opts.calibration:
        holdout = 0 if valid is not None else min(100, max(20, opts.calibration_samples // 4))
        progress(f"loading calibration data from {opts.calibration}")
        data = load_dataset(opts.calibration, source.inputs, limit=opts.calibration_samples + holdout,
                            image_prep=opts.image_prep)
        if valid is None:
            holdout = min(holdout, len(data) // 5) if len(data) >= 2 else 0
            calib, valid = data.split(holdout) if holdout else (data, data)
            if not holdout:
                calib.notes.append("too few samples to hold some out: validation reuses calibration data")
        else:
            calib = data
        if len(calib) < 10 and needs_calib:
            progress(f"warning: only {len(calib)} calibration samples; use ~100-500 representative ones")
    elif needs_calib:
        raise CalibrationError(
            "int8/int16x8 quantization needs calibration data and none was given",
            hint="pass --calibration data.npz (one array per model input, first axis = samples), "
                 "a folder of images, or --calibration random (smoke tests only: not fit for production)")
    if valid is None:
        valid = random_dataset(source.inputs, n=16)
        valid.notes.append("no validation or calibration data: figures use random inputs")
    return calib, valid


def _data_info(d: Dataset | None) -> dict | None:
    if d is None:
        return None
    return {"source": d.source, "samples": len(d), "sha256": d.sha256, "random": d.random,
            "labels": d.labels is not None, "notes": d.notes}


def _host_runtime(path: Path, profile: TargetProfile, fmt: Format):
    """The device's runtime, on this host: accelerators it lacks are left out."""
    delegates = tuple(d for d in profile.delegates if d != "edgetpu")
    return load_runtime(path, fmt=fmt.value, threads=profile.threads, delegates=delegates,
                        providers=("CPUExecutionProvider",))


def _baseline(source: Source, profile: TargetProfile, shared: dict, opts: BuildOptions, sample: dict) -> dict:
    """fp32 model of the target's format: its size and host latency (once per format and threads)."""
    key = ("baseline", profile.format, profile.threads)
    if key in shared:
        return shared[key]
    art_key = ("fp32_artifact", profile.format)
    if art_key not in shared:
        d = Path(shared["workdir"]) / f"fp32-{profile.format.value}"
        d.mkdir(parents=True, exist_ok=True)
        if source.kind is SourceKind.TFLITE:
            path = source.path
        else:
            ctx = ConvertContext(source=source, profile=profile, precision=Precision.FP32, out_dir=d,
                                 allow_flex=opts.allow_flex, opset=opts.opset, shared=shared)
            path = get_converter(source.kind.value, profile.format, Precision.FP32)(ctx).path
        shared[art_key] = path
    path = shared[art_key]
    rt = _host_runtime(path, profile, profile.format)
    feeds = rt.prepare(sample)
    stats = measure(lambda: rt.run(feeds), warmup=5, runs=opts.bench_runs, max_seconds=opts.bench_seconds)
    shared[key] = {"size_bytes": path.stat().st_size, "latency": stats.to_dict()}
    return shared[key]


def _build_target(opts: BuildOptions, *, name: str, source: Source, profile: TargetProfile, precision: Precision,
                  calib: Dataset | None, valid: Dataset, reference: list, shared: dict, work: Path,
                  progress: Progress, signer=None) -> TargetResult:
    if getattr(source, "edgetpu_compiled", False):
        raise InputError(f"{source.path.name} is already compiled for the Edge TPU; edgepack cannot validate it here",
                         hint="build from the uncompiled int8 model on a host with edgetpu_compiler on PATH: "
                              "edgepack compiles it and validates the int8 model it came from")
    work.mkdir(parents=True, exist_ok=True)
    findings = lint.lint_source(source, profile)
    _fail_on(findings, profile)
    ctx = ConvertContext(
        source=source, profile=profile, precision=precision, out_dir=work, calibration=calib,
        allow_flex=opts.allow_flex, opset=opts.opset,
        per_channel=profile.per_channel if opts.per_channel is None else opts.per_channel,
        calibration_method=opts.calibration_method or profile.calibration_method, shared=shared)
    art: Artifact = get_converter(source.kind.value, profile.format, precision)(ctx)
    warnings: list[str] = []
    tpu = None
    if "edgetpu" in profile.delegates and profile.edgetpu_compile:
        progress(f"[{profile.name}] edgetpu_compiler")
        tpu = edgetpu.compile_model(art.path, work, name=name, version=opts.version)
        if not tpu.compiled:
            warnings.append(tpu.instructions)
    # Measure on the host with the device's runtime. An Edge-TPU-compiled model cannot run
    # here, so its numbers come from the same int8 model before compilation.
    try:
        rt = _host_runtime(art.path, profile, profile.format)
    except RuntimeUnavailableError:
        if not (opts.allow_flex and _has_flex(art)):
            raise
        rt = None  # stock runtimes lack the Flex delegate: package it, clearly unvalidated
    inputs, outputs = _tensor_specs(rt, source, art)
    if profile.format is Format.TFLITE:
        findings += lint.lint_tflite(art.path.read_bytes(), profile, allow_flex=opts.allow_flex,
                                     inputs=inputs, outputs=outputs)
    else:
        findings += lint.lint_onnx(art.path, profile)
    _fail_on(findings, profile)
    accuracy, got, stats, base, ratio = None, [], None, None, None
    if rt is None:
        warnings.append("NOT VALIDATED: no runtime on this host can run its Flex ops, so there are no accuracy "
                        "or latency figures and no golden outputs; the device needs LiteRT with the Flex delegate")
    else:
        progress(f"[{profile.name}] validating on {len(valid)} samples")
        got = [rt.infer(s) for s in valid.samples]
        accuracy = _check_accuracy(opts, profile, precision, reference, got, [o.name for o in outputs], valid)
        progress(f"[{profile.name}] measuring latency")
        base = _baseline(source, profile, shared, opts, valid.samples[0])
        feeds = rt.prepare(valid.samples[0])  # native dtypes: the timing is the model's, not our I/O conversion
        stats = measure(lambda: rt.run(feeds), warmup=5, runs=opts.bench_runs, max_seconds=opts.bench_seconds)
        ratio = stats.p50_ms / base["latency"]["p50_ms"] if base["latency"]["p50_ms"] else None
        rt.close()
    if precision in QUANTIZED and profile.is_cpu and ratio and ratio > 1.0:
        warnings.append(f"SLOWER THAN FP32: this {precision.value} bundle runs at {ratio:.2f}x the fp32 latency on "
                        f"this host ({stats.p50_ms:.3f} ms vs {base['latency']['p50_ms']:.3f} ms); "
                        "measure on the device, or use fp32/fp16 (or int8 for TFLite)")
    if calib is not None and calib.random and precision in CALIBRATED:
        warnings.append("calibrated on RANDOM data: this bundle is not fit for production")
    if valid.random:
        warnings.append("accuracy figures come from random inputs (no validation data given)")
    if accuracy and accuracy["accuracy_drop_points"] is None:
        warnings.append("the primary output is not class scores: see max abs error and cosine similarity")
    final_model = tpu.model if tpu is not None and tpu.compiled else art.path
    model_name = "model_edgetpu.tflite" if final_model != art.path else art.path.name
    files = {model_name: final_model}
    golden = None
    if got:
        golden_in, golden_out = valid.samples[:GOLDEN_COUNT], got[:GOLDEN_COUNT]
        gpath = work / "golden.npz"
        arrays = {f"input.{i}.{k}": v for i, s in enumerate(golden_in) for k, v in s.items()}
        arrays.update({f"output.{i}.{k}": np.asarray(v) for i, s in enumerate(golden_out) for k, v in s.items()})
        np.savez(gpath, **arrays)
        files["golden.npz"] = gpath
        golden = {"file": "golden.npz", "count": len(golden_in),
                  "atol": golden_tolerance(precision.value, golden_out), "rtol": 0.0}
    if opts.labels:
        files["labels.txt"] = Path(opts.labels)
    report = {
        "format": profile.format.value, "precision": precision.value,
        "size_bytes": {"model": final_model.stat().st_size, "fp32_model": base and base["size_bytes"]},
        "size_ratio": base and round(final_model.stat().st_size / base["size_bytes"], 4),
        "latency_ms": base and {"fp32": base["latency"], "bundle": stats.to_dict(),
                                "p50_ratio": ratio and round(ratio, 4), "host": platform.machine(),
                                "runtime": rt.details},
        "accuracy": accuracy, "lint": [f.to_dict() for f in findings], "warnings": warnings,
        "quantization": art.quantization, "edgetpu": tpu.to_dict() if tpu else None,
    }
    production_ready = rt is not None and not (valid.random or (calib is not None and calib.random
                                                                and precision in CALIBRATED))
    manifest = Manifest(
        name=name, version=opts.version,
        target={"name": profile.name, "sha256": profile.sha256, "profile": profile.to_dict()},
        format=profile.format.value, precision=precision.value, model_file=model_name,
        inputs=inputs, outputs=outputs, runtime=_runtime_section(profile, tpu, findings),
        quantization=dict(art.quantization, precision=precision.value),
        preprocessing=_preprocessing(opts), provenance=_provenance(source, calib, valid),
        report=report, golden=golden,
        labels_file="labels.txt" if "labels.txt" in files else None,
        production_ready=production_ready, warnings=tuple(warnings))
    dest = Path(opts.out_dir) / manifest.file_name
    progress(f"[{profile.name}] writing {dest}")
    write_bundle(dest, manifest, files, signer=signer)
    report["signed"] = signer is not None
    report["size_bytes"]["bundle"] = dest.stat().st_size
    return TargetResult(target=profile.name, ok=True, bundle=dest, report=report)


def _fail_on(findings: list, profile: TargetProfile) -> None:
    errs = lint.errors(findings)
    if errs:
        err = UnsupportedOpError(f"{profile.name}: " + "; ".join(f.message for f in errs),
                                 hint="see `edgepack targets show " + profile.name + "` for what this target needs")
        err.findings = findings
        raise err


def _gate_hint(profile: TargetProfile, precision: Precision) -> str:
    if profile.format is Format.ONNX:
        return ("try per-channel quantization (--per-channel), another --calibration-method (entropy, percentile), "
                "more representative calibration data, or --quantize fp16")
    return ("try more representative calibration data (--calibration-samples 500), --quantize int16x8 or fp16, "
            "or keep sensitive layers in float (quantization-aware training)")


def _tensor_specs(rt, source: Source, art: Artifact) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Manifest specs from the runtime (dtypes, quantization) with the source's resolved shapes;
    from the flatbuffer when no runtime here can run the model."""
    resolved = {s.name: s.shape for s in source.inputs}
    if rt is None:
        from packager.formats.tflite import describe_flatbuffer

        ins_info, outs_info = describe_flatbuffer(art.path.read_bytes())
        out_shapes = {t.name: tuple(max(d, 1) for d in t.shape) for t in outs_info}
    else:
        ins_info, outs_info = rt.inputs, rt.outputs
        probe = rt.infer({s.name: np.zeros(s.shape, s.dtype) for s in source.inputs}, raw=True)
        out_shapes = {k: v.shape for k, v in probe.items()}

    def spec(t, shape) -> TensorSpec:
        q = Quantization(t.scale, t.zero_point) if t.quantized else None
        return TensorSpec(name=t.name, shape=tuple(shape), dtype=t.dtype, shape_signature=tuple(t.shape), quantization=q)

    ins = tuple(spec(t, resolved.get(t.name, tuple(max(d, 1) for d in t.shape))) for t in ins_info)
    outs = tuple(spec(t, out_shapes[t.name]) for t in outs_info)
    return ins, outs


def _has_flex(art: Artifact) -> bool:
    from packager.formats.tflite import ops_with_versions

    return art.format is Format.TFLITE and any(n.startswith("Flex") for n, _ in ops_with_versions(art.path.read_bytes()))


def _check_accuracy(opts: BuildOptions, profile: TargetProfile, precision: Precision, reference: list, got: list,
                    names: list[str], valid: Dataset) -> dict:
    missing = [n for n in names if n not in reference[0]]
    if missing:
        raise InputError(f"bundle outputs {missing} do not match the reference outputs {sorted(reference[0])}")
    accuracy = compare(reference, got, names, valid.labels)
    nan = sum(o["nan_or_inf"] for o in accuracy["outputs"].values())
    if nan:
        raise AccuracyGateError(f"{profile.name}: the {precision.value} model produced {nan} NaN/Inf values",
                                hint="try fp16 or fp32, or check the calibration data's range")
    drop = accuracy["accuracy_drop_points"]
    if opts.max_accuracy_drop is not None and drop is not None and drop > opts.max_accuracy_drop:
        raise AccuracyGateError(
            f"{profile.name} {precision.value}: {accuracy['drop_metric']} dropped {drop:.2f} points, "
            f"over --max-accuracy-drop {opts.max_accuracy_drop}; no bundle written",
            hint=_gate_hint(profile, precision))
    return accuracy


def _runtime_section(profile: TargetProfile, tpu, findings) -> dict:
    return {"name": profile.runtime, "min_version": profile.min_runtime_version, "threads": profile.threads,
            "delegates": list(profile.delegates), "providers": list(profile.providers),
            "tensorrt_fp16": profile.tensorrt_fp16, "tensorrt_engine_cache": profile.tensorrt_engine_cache,
            "cpu_fallback": profile.cpu_fallback,
            "flex": any(f.code == "flex-ops" for f in findings),
            "edgetpu_compiled": bool(tpu and tpu.compiled) if "edgetpu" in profile.delegates else None}


def _preprocessing(opts: BuildOptions) -> dict:
    d = {"layout": "as the model's inputs"}
    if opts.calibration and Path(opts.calibration).is_dir():
        d["image"] = opts.image_prep.to_dict()
    return d


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("edgepack", "tensorflow-cpu", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _provenance(source: Source, calib: Dataset | None, valid: Dataset) -> dict:
    return {"source_model": {"file": source.path.name, "format": source.kind.value, "sha256": source.sha256},
            "calibration": _data_info(calib), "validation": _data_info(valid),
            "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "python": platform.python_version()}}
