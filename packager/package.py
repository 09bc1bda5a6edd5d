"""The last step of a target: the chosen candidate, finished for the device (Edge TPU
compile), with its golden outputs, report and manifest, written atomically as a bundle."""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgebundle.archive import write_bundle
from edgebundle.manifest import Manifest
from packager.build import TargetResult, data_info
from packager.candidates import CALIBRATED, Trial
from packager.evaluate import golden_tolerance
from targets import Precision

GOLDEN_COUNT = 3


def package(tb, chosen: Trial, trials: list[Trial]) -> TargetResult:
    env, opts, profile = tb.env, tb.opts, tb.profile
    art = chosen.artifact
    finished = tb.backend.finish(art, profile, tb.work, name=env.name, version=opts.version)
    latency = chosen.latency or (tb.latency(art, baseline=True) if profile.is_cpu and chosen.accuracy is not None
                                 else {"not_timed": _why_not_timed(profile, chosen)})
    base = tb.backend.fp32(tb._ctx(chosen.candidate))
    warnings = _warnings(tb, chosen, trials, latency, base) + list(finished.warnings)
    files = {finished.name: finished.path}
    golden = None
    if chosen.outputs:
        gpath = tb.work / "golden.npz"
        samples, outs = env.valid.samples[:GOLDEN_COUNT], chosen.outputs[:GOLDEN_COUNT]
        arrays = {f"input.{i}.{k}": v for i, s in enumerate(samples) for k, v in s.items()}
        arrays.update({f"output.{i}.{k}": np.asarray(v) for i, s in enumerate(outs) for k, v in s.items()})
        np.savez(gpath, **arrays)
        files["golden.npz"] = gpath
        golden = {"file": "golden.npz", "count": len(samples),
                  "atol": golden_tolerance(chosen.candidate.precision.value, outs), "rtol": 0.0}
    if opts.labels:
        files["labels.txt"] = Path(opts.labels)
    size = finished.path.stat().st_size
    report = {
        "format": profile.format.value, "precision": chosen.candidate.precision.value,
        "candidate": chosen.candidate.label, "choice": chosen.why,
        "size_bytes": {"model": size, "fp32_model": base.stat().st_size},
        "size_ratio": round(size / base.stat().st_size, 4), "latency_ms": latency,
        "device_latency": chosen.device_latency,
        "accuracy": chosen.accuracy, "gate": opts.gate.to_dict(),
        "candidates": [t.to_dict() for t in trials], "lint": [f.to_dict() for f in chosen.findings],
        "warnings": warnings, "quantization": art.quantization, "edgetpu": finished.compile_report,
        "sensitivity": next((t.sensitivity for t in reversed(trials) if t.sensitivity), []),
        "fp32_sha256": _sha256(base),
    }
    calib = env.calib if chosen.candidate.precision in CALIBRATED else None
    production_ready = chosen.accuracy is not None and not (env.valid.random or (calib is not None and calib.random))
    manifest = Manifest(
        name=env.name, version=opts.version,
        target={"name": profile.name, "sha256": profile.sha256, "profile": profile.to_dict()},
        format=profile.format.value, precision=chosen.candidate.precision.value, model_file=finished.name,
        inputs=chosen.specs[0], outputs=chosen.specs[1], runtime=_runtime_section(profile, finished, chosen.findings),
        quantization=dict(art.quantization, precision=chosen.candidate.precision.value),
        preprocessing=_preprocessing(opts), provenance=_provenance(env),
        report=report, golden=golden, labels_file="labels.txt" if "labels.txt" in files else None,
        production_ready=production_ready, warnings=tuple(warnings))
    dest = Path(opts.out_dir) / manifest.file_name
    tb.say(f"{chosen.candidate.label}: writing {dest}")
    write_bundle(dest, manifest, files, signer=env.signer)
    report["signed"] = env.signer is not None
    report["size_bytes"]["bundle"] = dest.stat().st_size
    return TargetResult(target=profile.name, ok=True, bundle=dest, report=report)


def _why_not_timed(profile, chosen: Trial) -> str:
    if chosen.accuracy is None:
        return "no runtime on this host can run this model"
    accel = [x for x in profile.delegates + profile.providers if x in ("edgetpu", "TensorrtExecutionProvider",
                                                                      "CUDAExecutionProvider")]
    return (f"{profile.name} runs this model on {accel[0]}; the host's CPU cannot say how fast it will be "
            "(measure on the device: edgepack-agent bench)")


def _warnings(tb, chosen: Trial, trials: list[Trial], latency: dict, base: Path) -> list[str]:
    env, prec = tb.env, chosen.candidate.precision
    out = []
    r = latency.get("ratio") or {}
    if r.get("verdict") == "slower" and prec is not Precision.FP32:
        out.append(f"SLOWER THAN FP32: this {chosen.candidate.label} bundle runs at {r['median']:.2f}x the fp32 latency "
                   f"on this host (inter-quartile {r['q1']:.2f}-{r['q3']:.2f}x); use --quantize auto to let the "
                   "measurement choose, or measure on the device")
    size, fp32_size = chosen.artifact.path.stat().st_size, base.stat().st_size
    if prec is not Precision.FP32 and size > fp32_size:
        out.append(f"the {chosen.candidate.label} model is LARGER than fp32 ({size / fp32_size:.2f}x): what the "
                   "conversion adds (scales, Q/DQ or Cast nodes) outweighs the smaller weights, as in tiny models")
    skipped = [t.step.label for t in trials if t.verdict == "skipped" and "calibration" in t.why]
    if skipped:
        out.append(f"{', '.join(skipped)} not tried: no calibration data (pass --calibration to let auto try them)")
    if chosen.accuracy is None:
        out.append("NOT VALIDATED: no runtime on this host can run its Flex ops, so there are no accuracy or latency "
                   "figures and no golden outputs; the device needs LiteRT with the Flex delegate")
    if env.calib is not None and env.calib.random and prec in CALIBRATED:
        out.append("calibrated on RANDOM data: this bundle is not fit for production")
    if env.valid.random:
        out.append("accuracy figures come from random inputs (no validation data given)")
    if not tb.opts.accuracy_gate:
        out.append("the accuracy gate was switched OFF (--no-accuracy-gate): nothing checked this bundle's accuracy")
    return out


def _sha256(path: Path) -> str:
    from edgebundle.archive import sha256_file

    return sha256_file(path)


def _runtime_section(profile, finished, findings) -> dict:
    compiled = bool(finished.compile_report and finished.compile_report.get("compiled"))
    return {"name": profile.runtime, "min_version": profile.min_runtime_version, "threads": profile.threads,
            "delegates": list(profile.delegates), "providers": list(profile.providers),
            "tensorrt_fp16": profile.tensorrt_fp16, "tensorrt_engine_cache": profile.tensorrt_engine_cache,
            "cpu_fallback": profile.cpu_fallback,
            "flex": any(f.code == "flex-ops" for f in findings),
            "edgetpu_compiled": compiled if "edgetpu" in profile.delegates else None}


def _preprocessing(opts) -> dict:
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


def _provenance(env) -> dict:
    src = env.source
    return {"source_model": {"file": src.path.name, "format": src.kind.value, "sha256": src.sha256},
            "calibration": data_info(env.calib), "validation": data_info(env.valid),
            "versions": _versions(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": {"machine": platform.machine(), "python": platform.python_version()}}
