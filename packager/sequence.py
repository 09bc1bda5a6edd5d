"""Sequence length of text models, from the token lengths of the build's own texts.

- TFLite: resizing an interpreter's inputs re-initialises XNNPACK (every kernel prepared again,
  about a run's cost), so a bundle holds one model per length bucket instead. The candidate search
  runs at max_length; the precision it chose is then converted again at each smaller bucket,
  validated against the source on the validation texts that fit it, and packaged in the main
  model's file as a signature of its own over the same weight buffers (share_weights). The agent
  runs each text in the smallest bucket that holds it. A bucket that does not convert, or fails the
  gate where the chosen model passes on the same texts, is left out and said so: its texts run in
  the next larger one.
- jetson-gpu: the TensorRT EP builds its engine for one optimisation profile (min/opt/max shape of
  each dynamic input); the bundle records one from the data (opt: the median length) and the agent
  passes it to the EP. ONNX Runtime on a CPU takes any length: requests run unpadded.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgebundle.errors import AccuracyGateError, EdgepackError
from edgeruntime.text import Role, TextSettings
from packager.data import Dataset
from packager.evaluate import accuracy, golden_tolerance, judge, no_worse
from packager.figures import Accuracy
from packager.options import BuildInputs
from packager.results import Chosen
from packager.sources import InputSpec, Source
from targets import Format, TargetProfile

SHORTEST_QUANTILE = 0.1  # the shortest bucket: the power of two at or above this share of the lengths
MIN_BUCKET = 8
MOST_BUCKETS = 8  # the main model and up to 7 below it: 8 ... 512 for a 1,024-token model
GOLDEN_PER_BUCKET = 3
TRT = "TensorrtExecutionProvider"
TRT_MAX_BATCH = 8  # texts per run on a TensorRT engine (the agent splits bigger requests)


@dataclass(frozen=True)
class Bucket:
    """One smaller-length model of a TFLite text bundle, validated, with its golden data."""

    length: int
    path: Path
    file: str  # its name in the bundle
    accuracy: Accuracy
    golden_inputs: tuple[dict, ...]
    golden_outputs: tuple[dict, ...]
    atol: float
    signature: str | None = None  # set by share_weights: a signature of the main model's file, not a file
    own_bytes: int | None = None  # then: the weight bytes it could not share with the main model
    note: str = ""  # kept though it missed the gate on its texts, and why (the report's notes)

    def to_dict(self) -> dict:
        """The manifest's entry (text.buckets)."""
        d = {"length": self.length, "file": self.file, "golden": len(self.golden_inputs), "atol": self.atol}
        return dict(d, signature=self.signature) if self.signature else d


@dataclass(frozen=True)
class Plan:
    """What a target's bundle records about sequence length."""

    buckets: tuple[Bucket, ...] = ()
    notes: tuple[str, ...] = ()  # buckets left out, and why
    trt_profile: dict | None = None  # the manifest's runtime.tensorrt_profile

    def settings(self, text: TextSettings) -> TextSettings:
        """The bundle's text settings: its buckets, ending at max_length (no buckets: any length)."""
        if not self.buckets:
            return text
        return replace(text, buckets=tuple(b.length for b in self.buckets) + (text.max_length,))


def token_lengths(samples: list[dict], settings: TextSettings) -> np.ndarray:
    """Tokens per sample (special tokens included): the attention mask's sum, else the ids up to the last non-pad."""
    roles = dict(settings.inputs)
    mask = next((n for n, r in roles.items() if r is Role.MASK), None)
    ids = next(n for n, r in roles.items() if r is Role.IDS)
    if mask is not None:
        return np.asarray([int(np.asarray(s[mask]).sum()) for s in samples], np.int64)
    return np.asarray([int(np.flatnonzero(np.asarray(s[ids]).reshape(-1) != settings.pad_id).max(initial=-1)) + 1
                       for s in samples], np.int64)


def choose_buckets(lengths, max_length: int) -> tuple[int, ...]:
    """Bucket lengths below max_length: every power of two from the one at or above the data's 10th
    percentile of lengths (at least MIN_BUCKET) up to max_length, which is the bundle's main model. So a
    text past the shortest bucket never runs at more than twice its length: a device's traffic is not the
    build's data (a 128-token text ran in MPNet's 384 model when the buckets came from the data's
    percentiles alone). Buckets share the main model's weights (share_weights): each costs a conversion
    at build time and a few kB in the bundle."""
    if len(lengths) == 0:
        return ()
    smallest = max(MIN_BUCKET, 1 << int(np.ceil(np.log2(max(float(np.quantile(lengths, SHORTEST_QUANTILE)), 1)))))
    sizes = []
    while smallest < max_length:
        sizes.append(smallest)
        smallest *= 2
    return tuple(sizes)[-(MOST_BUCKETS - 1):]


def bucketed(profile: TargetProfile, source: Source) -> bool:
    """Does this target get length buckets? TFLite (static shapes) text models with a dynamic sequence axis."""
    return (profile.format is Format.TFLITE and profile.static_shapes and source.text is not None
            and all(len(s.signature) == 2 and s.signature[1] is None for s in source.inputs))


def trt_profile(profile: TargetProfile, source: Source, lengths) -> dict | None:
    """{input: {"min", "opt", "max"}} for a TensorRT text target: batch 1..TRT_MAX_BATCH (opt 1), sequence
    1..max_length (opt: the data's median length); fixed dimensions as they are."""
    if TRT not in profile.providers or source.text is None or len(lengths) == 0:
        return None
    top = source.text.settings.max_length
    opt = int(min(top, max(1, np.median(lengths))))
    out = {}
    for s in source.inputs:
        sig = s.signature
        if not any(d is None for d in sig):
            continue
        ranges = [(d, d, d) if d is not None else (1, 1, TRT_MAX_BATCH) if i == 0 else
                  (1, opt, top) if i == len(sig) - 1 else (s.shape[i],) * 3 for i, d in enumerate(sig)]
        out[s.name] = {k: [r[j] for r in ranges] for j, k in enumerate(("min", "opt", "max"))}
    return out or None


def plan(search, chosen: Chosen, inputs: BuildInputs) -> Plan:
    """A target's sequence plan: its TensorRT profile, or its converted and validated length buckets."""
    profile, source = chosen.profile, inputs.source
    if source.text is None:
        return Plan()
    lengths = np.concatenate([token_lengths(d.samples, source.text.settings)
                              for d in (inputs.calib, inputs.valid) if d is not None and not d.random])
    if not bucketed(profile, source):
        return Plan(trt_profile=trt_profile(profile, source, lengths))
    top, width = source.text.settings.max_length, source.inputs[0].shape[-1]
    if width != top:  # token arrays narrower than max_length fixed the model's length
        return Plan(notes=(f"no length buckets: the model was converted at length {width}, not max_length {top}; "
                           f"every text runs at {width} and is cut there",))
    valid_lengths = token_lengths(inputs.valid.samples, source.text.settings)
    buckets, notes = [], []
    asked = inputs.opts.length_buckets
    if asked is not None and any(b >= top for b in asked):
        notes.append(f"length buckets {sorted(b for b in asked if b >= top)} left out: not below max_length {top}")
    for length in choose_buckets(lengths, top) if asked is None else sorted({b for b in asked if b < top}):
        inputs.progress(f"[{profile.name}] {chosen.trial.candidate.label}: length bucket {length}")
        try:
            buckets.append(_bucket(search, chosen, inputs, length=length, fits=np.flatnonzero(valid_lengths <= length)))
            notes += [buckets[-1].note] if buckets[-1].note else []
        except EdgepackError as e:
            notes.append(f"length bucket {length} left out (its texts run at the next length): "
                         f"{str(e).splitlines()[0][:300]}")
    return Plan(buckets=tuple(buckets), notes=tuple(notes))


def share_weights(seq: Plan, main: Path, dest: Path, *, compiled: bool = False) -> tuple[Path, Plan]:
    """The main model and its length buckets as one .tflite at `dest` (named as the main model), a
    signature per bucket over one copy of the weights (packager/formats/tflite_merge.py): the bundle
    carries them once and the device holds them once. Checked here before it is used: each signature on its
    bucket's golden inputs gives that bucket's golden outputs, the main graph what the main file gives.
    Unchanged when there is nothing to share, the models cannot be merged (or are an Edge TPU compiler's),
    or the check fails (then a note says so)."""
    from packager.formats.tflite_layout import canonical
    from packager.formats.tflite_merge import merge_signatures

    if not seq.buckets or compiled:
        return main, seq
    got = merge_signatures(main.read_bytes(), {f"len{b.length}": b.path.read_bytes() for b in seq.buckets})
    if got is None:
        return main, seq
    data, own = got
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(canonical(data)[0])  # the layout that keeps delta updates small (tflite_layout.py)
    why = _merged_differs(dest, main, seq.buckets)
    if why:
        return main, replace(seq, notes=seq.notes + (f"length buckets kept as files of their own: {why}",))
    buckets = tuple(replace(b, file=dest.name, signature=f"len{b.length}", own_bytes=own[f"len{b.length}"])
                    for b in seq.buckets)
    return dest, replace(seq, buckets=buckets)


def _merged_differs(merged: Path, main: Path, buckets: tuple[Bucket, ...]) -> str | None:
    from edgebundle.errors import EdgepackError
    from edgeruntime.base import LoadSpec
    from edgeruntime.litert import LiteRTRuntime

    try:
        one = LiteRTRuntime.load(str(main), LoadSpec(format="tflite"))
        whole = LiteRTRuntime.load(str(merged), LoadSpec(format="tflite"))
    except EdgepackError as e:
        return f"the merged model does not load here ({str(e).splitlines()[0][:200]})"
    try:
        zeros = {t.name: np.zeros(t.shape, t.dtype) for t in one.inputs}
        want = one.run(zeros)
        for b in buckets:
            rt = whole.signature(f"len{b.length}")
            for feeds, outs in zip(b.golden_inputs, b.golden_outputs):
                got = rt.run(feeds)
                if any(not np.allclose(got[k], v, rtol=0, atol=b.atol, equal_nan=True) for k, v in outs.items()):
                    return f"its signature len{b.length} does not give that bucket's golden outputs"
        got = whole.run(zeros)  # NaN where the model divides by the all-zero mask (fp16: clamp(1e-9) is 0)
        if any(not np.array_equal(got[k], v, equal_nan=True) for k, v in want.items()):
            return "its main graph does not give the main model's outputs"
    except (EdgepackError, KeyError, ValueError, RuntimeError) as e:
        return f"the merged model does not run here ({str(e).splitlines()[0][:200]})"
    finally:
        one.close()
        whole.close()
    return None


def _bucket(search, chosen: Chosen, inputs: BuildInputs, *, length: int, fits: np.ndarray) -> Bucket:
    """The chosen precision converted at `length` and validated on the texts that fit it."""
    if len(fits) == 0:
        raise AccuracyGateError(f"no validation text is {length} tokens or shorter, so it cannot be validated")
    work = chosen.work / f"length-{length}"
    valid = [cut(inputs.valid.samples[i], length) for i in fits]
    ctx = replace(search.context(chosen.trial.candidate, work), source=at_length(inputs.source, length),
                  cache=inputs.cache.at_length(length), sample=valid[0],
                  calibration=cut_dataset(inputs.calib, length) if chosen.calibrated else None)
    art = search.convert_shared(ctx)  # arm-cpu and rpi5: one conversion, one validation

    def run() -> list[dict]:
        rt = search.backend.host_runtime(art.path, chosen.profile)
        try:
            return [rt.infer(s) for s in valid]
        finally:
            rt.close()

    outs = search.outputs_once(ctx.cache, art.path, run,
                               f"{chosen.trial.candidate.label} at length {length}: validating on {len(valid)} texts")
    names = [o.name for o in chosen.trial.specs[1]]
    labels = inputs.valid.labels[fits] if inputs.valid.labels is not None else None
    ref = [inputs.reference[i] for i in fits]
    acc = accuracy(ref, outs, names, labels)
    why, note = judge(acc, inputs.opts.gate), ""
    if why:
        # The chosen model passed on every validation text; on a subset of them it may not (MPNet's
        # neighbours: 94.4 % of the 196 texts that fit 32 tokens). A bucket that does as well as it on
        # those texts computes what was chosen; only one that does worse is left out.
        main = accuracy(ref, [chosen.trial.outputs[i] for i in fits], names, labels) if chosen.trial.outputs else None
        if main is None or not judge(main, inputs.opts.gate) or not no_worse(acc, main, len(fits)):
            raise AccuracyGateError(f"fails the accuracy gate on its {len(fits)} texts: {'; '.join(why)}")
        note = (f"length bucket {length} kept: on its {len(fits)} texts it misses the gate ({'; '.join(why)}) "
                f"no more than the chosen model does on the same texts (which passed on all {len(inputs.valid)})")
    finished = search.backend.finish(art, chosen.profile, work, name=inputs.name, version=inputs.opts.version)
    stem, suffix = Path(chosen.finished.name).stem, Path(chosen.finished.name).suffix
    n = GOLDEN_PER_BUCKET
    return Bucket(length=length, path=finished.path, file=f"{stem}.len{length}{suffix}", accuracy=acc,
                  golden_inputs=tuple(valid[:n]), golden_outputs=tuple(outs[:n]),
                  atol=golden_tolerance(chosen.trial.candidate.precision.value, outs[:n]), note=note)


def at_length(source: Source, length: int) -> Source:
    """The source with its [batch, sequence] inputs resolved at `length` (converters cache per shape)."""
    src = copy.copy(source)
    src.inputs = [InputSpec(s.name, s.signature, s.dtype, tuple(s.shape[:-1]) + (length,)) for s in source.inputs]
    return src


def own_lengths(source: Source, data: Dataset) -> list[dict] | None:
    """Each text sample cut to its own token length (its padding dropped), for a text model whose inputs
    all take any length and that reads an attention mask; None for any other model or random data."""
    text = source.text
    if text is None or data.random or not any(r is Role.MASK for _, r in text.settings.inputs):
        return None
    if not source.inputs or not all(len(s.signature) == 2 and s.signature[1] is None for s in source.inputs):
        return None
    return [cut(s, max(int(n), 1)) for s, n in zip(data.samples, token_lengths(data.samples, text.settings))]


def cut(sample: dict, length: int) -> dict:
    """A [batch, sequence] sample's first `length` positions."""
    return {k: np.ascontiguousarray(np.asarray(v)[..., :length]) for k, v in sample.items()}


def cut_dataset(data: Dataset | None, length: int) -> Dataset | None:
    """Calibration data at `length`: texts longer than it cut (their statistics still count)."""
    if data is None:
        return None
    return replace(data, samples=[cut(s, length) for s in data.samples], notes=list(data.notes))
