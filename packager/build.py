"""`edgepack build` as a library: one model, several targets, shared work.

The model, TensorFlow, the data and the float reference are loaded once (BuildInputs); each
target then walks its candidates (packager/steps.py) and hands the one it keeps to packaging
(packager/package.py), or fails with nothing written. Work the targets share (float models,
calibration, the host timing worker) lives in a BuildCache."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgebundle.errors import CalibrationError, EdgepackError, InputError
from edgebundle.manifest import parse_version
from edgeruntime.text import Role, TextSettings
from packager.cache import BuildCache
from packager.data import (RANDOM, Dataset, align_texts, check_outputs, data_info, is_images, random_dataset,
                           read_arrays, require_float_inputs, to_dataset)
from packager.formats import backend_for, check_pair
from packager.options import BuildInputs, BuildOptions, Progress
from packager import sequence
from packager.package import package
from packager.profiles import load_profile
from packager.results import BuildResult, Failed, TargetResult, Trial
from packager.sources import (InputSpec, ReferenceFailed, Source, SourceKind, TextInfo, attach_tokenizer, detect_kind,
                              load_source, resolve_shapes)
from packager.steps import CandidateSearch, fail_on
from packager.store import digest_path, digest_samples, open_store
from packager.timing import HostTimer
from targets import TargetProfile

__all__ = ["BuildOptions", "BuildResult", "TargetResult", "build"]


def build(opts: BuildOptions, *, progress: Progress = lambda _m: None) -> BuildResult:
    t0 = time.perf_counter()
    _check(opts)
    profiles = [load_profile(t) for t in opts.targets]  # fail fast, before TensorFlow loads
    kind = detect_kind(Path(opts.model))
    for p in profiles:
        check_pair(kind.converts_as.value, p.format)
    signer = _signer(opts.sign_key)
    name = opts.name or _default_name(opts.model)
    _refuse_overwrite(opts, name, profiles)
    if kind is SourceKind.HF:
        _refuse_text_up_front(Path(opts.model), profiles)
    with tempfile.TemporaryDirectory(prefix="edgepack-build-") as tmp, HostTimer(Path(tmp) / "timing") as timer:
        work = Path(tmp)
        if any(p.is_cpu for p in profiles):  # CPU targets are timed on this host
            timer.start()
        progress(f"loading {opts.model}")
        store = open_store(opts.cache_dir, opts.cache)
        source = load_source(opts.model, workdir=work, store=store)
        if opts.tokenizer:
            attach_tokenizer(source, opts.tokenizer)
        calib, valid = _datasets(opts, source, profiles, progress)
        progress(f"float reference on {len(valid)} validation samples")
        cache = BuildCache(workdir=work / "cache", timer=timer, store=store,
                           keyed=_keyed(opts, source, calib, valid) if store else {})
        reference, trimmed = _reference(source, valid)
        source.release_reference()
        if trimmed:
            valid.notes.append("texts run at their own lengths for the reference and for targets that take any "
                               "length (the source gives the same outputs without the padding)")
        warned = check_outputs(valid, reference, source.outputs, labels_file=opts.labels,
                               max_drop=opts.max_accuracy_drop)
        for w in warned:
            progress(f"warning: {w}")
        inputs = BuildInputs(opts=opts, name=name, source=source, calib=calib, valid=valid, reference=reference,
                             cache=cache, progress=progress, signer=signer, data_warnings=tuple(warned),
                             trimmed=tuple(trimmed) if trimmed else None)
        searches = [CandidateSearch(inputs, p, work / p.name) for p in profiles]
        refused = _plan(searches, progress)
        results = [_refusal(s, refused[s]) if s in refused else _target(s, inputs) for s in searches]
        info = {"calibration": data_info(calib), "validation": data_info(valid), "gate": opts.gate.to_dict(),
                "search": opts.search.value,
                "profiled_on": opts.profile_on.device if opts.profile_on is not None else None,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in source.inputs]}
        return BuildResult(model=str(opts.model), source_format=source.format_name, results=results,
                           seconds=time.perf_counter() - t0, shared=info, name=name, version=opts.version)


def _refuse_text_up_front(folder: Path, profiles: list[TargetProfile]) -> None:
    """A Hugging Face folder is a text model (token-id inputs) before it is exported (minutes for a
    base-size encoder): when every target refuses text models (coral), say so now. With a target that
    builds, the refusal comes with the plan, after the export the others need anyway."""
    from packager.hf_export import read_folder

    f = read_folder(folder)
    src = Source(path=folder, kind=SourceKind.HF, inputs=[InputSpec("input_ids", (None, None), "int64", (1, f.max_length))],
                 text=TextInfo(tokenizer=folder / "tokenizer.json",
                               settings=TextSettings(max_length=f.max_length, inputs=(("input_ids", Role.IDS),))))
    refused = []
    for p in profiles:
        try:
            fail_on(backend_for(p).lint_source(src, p), p)
        except EdgepackError as e:
            refused.append(e)
    if refused and len(refused) == len(profiles):
        raise refused[0]


def _plan(searches: list[CandidateSearch], progress: Progress) -> dict[CandidateSearch, EdgepackError]:
    """Plan every target before any conversion. What no target can build is bad input and raises;
    a target that refuses the source (coral and a text model) fails on its own, up front, and the
    others build."""
    refused = {}
    for search in searches:
        try:
            search.plan()
        except EdgepackError as e:
            refused[search] = e
            progress(f"[{search.profile.name}] REFUSED: {str(e).splitlines()[0]}")
    if len(refused) == len(searches):
        raise next(iter(refused.values()))
    return refused


def _refusal(search: CandidateSearch, e: EdgepackError) -> TargetResult:
    return _failed(search, e, ())


def _target(search: CandidateSearch, inputs: BuildInputs) -> TargetResult:
    """One target: its chosen candidate packaged, or what failed, with the candidates it tried."""
    try:
        try:
            outcome = search.run()
        finally:
            inputs.cache.timer.release()  # what follows (buckets, packaging) times nothing
        if not isinstance(outcome, Failed):
            return package(outcome, inputs, sequence.plan(search, outcome, inputs))
        error, trials = outcome.error, outcome.trials
    except EdgepackError as e:
        error, trials = e, ()
    inputs.progress(f"[{search.profile.name}] FAILED: {str(error).splitlines()[0]}")
    return _failed(search, error, trials)


def _failed(search: CandidateSearch, e: EdgepackError, trials: tuple[Trial, ...]) -> TargetResult:
    return TargetResult(target=search.profile.name, ok=False, format=search.profile.format, trials=trials,
                        error=str(e), error_kind=type(e).__name__, exc=e)


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
    if not opts.speed_gate and opts.profile_on is not None:
        raise InputError("--no-speed-gate and --profile-on contradict each other",
                         hint="--profile-on lets the device's timings decide the speed gate; drop one of them")
    if not 0 < opts.min_similarity <= 1:
        raise InputError(f"--min-similarity {opts.min_similarity} is not in (0, 1]", hint="e.g. 0.99")


def _refuse_overwrite(opts: BuildOptions, name: str, profiles: list[TargetProfile]) -> None:
    """A bundle of the same name, version and target is not replaced without --overwrite: said before
    anything converts."""
    if opts.overwrite:
        return
    there = [p.name for p in (Path(opts.out_dir) / f"{name}-{opts.version}-{t.name}.edgepack" for t in profiles)
             if p.exists()]
    if there:
        raise InputError(f"{opts.out_dir} already holds {', '.join(there)}",
                         hint="build a new --version, into another --out-dir, or pass --overwrite to replace it")




def _keyed(opts: BuildOptions, source: Source, calib: Dataset | None, valid: Dataset) -> dict:
    """What every build cache key of this build starts from: the model's bytes, its resolved inputs,
    the calibration data and the sample converters check their result on."""
    return {"model": digest_path(Path(opts.model)),
            "inputs": [(s.name, list(s.shape), s.dtype) for s in source.inputs],
            "calibration": digest_samples(calib.samples) if calib is not None else None,
            "sample": digest_samples(valid.samples[:1])}


def _signer(key_path: Path | None) -> Callable[[bytes], bytes] | None:
    if not key_path:
        return None
    from edgebundle import signing

    key = signing.load_private_key(key_path)
    return lambda manifest_bytes: signing.sign(manifest_bytes, key)


def _default_name(model: Path) -> str:
    stem = Path(model).name if Path(model).is_dir() else Path(model).stem
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip(".-") or "model"


def _needs_calibration(opts: BuildOptions, source: Source, profiles: list[TargetProfile]) -> bool:
    """Only when every candidate a target could try needs it (an explicit int8, or Coral)."""
    return any(all(s.precision in b.calibrated for s in b.ladder(p, opts.precision))
               for p in profiles if not (b := backend_for(p)).packages_as_is(source))


def _datasets(opts: BuildOptions, source: Source, profiles: list[TargetProfile],
              progress: Progress) -> tuple[Dataset | None, Dataset]:
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
            read[what] = read_arrays(spec, source.inputs, what=what, limit=limit, text=source.text)
    if source.text is not None and read:  # length-bucketed targets convert their main model at max_length
        bucketed = any(sequence.bucketed(p, source) for p in profiles)
        align_texts(read, source.text, at_least=source.text.settings.max_length if bucketed else 0)
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


def _reference(source: Source, valid: Dataset) -> tuple[list[dict], list[dict] | None]:
    """The source's outputs on each validation sample, and the samples at their own lengths (None: run as
    loaded). A text model's padding is compute the reference would spend for nothing (MiniLM at 256
    tokens: 9 s of 10 for 100 docstring sentences): where the source gives the same outputs for its
    most-padded text with and without the padding, every text runs at its own length."""
    trimmed = sequence.own_lengths(source, valid)
    if trimmed is not None:
        i = min(range(len(trimmed)), key=lambda k: next(iter(trimmed[k].values())).shape[-1])
        if not _same_outputs(_run(source, valid.samples[i], i), _run(source, trimmed[i], i)):
            trimmed = None
    return [_run(source, s, i) for i, s in enumerate(trimmed or valid.samples)], trimmed


def _run(source: Source, sample: dict, i: int) -> dict:
    try:
        return source.reference(sample)
    except ReferenceFailed as e:
        raise ReferenceFailed(f"validation sample {i}: {str(e).splitlines()[0]}") from None


def _same_outputs(a: dict, b: dict) -> bool:
    """The same outputs, shape for shape, up to float32 rounding (a token-level output, or a model that
    does not mask its padding, differs)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype.kind == "f":
            if not np.allclose(x, y, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(x).max(initial=0.0)))):
                return False
        elif not np.array_equal(x, y):
            return False
    return True
