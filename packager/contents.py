"""What a bundle holds beside its model, assembled in one place for real bundles (package.py)
and for --profile-on probe bundles (device_profile.py) alike: tensor specs, golden data, the
runtime section and the manifest."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgebundle.manifest import Manifest, Quantization, TensorSpec
from edgeruntime import Runtime
from packager.evaluate import golden_tolerance
from packager.sources import Source
from targets import TargetProfile

GOLDEN_COUNT = 3
Specs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


def tensor_specs(rt: Runtime | None, source: Source, *, described, sample: dict) -> Specs:
    """Manifest specs from the runtime (dtypes, quantization) with the source's resolved shapes
    (outputs: as `sample` gives them); from `described()`, the model file's own (inputs, outputs),
    when no runtime here can run it."""
    resolved = {s.name: s.shape for s in source.inputs}
    if rt is None:
        ins_info, outs_info = described()
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


def write_golden(dest: Path, samples: list[dict], outputs: list[dict], *, precision: str, buckets=()) -> dict:
    """The first validation samples and the model's outputs on them, for the device's golden check,
    and each length bucket's own (`bucket.LENGTH.input...`); returns the manifest's golden section."""
    samples, outs = samples[:GOLDEN_COUNT], outputs[:GOLDEN_COUNT]
    arrays = _golden_arrays("", samples, outs)
    for b in buckets:
        arrays.update(_golden_arrays(f"bucket.{b.length}.", b.golden_inputs, b.golden_outputs))
    np.savez(dest, **arrays)
    return {"file": "golden.npz", "count": len(samples), "atol": golden_tolerance(precision, outs), "rtol": 0.0}


def _golden_arrays(prefix: str, samples, outputs) -> dict[str, np.ndarray]:
    arrays = {f"{prefix}input.{i}.{k}": np.asarray(v) for i, s in enumerate(samples) for k, v in s.items()}
    arrays.update({f"{prefix}output.{i}.{k}": np.asarray(v) for i, s in enumerate(outputs) for k, v in s.items()})
    return arrays


def runtime_section(profile: TargetProfile, *, flex: bool, compiled: bool | None,
                    trt_profile: dict | None = None, memory_bytes: int | None = None) -> dict:
    """The manifest's runtime settings: what the device loads the model with (a TensorRT
    optimisation profile only where the build computed one, the memory the model took when the
    build loaded and ran it in the clean timing process: older manifests lack those keys)."""
    out = {"name": profile.runtime, "min_version": profile.min_runtime_version, "threads": profile.threads,
           "delegates": list(profile.delegates), "providers": list(profile.providers),
           "tensorrt_fp16": profile.tensorrt_fp16, "tensorrt_engine_cache": profile.tensorrt_engine_cache,
           "cpu_fallback": profile.cpu_fallback, "flex": flex, "edgetpu_compiled": compiled}
    if trt_profile:
        out["tensorrt_profile"] = trt_profile
    if memory_bytes:
        out["memory_bytes"] = int(memory_bytes)
    return out


def manifest(profile: TargetProfile, *, name: str, version: str, precision: str, model_file: str, specs: Specs,
             golden: dict | None, flex: bool = False, compiled: bool | None = None, trt_profile: dict | None = None,
             memory_bytes: int | None = None, **sections) -> Manifest:
    """A bundle's manifest for `profile`; `sections` are the Manifest's optional fields (report, ...)."""
    return Manifest(name=name, version=version,
                    target={"name": profile.name, "sha256": profile.sha256, "profile": profile.to_dict()},
                    format=profile.format.value, precision=precision, model_file=model_file, inputs=specs[0],
                    outputs=specs[1], golden=golden,
                    runtime=runtime_section(profile, flex=flex, compiled=compiled, trt_profile=trt_profile,
                                            memory_bytes=memory_bytes), **sections)


# The tokenizer parity check's texts: casing, accents, punctuation, digits, non-Latin scripts, an
# emoji and a text past any max_length, where a drifted tokenizer library shows first.
PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "HELLO, World! It's 3.14159 -- isn't it?",
    "Café naïve résumé façade: déjà vu, Œuvre, straße.",
    "東京は日本の首都です。 Привет, мир! مرحبا",
    "e-mail: someone@example.org; URL https://example.org/a?b=c#d \U0001F600 #edge",
    " ".join(["tokenization"] * 600),
)


def text_section(text, *, settings=None, buckets=()) -> dict:
    """The manifest's text section: the tokenizer file, its settings (`settings`: with a TFLite
    bundle's length buckets), golden texts with the ids this build's tokenizer gives them (the device
    re-tokenizes them at load and refuses a mismatch) and the bucket models (sequence.Bucket)."""
    enc = text.encoder()
    out = {"tokenizer": "tokenizer.json", "settings": (settings or text.settings).to_dict(),
           "golden_texts": list(PARITY_TEXTS), "golden_ids": enc.ids(list(PARITY_TEXTS))}
    return dict(out, buckets=[b.to_dict() for b in buckets]) if buckets else out
