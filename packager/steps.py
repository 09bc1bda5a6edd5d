"""One target of a build: walk the candidate ladder, then package the chosen candidate.

    step -> candidate -> convert -> lint -> validate (accuracy gate) -> measure (speed gate)
         -> next step, or package

A candidate that fails the accuracy gate is followed, for int8 (and ONNX fp16), by the same
precision with the nodes that lose the most kept in float (packager/formats/sensitivity.py),
in up to three rounds. The speed gate applies on CPU targets under --quantize auto: a
candidate slower than fp32 beyond the measured noise moves the build down the ladder."""
from __future__ import annotations

import time
from pathlib import Path

from edgeruntime import load_runtime
from edgebundle.errors import (AccuracyGateError, ConversionError, EdgepackError, InputError,
                               RuntimeUnavailableError, UnsupportedOpError)
from edgebundle.manifest import Quantization, TensorSpec
from packager import lint
from packager.cache import ArtifactKey
from packager.candidates import CALIBRATED, Candidate, Search, Step, Trial, fallbacks, ladder
from packager.evaluate import compare, judge
from packager.formats import sensitivity
from packager.registry import Artifact, ConvertContext, backend, check_pair
from packager.timing import spec_for, threads_for
from targets import Precision, TargetProfile

ANALYSIS_SAMPLES = 4
MIXED_ROUNDS = 3


class TargetBuild:
    def __init__(self, env, profile: TargetProfile, work: Path):
        self.env, self.opts, self.profile, self.work = env, env.opts, profile, work
        self.backend = backend(profile.format)
        self.auto = env.opts.precision is Precision.AUTO
        self._n = 0

    def say(self, msg: str) -> None:
        self.env.progress(f"[{self.profile.name}] {msg}")

    def plan(self) -> tuple[Step, ...]:
        """Check the source against the target and list the steps; raises on bad input."""
        self._precheck()
        self.steps = self._steps()
        return self.steps

    def run(self):
        from packager.package import package

        self.work.mkdir(parents=True, exist_ok=True)
        trials = self._walk(self.steps)
        chosen = self._choose(trials)
        return package(self, chosen, trials)

    # ---- plan ----

    def _precheck(self) -> None:
        src = self.env.source
        if getattr(src, "edgetpu_compiled", False):
            raise InputError(f"{src.path.name} is already compiled for the Edge TPU; edgepack cannot validate it here",
                             hint="build from the uncompiled int8 model on a host with edgetpu_compiler on PATH: "
                                  "edgepack compiles it and validates the int8 model it came from")
        check_pair(src.kind.value, self.profile.format)
        fail_on(lint.lint_source(src, self.profile), self.profile)

    def _steps(self) -> tuple[Step, ...]:
        p, asked, src = self.profile, self.opts.precision, self.env.source
        if src.kind.value == "tflite":  # packaged as it is: its own precision is the only candidate
            from packager.formats.tflite_fb import detect_precision

            detected = detect_precision(src.data)
            if detected not in p.precisions:
                raise InputError(f"{src.path.name} is a {detected.value} TFLite model and {p.name} runs only "
                                 f"{', '.join(x.value for x in p.precisions)}; edgepack cannot re-quantize a .tflite",
                                 hint="build from the original SavedModel/Keras model, which edgepack can quantize")
            if asked not in (Precision.AUTO, detected):
                raise InputError(
                    f"{src.path.name} is already a {detected.value} TFLite model; edgepack cannot re-quantize "
                    f"a .tflite to {asked.value}",
                    hint="use --quantize auto to package it as is, or build from the original SavedModel/Keras model")
            steps = (Step(detected),)
        else:
            steps = ladder(p, asked)
        bad = [s.precision.value for s in steps if s.precision not in p.precisions]
        if bad:
            raise InputError(f"target {p.name} does not take precision {bad[0]!r}",
                             hint=f"{p.name} takes: {', '.join(x.value for x in p.precisions)}")
        return steps

    # ---- walk ----

    def _walk(self, steps: tuple[Step, ...]) -> list[Trial]:
        trials: list[Trial] = []
        for step in steps:
            if step.precision in CALIBRATED and self.env.calib is None:
                trials.append(Trial(step, verdict="skipped", why="no calibration data (pass --calibration)"))
                continue
            if step.precision is Precision.INT16X8 and any(t.step.precision is Precision.INT8 and t.verdict == "slower"
                                                            for t in trials):
                trials.append(Trial(step, verdict="skipped", why="int8 was already slower than fp32 here, and "
                                                                  "int16x8 kernels are slower than int8"))
                continue
            if step.mixed:
                base = next((t for t in reversed(trials) if t.step == Step(step.precision)), None)
                if base is None or base.verdict != "accuracy":
                    continue  # keeping nodes in float only helps a candidate that lost accuracy
                trials += self._mixed(step, base)
            else:
                trials.append(self._try(step, Candidate(step.precision)))
            if self.opts.search is Search.FIRST and trials[-1].passed:
                break
        return trials

    def _mixed(self, step: Step, base: Trial) -> list[Trial]:
        out: list[Trial] = []
        found = self._blame(base)
        keep: tuple[str, ...] = ()
        prev = base
        for r in range(MIXED_ROUNDS):
            more = sensitivity.pick(found, keep, limit=2 ** (r + 1))
            if more == keep:
                break
            keep = more
            trial = self._try(step, Candidate(step.precision, keep))
            out.append(trial)
            # Passed, failed otherwise, or keeping nodes in float did not lower the loss at all (the plain
            # candidate's included: then the analysis is not finding where it is lost, and another round
            # of it, ~a conversion and an analysis each, would only find more of the same).
            if trial.verdict != "accuracy" or _loss(trial) >= _loss(prev):
                break
            prev = trial
            found = self._blame(trial)
        return out

    def _blame(self, trial: Trial) -> list[sensitivity.Blame]:
        """Sensitivity analysis of a candidate that failed the accuracy gate (kept on the trial)."""
        if trial.sensitivity or trial.artifact is None:
            return trial.blamed
        samples = self.env.valid.samples[:ANALYSIS_SAMPLES]
        self.say(f"{trial.candidate.label}: which nodes lose the accuracy")
        view, ref, got = self.backend.graph_view(trial.artifact, self._ctx(trial.candidate), samples)
        trial.blamed = sensitivity.blame(view, ref, got)
        trial.sensitivity = [b.to_dict() for b in trial.blamed[:10]]
        return trial.blamed

    def _ctx(self, cand: Candidate, out_dir: Path | None = None) -> ConvertContext:
        p = self.profile
        return ConvertContext(
            source=self.env.source, profile=p, candidate=cand, out_dir=out_dir or self.work, cache=self.env.cache,
            calibration=self.env.calib, allow_flex=self.opts.allow_flex, opset=self.opts.opset,
            per_channel=p.per_channel if self.opts.per_channel is None else self.opts.per_channel,
            calibration_method=self.opts.calibration_method or p.calibration_method, sample=self.env.valid.samples[0])

    # ---- one candidate ----

    def _try(self, step: Step, cand: Candidate) -> Trial:
        t0 = time.perf_counter()
        trial = Trial(step, cand)
        self._n += 1
        try:
            art = self._convert(cand)
        except ConversionError as e:
            if not self.auto or isinstance(e, UnsupportedOpError):
                raise
            trial.verdict, trial.why = "error", str(e).splitlines()[0]
            return trial
        trial.artifact, trial.size_bytes = art, art.path.stat().st_size
        self._validate(trial)
        if trial.verdict == "not tried":
            self._measure(trial)
        trial.seconds = time.perf_counter() - t0
        return trial

    def _convert(self, cand: Candidate) -> Artifact:
        """Convert, or reuse what another target of this build converted to the same file."""
        ctx = self._ctx(cand, self.work / f"{self._n}-{cand.label}")
        key = ArtifactKey(self.profile.format, cand.precision.value, cand.keep_float, self.backend.variant(ctx))
        cached = self.env.cache.artifacts.get(key)
        if cached is None:
            self.say(f"{cand.label}: converting")
            try:
                cached = self.backend.convert(ctx)
            except ConversionError as e:
                cached = e
            self.env.cache.artifacts[key] = cached
        if isinstance(cached, ConversionError):
            raise cached
        return cached

    def _validate(self, trial: Trial) -> None:
        art, env = trial.artifact, self.env
        try:
            rt = self._runtime(art)
        except RuntimeUnavailableError as e:
            if not self.auto:
                raise
            trial.verdict, trial.why = "error", f"converted, but the runtime cannot load it: {str(e).splitlines()[0][:300]}"
            return
        trial.specs = tensor_specs(rt, env.source, art, self.backend, env.valid.samples[0])
        trial.findings = self.backend.lint(art, self.profile, allow_flex=self.opts.allow_flex,
                                           inputs=trial.specs[0], outputs=trial.specs[1])
        fail_on(trial.findings, self.profile)
        if rt is None:  # Flex ops: no runtime here can run it, so it cannot be judged
            trial.verdict, trial.why = "passed", "NOT VALIDATED: no runtime on this host has the Flex delegate"
            return
        self.say(f"{trial.candidate.label}: validating on {len(env.valid)} samples")
        try:
            trial.outputs = [rt.infer(s) for s in env.valid.samples]
        finally:
            rt.close()
        names = [o.name for o in trial.specs[1]]
        missing = [n for n in names if n not in env.reference[0]]
        if missing:
            raise InputError(f"bundle outputs {missing} do not match the reference outputs {sorted(env.reference[0])}")
        trial.accuracy = compare(env.reference, trial.outputs, names, env.valid.labels)
        why = judge(trial.accuracy, self.opts.gate)
        if why:
            trial.verdict, trial.why = "accuracy", "; ".join(why)

    def _measure(self, trial: Trial) -> None:
        """Speed gate: CPU targets, candidates below fp32, --quantize auto."""
        quantized = trial.candidate.precision is not Precision.FP32 and self.env.source.kind.value != "tflite"
        if self.profile.is_cpu and quantized:
            fp32_size = self.backend.fp32(self._ctx(trial.candidate)).stat().st_size
            # Auto's first-pass search asks the host one thing of a smaller candidate: is it slower than fp32?
            # ('faster' only matters to one no smaller, and to --search thorough, which ranks the medians.)
            only_slower = (self.auto and self.opts.search is Search.FIRST and self.opts.profile_on is None
                           and trial.size_bytes < fp32_size)
            trial.latency = self.latency(trial.artifact, label=trial.candidate.label,
                                         question="slower" if only_slower else "verdict")
            r = trial.latency["ratio"]
            if self.opts.profile_on is not None:  # the device's figures decide; the host's are reported beside
                from packager.device_profile import device_latency

                trial.device_latency = device_latency(self, trial)
                r = trial.device_latency["ratio"]
                if self.auto and r["verdict"] == "slower":
                    trial.verdict = "slower"
                    trial.why = (f"{r['median']:.2f}x the fp32 p50 latency on device {trial.device_latency['device']} "
                                 f"(host: {trial.latency['ratio']['median']:.2f}x)")
                    return
            elif self.auto and r["verdict"] == "slower":
                trial.verdict = "slower"
                trial.why = (f"{r['median']:.2f}x the fp32 latency (inter-quartile {r['q1']:.2f}-{r['q3']:.2f}x over "
                             f"{trial.latency['rounds']} interleaved rounds)")
                return
            if self.auto and trial.size_bytes >= fp32_size and r["verdict"] != "faster":
                trial.verdict = "no gain"
                trial.why = (f"no smaller than fp32 ({trial.size_bytes / fp32_size:.2f}x) and not faster "
                             f"({r['median']:.2f}x)")
                return
        trial.verdict = "passed"

    def latency(self, art: Artifact, *, baseline: bool = False, label: str = "", question: str = "verdict") -> dict:
        """The candidate against fp32, interleaved in the clean timing worker (or, for the fp32
        model itself, its own latency)."""
        base = spec_for(self.backend.fp32(self._ctx(Candidate(Precision.FP32))), self.profile)
        known = self.env.cache.fp32_latency.get(base)
        if baseline and known is not None:  # fp32 itself was chosen: it was timed beside the candidates
            return dict(known, profile_threads=self.profile.threads)
        self.say("timing in a clean process" + ("" if baseline else " against fp32"))
        res = self.env.cache.timer.compare(base, None if baseline else spec_for(art.path, self.profile),
                                           self.env.valid.samples[0], budget_s=self.opts.bench_seconds,
                                           max_rounds=self.opts.bench_runs, question=question)
        res["profile_threads"] = self.profile.threads
        if not baseline:  # the fp32 side of an interleaved comparison is fp32's own latency, same worker
            self.env.cache.fp32_latency[base] = {
                "a_ms": res["a_ms"], "b_ms": res["a_ms"], "baseline": True, "threads": res["threads"][:1],
                "host_cores": res["host_cores"], "runtime": res["runtime"][:1],
                "from": f"fp32's side of {res['rounds']} interleaved rounds against {label or art.precision.value}"}
        return res

    def _runtime(self, art: Artifact):
        try:
            return load_runtime(art.path, fmt=art.format.value, threads=threads_for(self.profile.threads),
                                delegates=tuple(d for d in self.profile.delegates if d != "edgetpu"),
                                providers=("CPUExecutionProvider",))
        except RuntimeUnavailableError:
            if self.opts.allow_flex and _has_flex(art):
                return None  # stock runtimes lack the Flex delegate: packaged, clearly unvalidated
            raise

    # ---- choose ----

    def _choose(self, trials: list[Trial]) -> Trial:
        passed = [t for t in trials if t.passed]
        if not passed:
            raise self._failure(trials)
        if self.opts.search is Search.THOROUGH and len(passed) > 1:
            chosen = min(passed, key=lambda t: (t.device_latency or t.latency or {"ratio": {"median": 1.0}})["ratio"]["median"])
            chosen.why = f"fastest of {len(passed)} candidates that pass both gates"
        else:
            chosen = passed[0]
            chosen.why = chosen.why or ("the precision asked for" if not self.auto
                                        else "first candidate on the ladder that passes both gates")
        chosen.verdict = "chosen"
        return chosen

    def _failure(self, trials: list[Trial]) -> EdgepackError:
        p, last = self.profile, trials[-1]
        rows = "; ".join(f"{t.candidate.label if t.candidate else t.step.label}: {t.why}" for t in trials)
        if not any(t.verdict == "accuracy" for t in trials):
            err = ConversionError(f"{p.name}: no candidate could be built ({rows})",
                                  hint="try another --quantize or --opset, or another target")
        else:
            hint = self.backend.gate_hint(p, last.step.precision)
            if "edgetpu" in p.delegates:
                worst = self._blame(last)[:5]
                if worst:
                    hint = "where int8 loses the accuracy: " + "; ".join(b.text() for b in worst) + ". " + hint
            elif not self.auto:
                hint = self._passing_hint(last) or hint
            err = AccuracyGateError(f"{p.name}: fails the accuracy gate ({rows}); no bundle written", hint=hint)
        err.trials = trials
        return err

    def _passing_hint(self, failed: Trial) -> str | None:
        """After an explicit precision failed: the next precision down the ladder that passes."""
        for step in fallbacks(self.profile, failed.step.precision):
            if step.mixed or (step.precision in CALIBRATED and self.env.calib is None):
                continue
            trial = Trial(step, Candidate(step.precision))
            try:
                trial.artifact = self._convert(trial.candidate)
                self._validate(trial)
            except EdgepackError:
                continue
            if trial.verdict != "accuracy":
                acc = trial.accuracy or {}
                fig = (f"drop {acc['accuracy_drop_points']:.2f} pt" if acc.get("accuracy_drop_points") is not None
                       else f"cosine {acc.get('cosine_similarity', 0):.4f}")
                return f"--quantize {step.precision.value} passes the gate ({fig})"
        return None


def _loss(trial: Trial) -> float:
    """How far a candidate is from the reference, for comparing rounds of one precision."""
    acc = trial.accuracy or {}
    if acc.get("accuracy_drop_points") is not None:
        return acc["accuracy_drop_points"]
    return 1 - min(m["cosine_similarity"] for m in acc["outputs"].values()) if acc.get("outputs") else float("inf")


def fail_on(findings: list, profile: TargetProfile) -> None:
    errs = lint.errors(findings)
    if errs:
        err = UnsupportedOpError(f"{profile.name}: " + "; ".join(f.message for f in errs),
                                 hint="see `edgepack targets show " + profile.name + "` for what this target needs")
        err.findings = findings
        raise err


def tensor_specs(rt, source, art: Artifact, back, sample: dict) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Manifest specs from the runtime (dtypes, quantization) with the source's resolved shapes
    (outputs: as `sample` gives them); from the model file when no runtime here can run it."""
    resolved = {s.name: s.shape for s in source.inputs}
    if rt is None:
        ins_info, outs_info = back.describe(art.path)
        out_shapes = {t.name: tuple(max(d, 1) for d in t.shape) for t in outs_info}
    else:
        ins_info, outs_info = rt.inputs, rt.outputs
        probe = rt.infer(sample, raw=True)
        out_shapes = {k: v.shape for k, v in probe.items()}

    def spec(t, shape) -> TensorSpec:
        q = Quantization(t.scale, t.zero_point) if t.quantized else None
        return TensorSpec(name=t.name, shape=tuple(shape), dtype=t.dtype, shape_signature=tuple(t.shape), quantization=q)

    ins = tuple(spec(t, resolved.get(t.name, tuple(max(d, 1) for d in t.shape))) for t in ins_info)
    outs = tuple(spec(t, out_shapes[t.name]) for t in outs_info)
    return ins, outs


def _has_flex(art: Artifact) -> bool:
    from packager.formats.tflite_fb import ops_with_versions

    return art.format.value == "tflite" and any(n.startswith("Flex") for n, _ in ops_with_versions(art.path.read_bytes()))
