"""One target of a build: plan its steps, walk the candidates, keep one.

    step -> candidate -> convert -> lint -> validate (accuracy gate) -> measure (speed gate)
         -> next step, or the Chosen candidate, finished for the device, handed to packaging

What the format allows (precisions, ladder, a ready model packaged as is, the device's finishing
step) comes from the target's backend (packager/formats/). A candidate that fails the accuracy
gate is followed, for int8 (and ONNX fp16), by the same precision with the nodes that lose the
most kept in float (packager/formats/sensitivity.py), in up to three rounds. The speed gate
applies on CPU targets under --quantize auto: a candidate slower than fp32 beyond the measured
noise moves the build down the ladder."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from edgebundle.errors import (AccuracyGateError, ConversionError, EdgepackError, InputError,
                               RuntimeUnavailableError, UnsupportedOpError)
from edgeruntime import Runtime
from packager import lint
from packager.cache import ArtifactKey
from packager.candidates import Candidate, Search, Step
from packager.contents import tensor_specs
from packager.device_profile import device_latency
from packager.evaluate import accuracy, judge
from packager.figures import Speed, Timing
from packager.formats import backend_for, check_pair, sensitivity
from packager.options import BuildInputs
from packager.registry import Artifact, ConvertContext
from packager.results import Chosen, Failed, Trial, Verdict
from targets import Precision, TargetProfile

ANALYSIS_SAMPLES = 4
NOT_TIMED = "--no-speed-gate: not timed on this host"
MIXED_ROUNDS = 3


class CandidateSearch:
    """One target's walk down its ladder, from the plan to the Chosen candidate."""

    def __init__(self, inputs: BuildInputs, profile: TargetProfile, work: Path):
        self.inputs, self.opts, self.profile, self.work = inputs, inputs.opts, profile, work
        self.backend = backend_for(profile)
        self.auto = inputs.opts.precision is Precision.AUTO
        self.steps: tuple[Step, ...] = ()
        self._n = 0

    def say(self, msg: str) -> None:
        self.inputs.progress(f"[{self.profile.name}] {msg}")

    def plan(self) -> tuple[Step, ...]:
        """Check the source against the target and list the steps; raises on bad input."""
        src, p = self.inputs.source, self.profile
        check_pair(src.kind.value, p.format)
        fail_on(lint.lint_source(src, p) + self.backend.lint_source(src, p), p)
        steps = self.backend.plan(src, p, self.opts.precision)
        bad = [s.precision.value for s in steps if s.precision not in p.precisions]
        if bad:
            raise InputError(f"target {p.name} does not take precision {bad[0]!r}",
                             hint=f"{p.name} takes: {', '.join(x.value for x in p.precisions)}")
        self.steps = steps
        return steps

    def run(self) -> Chosen | Failed:
        """Walk the steps, keep one candidate and finish it for the device, or say why none passed
        (with every candidate tried). Raises on what fails the whole target (bad input, an op the
        target cannot run, an explicit precision that does not convert)."""
        self.work.mkdir(parents=True, exist_ok=True)
        trials = self._walk(self.steps)
        if not any(t.passed for t in trials):
            return self._failure(trials)
        trial, trials = self._choose(trials)
        finished = self.backend.finish(trial.artifact, self.profile, self.work, name=self.inputs.name,
                                       version=self.opts.version)
        return Chosen(profile=self.profile, trial=trial, trials=trials, finished=finished,
                      latency=self._chosen_latency(trial), fp32=self.fp32(trial.candidate),
                      calibrated=trial.candidate.precision in self.backend.calibrated, work=self.work)

    def _chosen_latency(self, trial: Trial) -> Timing:
        if trial.latency:
            return trial.latency
        if trial.accuracy is None:
            return Timing.untimed("no runtime on this host can run this model")
        if self.profile.is_cpu and self.opts.speed_gate:
            return self.latency(trial.artifact, baseline=True, sample=self.inputs.fed(trial.specs[0])[0])
        if self.profile.is_cpu:
            return Timing.untimed(NOT_TIMED)
        return Timing.untimed(self.backend.not_timed(self.profile))

    # ---- walk ----

    def _walk(self, steps: tuple[Step, ...]) -> list[Trial]:
        trials: list[Trial] = []
        for step in steps:
            if step.precision in self.backend.calibrated and self.inputs.calib is None:
                trials.append(Trial(step, verdict=Verdict.SKIPPED, why="no calibration data (pass --calibration)"))
                continue
            slower = frozenset(t.step.precision for t in trials if t.verdict is Verdict.SLOWER)
            skip = self.auto and (self.backend.skip(step, slower, self.profile)
                                  or _lost_before(step, trials, self.backend.calibrated))
            if skip:
                trials.append(Trial(step, verdict=Verdict.SKIPPED, why=skip))
                continue
            if step.mixed:
                at = next((i for i in reversed(range(len(trials))) if trials[i].step == Step(step.precision)), None)
                if at is None or trials[at].verdict is not Verdict.ACCURACY:
                    continue  # keeping nodes in float only helps a candidate that lost accuracy
                trials[at], mixed = self._mixed(step, trials[at])  # the plain one, with its analysis
                trials += mixed
            else:
                trials.append(self._try(step, Candidate(step.precision)))
            if self.opts.search is Search.FIRST and trials[-1].passed:
                break
        return trials

    def _mixed(self, step: Step, base: Trial) -> tuple[Trial, list[Trial]]:
        """The candidates of a mixed step after `base` (its plain step) lost accuracy; `base` comes
        back with its sensitivity analysis."""
        out: list[Trial] = []
        base = self._blame(base)
        found, keep, prev = base.blamed, (), base
        for r in range(MIXED_ROUNDS):
            more = sensitivity.pick(list(found), keep, limit=2 ** (r + 1))
            if more == keep:
                break
            keep = more
            trial = self._try(step, Candidate(step.precision, keep))
            # Passed, failed otherwise, or keeping nodes in float did not lower the loss at all (the plain
            # candidate's included: then the analysis is not finding where it is lost, and another round
            # of it, ~a conversion and an analysis each, would only find more of the same).
            if trial.verdict is not Verdict.ACCURACY or _loss(trial) >= _loss(prev):
                out.append(trial)
                break
            trial = self._blame(trial)
            out.append(trial)
            prev, found = trial, trial.blamed
        return base, out

    def _blame(self, trial: Trial) -> Trial:
        """`trial` (it failed the accuracy gate) with its sensitivity analysis: the nodes that lose
        the most, worst first (or, when it cannot run, why not)."""
        if trial.sensitivity or trial.artifact is None:
            return trial
        samples = self.inputs.valid.samples[:ANALYSIS_SAMPLES]
        self.say(f"{trial.candidate.label}: which nodes lose the accuracy")
        try:
            view, ref, got = self.backend.graph_view(trial.artifact, self.context(trial.candidate), samples)
        except ConversionError as e:  # e.g. the interpreter aborts on this model without delegates
            return replace(trial, why=f"{trial.why}; no sensitivity analysis: {str(e).splitlines()[0]}")
        blamed = tuple(sensitivity.blame(view, ref, got))
        return replace(trial, blamed=blamed, sensitivity=tuple(b.to_dict() for b in blamed[:10]))

    def context(self, cand: Candidate, out_dir: Path | None = None) -> ConvertContext:
        """What the backend converts `cand` with, for this target."""
        p = self.profile
        return ConvertContext(
            source=self.inputs.source, profile=p, candidate=cand, out_dir=out_dir or self.work, cache=self.inputs.cache,
            calibration=self.inputs.calib, allow_flex=self.opts.allow_flex, opset=self.opts.opset,
            per_channel=p.per_channel if self.opts.per_channel is None else self.opts.per_channel,
            calibration_method=self.opts.calibration_method or p.calibration_method, sample=self.inputs.valid.samples[0])

    # ---- one candidate ----

    def _try(self, step: Step, cand: Candidate) -> Trial:
        t0 = time.perf_counter()
        self._n += 1
        try:
            art = self._convert(cand)
        except ConversionError as e:
            if not self.auto or isinstance(e, UnsupportedOpError):
                raise
            return Trial(step, cand, verdict=Verdict.ERROR, why=str(e).splitlines()[0])
        trial = self._validate(Trial(step, cand, artifact=art, size_bytes=art.path.stat().st_size, cached=art.cached))
        if trial.verdict is Verdict.NOT_TRIED:
            trial = self._measure(trial)
        return replace(trial, seconds=time.perf_counter() - t0)

    def _convert(self, cand: Candidate) -> Artifact:
        return self.convert_shared(self.context(cand, self.work / f"{self._n}-{cand.label}"))

    def convert_shared(self, ctx: ConvertContext) -> Artifact:
        """Convert, or reuse what another target of this build converted to the same file (ctx.cache: the
        source's, or one length bucket's)."""
        cand = ctx.candidate
        key = ArtifactKey(self.profile.format, cand.precision.value, cand.keep_float, self.backend.variant(ctx))
        cached = ctx.cache.artifacts.get(key)
        if cached is None:
            try:
                cached = self.convert_stored(ctx)
            except ConversionError as e:
                cached = e
            ctx.cache.artifacts[key] = cached
        if isinstance(cached, ConversionError):
            raise cached
        return cached

    def convert_stored(self, ctx: ConvertContext) -> Artifact:
        """`ctx.candidate` from the build cache across builds (packager/store.py), or converted and kept there."""
        cand, cache = ctx.candidate, ctx.cache
        key = self._store_key(ctx, cand)
        hit = cache.store.get(key, ctx.out_dir) if key else None
        if hit is not None:
            self.say(f"{cand.label}: from the build cache")
            cache.stored.add(key)
            return Artifact(path=hit.path, format=self.backend.format, precision=cand.precision,
                            quantization=hit.info, cached=True)
        self.say(f"{cand.label}: converting")
        art = self.backend.convert(ctx)
        if key and not any(p.suffix == ".data" for p in art.path.parent.iterdir()):  # no external weights
            cache.stored.add(key)
            cache.store.put(key, art.path, art.quantization)
            self._keep_fp32(ctx)
        return art

    def _store_key(self, ctx: ConvertContext, cand: Candidate | None) -> str | None:
        """What the converter reads, hashed (None: no build cache, or a model packaged as it is).
        `cand` None: the format's float model."""
        cache = ctx.cache
        if cache.store is None or self.backend.packages_as_is(ctx.source):
            return None
        parts = {**cache.keyed, "format": self.profile.format.value, "opset": ctx.opset, "allow_flex": ctx.allow_flex,
                 "what": "fp32" if cand is None else "candidate"}
        if cand is None or not self.backend.reads_calibration(cand.precision):
            parts.pop("calibration", None)  # only some precisions read the calibration data
        if cand is not None:
            parts.update(backend=type(self.backend).__name__, precision=cand.precision.value,
                         keep_float=list(cand.keep_float), variant=self.backend.variant(ctx),
                         per_channel=ctx.per_channel, calibration_method=ctx.calibration_method.value)
        return cache.store.key(parts)

    def _keep_fp32(self, ctx: ConvertContext) -> None:
        """The float model a conversion made on the way, kept in the build cache too."""
        path = ctx.cache.fp32.get(self.profile.format)
        key = self._store_key(ctx, None)
        if path is not None and key and key not in ctx.cache.stored:
            ctx.cache.stored.add(key)
            ctx.cache.store.put(key, path, {})

    def _validate(self, trial: Trial) -> Trial:
        """`trial` run on the validation set and judged by the accuracy gate (verdict still "not tried"
        when it passes); raises when the target cannot run it at all."""
        art, inputs = trial.artifact, self.inputs
        try:
            rt = self._runtime(art)
        except RuntimeUnavailableError as e:
            if not self.auto:
                raise
            return replace(trial, verdict=Verdict.ERROR,
                           why=f"converted, but the runtime cannot load it: {str(e).splitlines()[0][:300]}")
        specs = tensor_specs(rt, inputs.source, described=lambda: self.backend.describe(art.path),
                             sample=inputs.valid.samples[0])
        findings = tuple(self.backend.lint(art, self.profile, allow_flex=self.opts.allow_flex,
                                           inputs=specs[0], outputs=specs[1]))
        fail_on(list(findings), self.profile)
        trial = replace(trial, specs=specs, findings=findings)
        if rt is None:  # Flex ops: no runtime here can run it, so it cannot be judged
            return replace(trial, verdict=Verdict.PASSED, why="NOT VALIDATED: no runtime on this host has the Flex delegate")
        try:
            fed = inputs.fed(specs[0])
            outputs = tuple(self.outputs_once(inputs.cache, art.path, lambda: [rt.infer(s) for s in fed],
                                              f"{trial.candidate.label}: validating on {len(inputs.valid)} samples"))
        finally:
            rt.close()
        names = [o.name for o in specs[1]]
        missing = [n for n in names if n not in inputs.reference[0]]
        if missing:
            raise InputError(f"bundle outputs {missing} do not match the reference outputs {sorted(inputs.reference[0])}")
        acc = accuracy(inputs.reference, list(outputs), names, inputs.valid.labels)
        why = judge(acc, self.opts.gate)
        trial = replace(trial, outputs=outputs, accuracy=acc)
        return replace(trial, verdict=Verdict.ACCURACY, why="; ".join(why)) if why else trial

    def outputs_once(self, cache, path: Path, run, note: str) -> list[dict]:
        """run(): the validation outputs of the model at `path`, once per build: arm-cpu and rpi5 often
        validate one shared file in the same host runtime (cache: the source's or a length bucket's)."""
        p = self.profile
        key = (path, type(self.backend).__name__, p.threads, p.providers, p.delegates)
        if key not in cache.outputs:
            self.say(note)
            cache.outputs[key] = run()
        return cache.outputs[key]

    def _measure(self, trial: Trial) -> Trial:
        """Speed gate: CPU targets, candidates below fp32, --quantize auto. Returns `trial` timed and judged."""
        as_is = self.backend.packages_as_is(self.inputs.source)
        quantized = trial.candidate.precision is not Precision.FP32 and not as_is
        if not self.opts.speed_gate:
            return replace(trial, latency=Timing.untimed(NOT_TIMED), verdict=Verdict.PASSED)
        if not (self.profile.is_cpu and quantized):
            return replace(trial, verdict=Verdict.PASSED)
        fp32_size = self.fp32(trial.candidate).stat().st_size
        # Auto's first-pass search asks the host one thing of a smaller candidate: is it slower than fp32?
        # ('faster' only matters to one no smaller, and to --search thorough, which ranks the medians.)
        only_slower = (self.auto and self.opts.search is Search.FIRST and self.opts.profile_on is None
                       and trial.size_bytes < fp32_size)
        host = self.latency(trial.artifact, label=trial.candidate.label, sample=self.inputs.fed(trial.specs[0])[0],
                            question="slower" if only_slower else "verdict")
        trial = replace(trial, latency=host)
        r = host.ratio
        if self.opts.profile_on is not None:  # the device's figures decide; the host's are reported beside
            dev = device_latency(trial, inputs=self.inputs, profile=self.profile, backend=self.backend,
                                 fp32=self.fp32(trial.candidate), work=self.work)
            trial, r = replace(trial, device_latency=dev), dev.ratio
            if self.auto and r.verdict is Speed.SLOWER:
                return replace(trial, verdict=Verdict.SLOWER, why=f"{r.median:.2f}x the fp32 p50 latency on device "
                                                                  f"{dev.device} (host: {host.median:.2f}x)")
        elif self.auto and r.verdict is Speed.SLOWER:
            return replace(trial, verdict=Verdict.SLOWER,
                           why=f"{r.median:.2f}x the fp32 latency (inter-quartile {r.q1:.2f}-{r.q3:.2f}x over "
                               f"{host.rounds} interleaved rounds)")
        if self.auto and trial.size_bytes >= fp32_size and r.verdict is not Speed.FASTER:
            return replace(trial, verdict=Verdict.NO_GAIN, why=f"no smaller than fp32 ({trial.size_bytes / fp32_size:.2f}x) "
                                                               f"and not faster ({r.median:.2f}x)")
        return replace(trial, verdict=Verdict.PASSED)

    def latency(self, art: Artifact, *, sample: dict, baseline: bool = False, label: str = "",
                question: str = "verdict") -> Timing:
        """The candidate against fp32 on `sample` (the first validation sample as the model takes it: a text
        at its own length where it takes any), interleaved in the clean timing worker (or, for the fp32
        model itself, its own latency)."""
        base = self.backend.host_spec(self.fp32(Candidate(Precision.FP32)), self.profile)
        known = self.inputs.cache.fp32_latency.get(base)
        if baseline and known is not None:  # fp32 itself was chosen: it was timed beside the candidates
            return known.for_profile(self.profile.threads)
        cand = None if baseline else self.backend.host_spec(art.path, self.profile)
        key = (base, cand, question)
        if key not in self.inputs.cache.comparisons:  # another target with the same file and settings timed it
            self.say("timing in a clean process" + ("" if baseline else " against fp32"))
            self.inputs.cache.comparisons[key] = self.inputs.cache.timer.compare(
                base, cand, sample, budget_s=self.opts.bench_seconds,
                max_rounds=self.opts.bench_runs, question=question)
        res = self.inputs.cache.comparisons[key].for_profile(self.profile.threads)
        if not baseline:  # the fp32 side of an interleaved comparison is fp32's own latency, same worker
            self.inputs.cache.fp32_latency[base] = res.own(label=label or art.precision.value)
        return res

    def fp32(self, cand: Candidate) -> Path:
        """The format's float model (built once per build, or taken from the build cache; `cand` only
        names a conversion that fails)."""
        ctx, fmt = self.context(cand), self.profile.format
        if fmt in ctx.cache.fp32:
            return ctx.cache.fp32[fmt]
        key = self._store_key(ctx, None)
        hit = ctx.cache.store.get(key, ctx.cache.workdir / f"stored-fp32-{fmt.value}") if key else None
        if hit is not None:
            ctx.cache.stored.add(key)
            ctx.cache.fp32[fmt] = hit.path
            return hit.path
        path = self.backend.fp32(ctx)
        self._keep_fp32(ctx)
        return path

    def _runtime(self, art: Artifact) -> Runtime | None:
        try:
            return self.backend.host_runtime(art.path, self.profile)
        except RuntimeUnavailableError:
            if self.opts.allow_flex and self.backend.needs_flex(art):
                return None  # stock runtimes lack the Flex delegate: packaged, clearly unvalidated
            raise

    # ---- choose ----

    def _choose(self, trials: list[Trial]) -> tuple[Trial, tuple[Trial, ...]]:
        """The candidate kept (of those that passed), and the trials with it marked chosen."""
        passed = [t for t in trials if t.passed]
        if self.opts.search is Search.THOROUGH and len(passed) > 1:
            best = min(passed, key=_median)
            why = f"fastest of {len(passed)} candidates that pass both gates"
        else:
            best = passed[0]
            why = best.why or ("the precision asked for" if not self.auto
                               else "first candidate on the ladder that passes both gates")
        chosen = replace(best, verdict=Verdict.CHOSEN, why=why)
        return chosen, tuple(chosen if t is best else t for t in trials)

    def _failure(self, trials: list[Trial]) -> Failed:
        p, last = self.profile, trials[-1]
        rows = "; ".join(f"{t.label}: {t.why}" for t in trials)
        if not any(t.verdict is Verdict.ACCURACY for t in trials):
            return Failed(ConversionError(f"{p.name}: no candidate could be built ({rows})",
                                          hint="try another --quantize or --opset, or another target"), tuple(trials))
        analysed: list[Trial] = []  # the last candidate, once the hint asks which nodes lose the accuracy

        def lossy() -> list[str]:
            analysed.append(self._blame(last))
            return [b.text() for b in analysed[-1].blamed]

        hint = self.backend.gate_hint(p, last.step.precision, lossy=lossy)
        if not self.auto:
            hint = self._passing_hint(last) or hint
        err = AccuracyGateError(f"{p.name}: fails the accuracy gate ({rows}); no bundle written", hint=hint)
        return Failed(err, tuple(trials[:-1]) + (analysed[-1] if analysed else last,))

    def _passing_hint(self, failed: Trial) -> str | None:
        """After an explicit precision failed: the next precision down the ladder that passes."""
        for step in self.backend.fallbacks(self.profile, failed.step.precision):
            if step.mixed or (step.precision in self.backend.calibrated and self.inputs.calib is None):
                continue
            cand = Candidate(step.precision)
            try:
                trial = self._validate(Trial(step, cand, artifact=self._convert(cand)))
            except EdgepackError:
                continue
            if trial.verdict is not Verdict.ACCURACY:
                acc = trial.accuracy
                fig = (f"drop {acc.accuracy_drop_points:.2f} pt" if acc and acc.accuracy_drop_points is not None
                       else f"cosine {(acc and acc.cosine_similarity) or 0:.4f}")
                return f"--quantize {step.precision.value} passes the gate ({fig})"
        return None


def _lost_before(step: Step, trials: list[Trial], calibrated: tuple[Precision, ...]) -> str | None:
    """A calibrated (activations in integers) precision after dynamic int8 lost the accuracy gate:
    dynamic quantizes the weights alone, so quantizing the activations too only loses more."""
    lost = any(t.step == Step(Precision.DYNAMIC) and t.verdict is Verdict.ACCURACY for t in trials)
    if lost and step.precision in calibrated:
        return (f"dynamic int8 (int8 weights only) already failed the accuracy gate; {step.precision.value} "
                "quantizes the activations too")
    return None


def _loss(trial: Trial) -> float:
    """How far a candidate is from the reference, for comparing rounds of one precision."""
    return trial.accuracy.loss if trial.accuracy is not None else float("inf")


def _median(trial: Trial) -> float:
    """A passed candidate's latency over fp32's, the device's where it was profiled (1.0: not timed)."""
    timing = trial.device_latency or trial.latency
    median = timing.median if timing is not None else None
    return 1.0 if median is None else median


def fail_on(findings: list[lint.Finding], profile: TargetProfile) -> None:
    errs = lint.errors(findings)
    if errs:
        raise UnsupportedOpError(f"{profile.name}: " + "; ".join(f.message for f in errs),
                                 hint="see `edgepack targets show " + profile.name + "` for what this target needs")
