"""The last step of a target: the Chosen candidate, already finished for the device, with its
golden outputs, report and manifest (packager/contents.py), written atomically as a bundle."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from edgebundle.archive import sha256_file, write_bundle
from packager import contents
from packager.data import data_info
from packager.options import BuildInputs, BuildOptions
from packager.figures import Speed
from packager.results import Chosen, TargetReport, TargetResult, Verdict
from packager.sequence import Plan, share_weights
from targets import Precision


def package(chosen: Chosen, inputs: BuildInputs, seq: Plan = Plan()) -> TargetResult:
    """The bundle, written once its report is complete; the result carries both."""
    opts, profile, trial, finished = inputs.opts, chosen.profile, chosen.trial, chosen.finished
    art, precision = trial.artifact, trial.candidate.precision
    main, seq = share_weights(seq, finished.path, chosen.work / "shared" / finished.name,
                              compiled=finished.compiled is not None)
    warnings = _warnings(chosen, inputs) + list(finished.warnings) + list(seq.notes)  # share_weights' note too
    files = {finished.name: main, **{b.file: b.path for b in seq.buckets if b.signature is None}}
    model_bytes = main.stat().st_size + sum(b.path.stat().st_size for b in seq.buckets if b.signature is None)
    golden = None
    if trial.outputs:
        gpath = chosen.work / "golden.npz"
        golden = contents.write_golden(gpath, inputs.fed(trial.specs[0]), trial.outputs, precision=precision.value,
                                       buckets=seq.buckets)
        files["golden.npz"] = gpath
    text = inputs.source.text
    if opts.labels:
        files["labels.txt"] = Path(opts.labels)
    elif text is not None and text.labels:  # a classifier's id2label
        files["labels.txt"] = chosen.work / "labels.txt"
        files["labels.txt"].write_text("".join(f"{name}\n" for name in text.labels))
    if text is not None:
        files["tokenizer.json"] = text.tokenizer
    report = TargetReport(
        format=profile.format, precision=precision, candidate=trial.candidate.label, choice=trial.why,
        model_bytes=model_bytes, bucket_bytes=model_bytes - finished.path.stat().st_size,
        fp32_bytes=chosen.fp32.stat().st_size,
        latency=chosen.latency,
        device_latency=trial.device_latency, accuracy=trial.accuracy, gate=opts.gate, trials=chosen.trials,
        lint=trial.findings, warnings=tuple(warnings), quantization=art.quantization,
        compile_report=finished.compile_report, fp32_sha256=sha256_file(chosen.fp32),
        sequence=_sequence_report(seq) if seq.buckets or seq.notes or seq.trt_profile else None,
        signed=inputs.signer is not None)
    calib = inputs.calib if chosen.calibrated else None
    production_ready = trial.accuracy is not None and not (inputs.valid.random or (calib is not None and calib.random))
    manifest = contents.manifest(
        profile, name=inputs.name, version=opts.version, precision=precision.value, model_file=finished.name,
        specs=trial.specs, golden=golden, flex=any(f.code == "flex-ops" for f in trial.findings),
        compiled=finished.compiled, quantization=dict(art.quantization, precision=precision.value),
        preprocessing=_preprocessing(opts), provenance=_provenance(inputs), report=report.to_dict(),
        labels_file="labels.txt" if "labels.txt" in files else None, production_ready=production_ready,
        warnings=tuple(warnings), trt_profile=seq.trt_profile, memory_bytes=chosen.latency.memory,
        text=contents.text_section(text, settings=seq.settings(text.settings), buckets=seq.buckets)
        if text is not None else None, drift=_drift(inputs))
    dest = Path(opts.out_dir) / manifest.file_name
    inputs.progress(f"[{profile.name}] {trial.candidate.label}: writing {dest}")
    write_bundle(dest, manifest, files, signer=inputs.signer)
    return TargetResult(target=profile.name, ok=True, format=profile.format, bundle=dest, built=report,
                        bundle_bytes=dest.stat().st_size)


def _drift(inputs) -> dict | None:
    """Reference statistics for drift on the device: the calibration and validation inputs, and the
    float model's outputs on the validation inputs (edgeruntime.drift). None for random data."""
    from edgeruntime.drift import reference

    data = [d for d in (inputs.calib, inputs.valid) if d is not None and not d.random]
    samples = [s for d in data for s in d.samples]
    if not samples or not inputs.reference:
        return None
    def stacked(arrays: list) -> np.ndarray:  # samples of batch 1 side by side, as requests arrive
        arrays = [np.asarray(a) for a in arrays]
        return np.concatenate(arrays) if all(a.ndim and a.shape[0] == 1 for a in arrays) else np.stack(arrays)

    try:
        ins = [reference(name, stacked([s[name] for s in samples])).to_dict() for name in samples[0]]
        outs = [reference(name, stacked([r[name] for r in inputs.reference]), output=True).to_dict()
                for name in inputs.reference[0]]
    except (ValueError, KeyError, TypeError, IndexError):  # ragged samples (dynamic shapes), odd dtypes:
        return None  # no reference, no drift score; never a failed build
    return {"statistic": "psi", "inputs": ins, "outputs": outs}


def _sequence_report(seq: Plan) -> dict:
    """The report's view of the sequence plan: each bucket's size and accuracy, what was left out."""
    return {"buckets": [{"length": b.length, "file": b.file, "signature": b.signature,
                         "size_bytes": b.path.stat().st_size if b.own_bytes is None else b.own_bytes,
                         "validated_on": b.accuracy.samples, "cosine_similarity": b.accuracy.cosine_similarity,
                         "accuracy_drop_points": b.accuracy.accuracy_drop_points} for b in seq.buckets],
            "left_out": list(seq.notes), "tensorrt_profile": seq.trt_profile}


def _warnings(chosen: Chosen, inputs: BuildInputs) -> list[str]:
    trial = chosen.trial
    prec, label = trial.candidate.precision, trial.candidate.label
    out = []
    r = chosen.latency.ratio
    if r is not None and r.verdict is Speed.SLOWER and prec is not Precision.FP32:
        out.append(f"SLOWER THAN FP32: this {label} bundle runs at {r.median:.2f}x the fp32 latency "
                   f"on this host (inter-quartile {r.q1:.2f}-{r.q3:.2f}x); use --quantize auto to let the "
                   "measurement choose, or measure on the device")
    size, fp32_size = trial.artifact.path.stat().st_size, chosen.fp32.stat().st_size
    if prec is not Precision.FP32 and size > fp32_size:
        out.append(f"the {label} model is LARGER than fp32 ({size / fp32_size:.2f}x): what the "
                   "conversion adds (scales, Q/DQ or Cast nodes) outweighs the smaller weights, as in tiny models")
    skipped = [t.step.label for t in chosen.trials if t.verdict is Verdict.SKIPPED and "calibration" in t.why]
    if skipped:
        out.append(f"{', '.join(skipped)} not tried: no calibration data (pass --calibration to let auto try them)")
    if trial.accuracy is None:
        out.append("NOT VALIDATED: no runtime on this host can run its Flex ops, so there are no accuracy or latency "
                   "figures and no golden outputs; the device needs LiteRT with the Flex delegate")
    if inputs.calib is not None and inputs.calib.random and chosen.calibrated:
        out.append("calibrated on RANDOM data: this bundle is not fit for production")
    if inputs.valid.random:
        out.append("accuracy figures come from random inputs (no validation data given)")
    out += inputs.data_warnings
    if not inputs.opts.accuracy_gate:
        out.append("the accuracy gate was switched OFF (--no-accuracy-gate): nothing checked this bundle's accuracy")
    return out


def _preprocessing(opts: BuildOptions) -> dict:
    d = {"layout": "as the model's inputs"}
    if opts.calibration and Path(opts.calibration).is_dir():
        d["image"] = opts.image_prep.to_dict()
    return d


def _versions() -> dict:
    out = {}
    for dist in ("edgepack", "tensorflow-cpu", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "ai-edge-litert", "numpy", "torch",
                 "transformers", "tokenizers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _provenance(inputs: BuildInputs) -> dict:
    src = inputs.source
    return {"source_model": {"file": (src.origin_path or src.path).name, "format": src.format_name,
                             "sha256": src.sha256},
            "calibration": data_info(inputs.calib), "validation": data_info(inputs.valid),
            "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "python": platform.python_version()}}
