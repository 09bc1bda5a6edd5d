"""`edgepack build --profile-on DEVICE`: the speed gate asks the user's own device.

Each quantized candidate of a CPU target, and that target's fp32 model, are wrapped in a small
probe bundle (the candidate's model file, its golden outputs on the first validation samples,
the target's runtime settings; signed like the build's bundles) and profiled on the device with
a profile job (the fleet side's, handed in by the `edgepack` command as a Profiler). The candidate's ratio is its device p50 over the fp32 model's device
p50. As on the host, a verdict needs the spread to agree, not just the medians: "slower" when even
the candidate's fastest quarter (p25) is over 1 + NOISE_FLOOR times the fp32 model's p75, "faster"
when its p75 is under 1 - NOISE_FLOOR times the fp32 p25; otherwise "within noise" (a busy device
or a tiny model makes sequential timings noisy). The host's interleaved figures are still measured
and reported beside the device's."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from edgeruntime.timing import NOISE_FLOOR
from edgebundle.errors import InputError
from edgeproto.broker import BrokerConfig
from edgeproto.jobs import BenchSettings

GOLDEN_COUNT = 3

# (probe bundles, the DeviceTarget, the signing key) -> each bundle's profile-job figures
Profiler = Callable[[list[Path], "DeviceTarget", "Path | None"], list[dict]]


@dataclass(frozen=True)
class DeviceTarget:
    """Which device measures, through which broker, for how long per bundle."""

    device: str
    broker: BrokerConfig
    bench: BenchSettings = field(default_factory=lambda: BenchSettings(runs=200, warmup=5, max_seconds=5.0))
    timeout_s: float = 300.0
    profiler: Profiler | None = None  # runs the profile jobs (fleet.profile, wired in by edgepack.cli)

    def __post_init__(self):
        import re

        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", self.device or ""):
            raise InputError(f"--profile-on {self.device!r} is not a device id (1-64 letters, digits, '.', '_', '-')")


def device_latency(tb, trial) -> dict:
    """The candidate against fp32, each profiled on the device (fp32 once per target)."""
    target: DeviceTarget = tb.opts.profile_on
    cache = tb.env.cache.device_profiles
    base = tb.backend.fp32(tb._ctx(trial.candidate))
    if (tb.profile.name, str(base)) not in cache:
        tb.say(f"fp32: profiling on device {target.device}")
        probe = _probe(tb, base, "fp32", tb.work / "device-fp32.edgepack")
        cache[(tb.profile.name, str(base))] = _profile(tb, probe)
    fp32 = cache[(tb.profile.name, str(base))]
    tb.say(f"{trial.candidate.label}: profiling on device {target.device}")
    probe = _probe(tb, trial.artifact.path, trial.candidate.precision.value,
                   tb.work / f"device-{trial.candidate.label}.edgepack", outputs=trial.outputs, specs=trial.specs)
    cand = _profile(tb, probe)
    fa, fb = fp32["latency_ms"], cand["latency_ms"]
    a, b = fa["p50"], fb["p50"]
    ratio = b / a if a > 0 else float("inf")
    if fb["p25"] > (1 + NOISE_FLOOR) * fa["p75"]:
        verdict = "slower"
    elif fb["p75"] < (1 - NOISE_FLOOR) * fa["p25"]:
        verdict = "faster"
    else:
        verdict = "within noise"
    return {"device": target.device, "a_ms": a, "b_ms": b,
            "ratio": {"median": round(ratio, 4), "q1_vs_q3": round(fb["p25"] / fa["p75"], 4) if fa["p75"] else None,
                      "verdict": verdict, "of": "p50"},
            "fp32": _brief(fp32), "candidate": _brief(cand)}


def _brief(f: dict) -> dict:
    keys = ("latency_ms", "throughput_ips", "runs", "load_ms", "rss_delta_bytes", "provider", "threads", "golden_ok",
            "paused_s")
    return {k: f.get(k) for k in keys}


def _profile(tb, probe: Path) -> dict:
    target: DeviceTarget = tb.opts.profile_on
    if target.profiler is None:
        raise InputError("--profile-on needs the fleet side to run profile jobs; use the `edgepack` command")
    [figures] = target.profiler([probe], target, tb.opts.sign_key)
    return figures


def _probe(tb, model: Path, precision: str, dest: Path, *, outputs=None, specs=None) -> Path:
    """A bundle that only a profile job will ever load: the model file, golden outputs, runtime settings."""
    from edgeruntime import load_runtime
    from edgebundle.archive import write_bundle
    from edgebundle.manifest import Manifest
    from packager.evaluate import golden_tolerance
    from packager.package import _runtime_section
    from packager.steps import tensor_specs
    from packager.timing import threads_for

    env, p = tb.env, tb.profile
    samples = env.valid.samples[:GOLDEN_COUNT]
    if outputs is None or not specs or not specs[0]:
        rt = load_runtime(model, fmt=p.format.value, threads=threads_for(p.threads),
                          delegates=tuple(d for d in p.delegates if d != "edgetpu"), providers=("CPUExecutionProvider",))
        try:
            specs = tensor_specs(rt, env.source, SimpleNamespace(path=model), tb.backend, samples[0])
            outputs = [rt.infer(s) for s in samples]
        finally:
            rt.close()
    outs = outputs[:GOLDEN_COUNT]
    gpath = dest.with_suffix(".golden.npz")
    arrays = {f"input.{i}.{k}": v for i, s in enumerate(samples) for k, v in s.items()}
    arrays.update({f"output.{i}.{k}": np.asarray(v) for i, s in enumerate(outs) for k, v in s.items()})
    np.savez(gpath, **arrays)
    name = f"model{model.suffix}"
    m = Manifest(name=env.name, version=tb.opts.version,
                 target={"name": p.name, "sha256": p.sha256, "profile": p.to_dict()}, format=p.format.value,
                 precision=precision, model_file=name, inputs=specs[0], outputs=specs[1],
                 runtime=_runtime_section(p, SimpleNamespace(compile_report=None), []),
                 golden={"file": "golden.npz", "count": len(samples), "atol": golden_tolerance(precision, outs),
                         "rtol": 0.0},
                 report={"probe": "built by edgepack build --profile-on for a profile job; never deployed"},
                 production_ready=False)
    write_bundle(dest, m, {name: model, "golden.npz": gpath}, signer=env.signer)
    return dest


__all__ = ["DeviceTarget", "device_latency"]
