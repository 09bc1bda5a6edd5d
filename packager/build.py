"""`edgepack build` as a library: one model, several targets, shared work.

The model, TensorFlow, the data and the float reference are loaded once; each target then
walks its candidates (packager/steps.py) and either writes its bundle atomically or fails
with nothing written. Work the targets share (float models, calibration, the host timing
worker) lives in a BuildCache."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebundle.errors import CalibrationError, EdgepackError, InputError
from edgebundle.manifest import parse_version
from packager.cache import BuildCache
from packager.candidates import CALIBRATED, Search, ladder
from packager.data import (RANDOM, Dataset, ImagePreprocessing, is_images, random_dataset, read_arrays,
                           require_float_inputs, to_dataset)
from packager.evaluate import Gate
from packager.sources import ReferenceFailed, Source, SourceKind, load_source, resolve_shapes
from packager.timing import HostTimer
from targets import CalibrationMethod, Precision, load_profile

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    model: Path
    targets: tuple[str, ...]
    out_dir: Path
    precision: Precision = Precision.AUTO
    search: Search = Search.FIRST
    calibration: str | None = None  # path or "random"
    calibration_samples: int = 200
    validation: str | None = None
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    accuracy_gate: bool = True
    max_accuracy_drop: float = 1.0  # points (accuracy with labels, else top-1 agreement)
    min_similarity: float = 0.99  # cosine, for outputs that are not class scores
    allow_flex: bool = False
    name: str | None = None
    version: str = "1.0.0"
    opset: int = 17
    per_channel: bool | None = None  # None = the profile's choice
    calibration_method: CalibrationMethod | None = None
    image_prep: ImagePreprocessing = ImagePreprocessing()
    labels: Path | None = None
    bench_seconds: float = 2.0  # time budget of each interleaved candidate-vs-fp32 timing
    bench_runs: int = 400  # most interleaved rounds per timing
    sign_key: Path | None = None  # Ed25519 private key: bundles are written signed
    profile_on: object | None = None  # packager.device_profile.DeviceTarget: the device's timings decide

    @property
    def gate(self) -> Gate:
        return Gate(enabled=self.accuracy_gate, max_drop=self.max_accuracy_drop, min_similarity=self.min_similarity)


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
    name: str = ""
    version: str = ""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        return {"schema": "edgepack.build-report/2", "model": self.model, "source_format": self.source_format,
                "ok": self.ok, "seconds": round(self.seconds, 2), "shared": self.shared,
                "targets": [r.to_dict() for r in self.results]}


@dataclass
class Shared:
    """What every target of one build reads."""

    opts: BuildOptions
    name: str
    source: Source
    calib: Dataset | None
    valid: Dataset
    reference: list[dict]
    cache: BuildCache
    progress: Progress
    signer: Callable[[bytes], bytes] | None


def build(opts: BuildOptions, *, progress: Progress = lambda _m: None) -> BuildResult:
    from packager.steps import TargetBuild

    from packager.registry import check_pair
    from packager.sources import detect_kind

    t0 = time.perf_counter()
    _check(opts)
    profiles = [load_profile(t) for t in opts.targets]  # fail fast, before TensorFlow loads
    kind = detect_kind(Path(opts.model))
    for p in profiles:
        check_pair(kind.value, p.format)
    signer = _signer(opts.sign_key)
    name = opts.name or _default_name(opts.model)
    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp, HostTimer(Path(tmp) / "timing") as timer:
        work = Path(tmp)
        if any(p.is_cpu for p in profiles):  # CPU targets are timed on this host
            timer.start()
        progress(f"loading {opts.model}")
        source = load_source(opts.model, workdir=work)
        calib, valid = _datasets(opts, source, profiles, progress)
        progress(f"float reference on {len(valid)} validation samples")
        reference = _reference(source, valid)
        env = Shared(opts=opts, name=name, source=source, calib=calib, valid=valid, reference=reference,
                     cache=BuildCache(workdir=work / "cache", timer=timer), progress=progress, signer=signer)
        plans = [TargetBuild(env, p, work / p.name) for p in profiles]
        for tb in plans:  # what no target can build is bad input: fail before any conversion
            tb.plan()
        results = []
        for tb, profile in zip(plans, profiles):
            try:
                results.append(tb.run())
            except EdgepackError as e:
                progress(f"[{profile.name}] FAILED: {str(e).splitlines()[0]}")
                trials = getattr(e, "trials", [])
                report = {"format": profile.format.value, "candidates": [t.to_dict() for t in trials],
                          "sensitivity": next((t.sensitivity for t in reversed(trials) if t.sensitivity), [])}
                results.append(TargetResult(target=profile.name, ok=False, error=str(e), error_kind=type(e).__name__,
                                            exc=e, report=report))
        info = {"calibration": data_info(calib), "validation": data_info(valid), "gate": opts.gate.to_dict(),
                "search": opts.search.value,
                "profiled_on": opts.profile_on.device if opts.profile_on is not None else None,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in source.inputs]}
        return BuildResult(model=str(opts.model), source_format=source.kind.value, results=results,
                           seconds=time.perf_counter() - t0, shared=info, name=name, version=opts.version)


def _check(opts: BuildOptions) -> None:
    if not opts.targets:
        raise InputError("no --target given", hint="e.g. --target arm-cpu (see: edgepack targets list)")
    try:
        parse_version(opts.version)
    except EdgepackError as e:
        raise InputError(f"--version: {e}", hint=e.hint) from None
    if opts.calibration_samples < 1:
        raise InputError("--calibration-samples must be at least 1")
    if not 0 <= opts.max_accuracy_drop <= 100:
        raise InputError(f"--max-accuracy-drop {opts.max_accuracy_drop} is not between 0 and 100 points")
    if not 0 < opts.min_similarity <= 1:
        raise InputError(f"--min-similarity {opts.min_similarity} is not in (0, 1]", hint="e.g. 0.99")


def _signer(key_path: Path | None):
    if not key_path:
        return None
    from edgebundle import signing

    key = signing.load_private_key(key_path)
    return lambda manifest_bytes: signing.sign(manifest_bytes, key)


def _default_name(model: Path) -> str:
    stem = Path(model).name if Path(model).is_dir() else Path(model).stem
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".-") or "model"


def _needs_calibration(opts: BuildOptions, source: Source, profiles) -> bool:
    """Only when every candidate a target could try needs it (an explicit int8, or Coral)."""
    if source.kind is SourceKind.TFLITE:
        return False
    return any(all(s.precision in CALIBRATED for s in ladder(p, opts.precision)) for p in profiles)


def _datasets(opts: BuildOptions, source: Source, profiles, progress: Progress) -> tuple[Dataset | None, Dataset]:
    """Read the data, let its shapes fix the model's dynamic dimensions, then fit the samples."""
    if _needs_calibration(opts, source, profiles) and not opts.calibration:
        raise CalibrationError(
            "int8/int16x8 quantization needs calibration data and none was given",
            hint="pass --calibration data.npz (one array per model input, first axis = samples), "
                 "a folder of images, or --calibration random (smoke tests only: not fit for production)")
    holdout = 0 if opts.validation else min(100, max(20, opts.calibration_samples // 4))
    read = {}
    for what, spec, limit in (("validation", opts.validation, None),
                              ("calibration", opts.calibration, opts.calibration_samples + holdout)):
        if spec and spec != RANDOM and not is_images(spec):
            progress(f"loading {what} data from {spec}")
            read[what] = read_arrays(spec, source.inputs, what=what, limit=limit)
    shapes = (read.get("validation") or read.get("calibration"))
    if shapes is None and not is_images(opts.validation) and not is_images(opts.calibration):
        require_float_inputs(source.inputs)  # no data at all: say so before asking for shapes
    resolve_shapes(source.inputs, dict(opts.input_shapes), data=shapes.sample_shapes() if shapes else None)
    for what, spec, limit in (("validation", opts.validation, None),
                              ("calibration", opts.calibration, opts.calibration_samples + holdout)):
        if is_images(spec):  # resized to the input's resolved size
            progress(f"loading {what} images from {spec}")
            read[what] = read_arrays(spec, source.inputs, what=what, limit=limit, image_prep=opts.image_prep)
    valid = to_dataset(read["validation"], source.inputs) if "validation" in read else None
    calib = None
    if opts.calibration == RANDOM:
        calib = random_dataset(source.inputs, n=opts.calibration_samples)
    elif "calibration" in read:
        calib = to_dataset(read["calibration"], source.inputs)
        if valid is None:
            holdout = min(holdout, len(calib) // 5) if len(calib) >= 2 else 0
            if holdout:
                calib, valid = calib.split(holdout)
            else:
                valid = calib
                calib.notes.append("too few samples to hold some out: validation reuses calibration data")
        if len(calib) < 10:
            progress(f"warning: only {len(calib)} calibration samples; use ~100-500 representative ones")
    if valid is None:
        valid = random_dataset(source.inputs, n=16)
        valid.notes.append("no validation or calibration data: figures use random inputs")
    return calib, valid


def _reference(source: Source, valid: Dataset) -> list[dict]:
    out = []
    for i, sample in enumerate(valid.samples):
        try:
            out.append(source.reference(sample))
        except ReferenceFailed as e:
            raise ReferenceFailed(f"validation sample {i}: {str(e).splitlines()[0]}") from None
    return out


def data_info(d: Dataset | None) -> dict | None:
    if d is None:
        return None
    return {"source": d.source, "samples": len(d), "sha256": d.sha256, "random": d.random,
            "labels": d.labels is not None, "notes": d.notes}
