"""`edgepack build --profile-on DEVICE`: the speed gate asks the user's own device.

Each quantized candidate of a CPU target, and that target's fp32 model, are wrapped in a small
probe bundle (the candidate's model file, its golden outputs on the first validation samples,
the target's runtime settings; signed like the build's bundles) and profiled on the device with
a profile job (the fleet side's, handed in by the `edgepack` command as a Profiler). The
candidate's ratio is its device p50 over the fp32 model's device p50. As on the host, a verdict
needs the spread to agree, not just the medians: "slower" when even the candidate's fastest
quarter (p25) is over 1 + NOISE_FLOOR times the fp32 model's p75, "faster" when its p75 is under
1 - NOISE_FLOOR times the fp32 p25; otherwise "within noise" (a busy device or a tiny model makes
sequential timings noisy). The host's interleaved figures are still measured
and reported beside the device's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgebundle.archive import write_bundle
from edgebundle.errors import InputError
from edgeruntime.timing import NOISE_FLOOR
from packager import contents
from packager.figures import DeviceRatio, DeviceTiming, Speed
from packager.options import BuildInputs, DeviceTarget, Profiler
from packager.registry import Backend
from packager.results import Trial
from targets import TargetProfile


def device_latency(trial: Trial, *, inputs: BuildInputs, profile: TargetProfile, backend: Backend, fp32: Path,
                   work: Path) -> DeviceTiming:
    """The candidate against fp32, each profiled on the device (fp32 once per target)."""
    target: DeviceTarget = inputs.opts.profile_on
    cache = inputs.cache.device_profiles
    probe = _Probe(inputs, profile, backend)
    if (profile.name, str(fp32)) not in cache:
        probe.say(f"fp32: profiling on device {target.device}")
        cache[(profile.name, str(fp32))] = probe.measure(probe.bundle(fp32, "fp32", work / "device-fp32.edgepack"))
    fp32_figures = cache[(profile.name, str(fp32))]
    label = trial.candidate.label
    probe.say(f"{label}: profiling on device {target.device}")
    cand = probe.measure(probe.bundle(trial.artifact.path, trial.candidate.precision.value,
                                      work / f"device-{label}.edgepack", outputs=trial.outputs, specs=trial.specs))
    fa, fb = _Percentiles.of(fp32_figures), _Percentiles.of(cand)
    ratio = fb.p50 / fa.p50 if fa.p50 > 0 else float("inf")
    if fb.p25 > (1 + NOISE_FLOOR) * fa.p75:
        verdict = Speed.SLOWER
    elif fb.p75 < (1 - NOISE_FLOOR) * fa.p25:
        verdict = Speed.FASTER
    else:
        verdict = Speed.WITHIN_NOISE
    return DeviceTiming(device=target.device, a_ms=fa.p50, b_ms=fb.p50,
                        ratio=DeviceRatio(median=round(ratio, 4), verdict=verdict,
                                          q1_vs_q3=round(fb.p25 / fa.p75, 4) if fa.p75 else None),
                        fp32=_brief(fp32_figures), candidate=_brief(cand))


@dataclass(frozen=True)
class _Percentiles:
    """A profile job's latency percentiles (its figures' latency_ms), in milliseconds."""

    p25: float
    p50: float
    p75: float

    @classmethod
    def of(cls, figures: dict) -> "_Percentiles":
        ms = figures.get("latency_ms") or {}
        return cls(p25=ms.get("p25"), p50=ms.get("p50"), p75=ms.get("p75"))


def _brief(f: dict) -> dict:
    keys = ("latency_ms", "throughput_ips", "runs", "load_ms", "rss_delta_bytes", "provider", "threads", "golden_ok",
            "paused_s")
    return {k: f.get(k) for k in keys}


class _Probe:
    """Probe bundles for one target, and the profile jobs that measure them."""

    def __init__(self, inputs: BuildInputs, profile: TargetProfile, backend: Backend):
        self.inputs, self.target_profile, self.backend = inputs, profile, backend

    def say(self, msg: str) -> None:
        self.inputs.progress(f"[{self.target_profile.name}] {msg}")

    def measure(self, probe: Path) -> dict:
        target: DeviceTarget = self.inputs.opts.profile_on
        if target.profiler is None:
            raise InputError("--profile-on needs the fleet side to run profile jobs; use the `edgepack` command")
        [figures] = target.profiler([probe], target, self.inputs.opts.sign_key)
        return figures

    def bundle(self, model: Path, precision: str, dest: Path, *, outputs=None, specs=None) -> Path:
        """A bundle that only a profile job will ever load: the model file, golden outputs, runtime settings."""
        inputs, p = self.inputs, self.target_profile
        if outputs is None or not specs or not specs[0]:
            rt = self.backend.host_runtime(model, p)
            try:
                specs = contents.tensor_specs(rt, inputs.source, described=None, sample=inputs.valid.samples[0])
                outputs = [rt.infer(s) for s in inputs.fed(specs[0])[:contents.GOLDEN_COUNT]]
            finally:
                rt.close()
        samples = inputs.fed(specs[0])[:contents.GOLDEN_COUNT]  # what the outputs came from
        gpath = dest.with_suffix(".golden.npz")
        golden = contents.write_golden(gpath, samples, outputs, precision=precision)
        name = f"model{model.suffix}"
        m = contents.manifest(p, name=inputs.name, version=inputs.opts.version, precision=precision, model_file=name,
                              specs=specs, golden=golden, production_ready=False,
                              report={"probe": "built by edgepack build --profile-on for a profile job; never "
                                               "deployed"})
        write_bundle(dest, m, {name: model, "golden.npz": gpath}, signer=inputs.signer)
        return dest


__all__ = ["DeviceTarget", "Profiler", "device_latency"]
