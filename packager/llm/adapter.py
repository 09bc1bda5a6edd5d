"""`edgepack build MODEL --adapter PEFT_DIR --base BASE.edgepack -t TARGET`: a LoRA adapter as a signed
bundle of its own (format genai-adapter), kilobytes to a few megabytes beside a base of hundreds, pinned to
that base's weights.

The base bundle is verified and must carry LoRA slots the adapter fits (its adapter_config.json is checked
against them before any work). The adapted float model (PEFT on MODEL, the base's source folder, in a
child) gives the reference on held-out text and the adapter's weights as the graph computes them; those
are written as an onnxruntime adapter file, run beside the base's own decoder (extracted from the bundle)
and scored against that reference with the generation gate. The golden prompts are the base's, with the
adapted greedy tokens of this host. The manifest pins the base's weights sha256 (`Manifest.weights_sha256`):
a rebuild of the same weights still matches, any other base refuses the adapter."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from edgebundle.errors import AccuracyGateError, InputError
from packager.llm import lora
from packager.llm.bundle import GOLDEN_AGREEMENT, Golden
from packager.llm.quality import Gate, Quality, reference, score

Progress = Callable[[str], None]
CANDIDATE = "candidate"
PRECISION = {"float32": "fp32", "float16": "fp16"}


@dataclass(frozen=True)
class AdapterOptions:
    model: Path  # the base's source folder: the float model the adapter was trained on
    adapter: Path  # a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)
    base: Path  # the base bundle, built with --lora-slots
    target: str
    out_dir: Path
    name: str | None = None
    version: str = "1.0.0"
    validation: Path | None = None
    gate: Gate = Gate()
    sign_key: Path | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class AdapterBuild:
    name: str
    version: str
    target: str
    bundle: Path
    bundle_bytes: int
    base: Path
    base_bytes: int
    quality: Quality  # the adapted decoder against the adapted float model
    base_quality: Quality  # the bare base against the same reference: what the adapter changes
    seconds: float
    shared: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema": "edgepack.build-report/1", "model": str(self.base), "source_format": "lora-adapter",
                "ok": True, "seconds": round(self.seconds, 2), "shared": self.shared,
                "targets": [{"target": self.target, "ok": True, "format": "genai-adapter", "bundle": str(self.bundle),
                             "bundle_bytes": self.bundle_bytes, "base_bundle": str(self.base),
                             "base_bundle_bytes": self.base_bytes, "quality": self.quality.to_dict(),
                             "base_quality": self.base_quality.to_dict(), "error": None, "error_kind": None}]}


def table(report: dict) -> str:
    t = report["targets"][0]
    q, q0 = t["quality"], t["base_quality"]
    share = t["bundle_bytes"] / t["base_bundle_bytes"] if t["base_bundle_bytes"] else 0
    return (f"{t['target']}: {t['bundle']} ({t['bundle_bytes']} bytes, {share:.2%} of the base bundle)\n"
            f"  adapted decoder vs the adapted float model: agreement {q['agreement']:.1%}, perplexity "
            f"x{q['ppl_ratio']:.3f} on {q['positions']} tokens\n"
            f"  the bare base vs the same reference:       agreement {q0['agreement']:.1%}, perplexity "
            f"x{q0['ppl_ratio']:.3f}\n"
            f"  built in {report['seconds']:.1f} s")


def check_fit(cfg: dict, slots: lora.Slots, base_name: str) -> None:
    """An adapter's rank and targets against a base's slots, from its config alone (before any work)."""
    rank, targets = lora.adapter_rank(cfg), lora.adapter_targets(cfg)
    missing = [t for t in targets if t not in slots.targets]
    if missing or rank > slots.rank:
        why = (f"targets {', '.join(missing)} have no slot" if missing else "") + (
            "; " if missing and rank > slots.rank else "") + (
            f"rank {rank} is above the slots' rank {slots.rank}" if rank > slots.rank else "")
        raise InputError(f"the adapter does not fit {base_name}'s LoRA slots: {why}",
                         hint=f"the base has slots of rank {slots.rank} on {', '.join(slots.targets)}: train the "
                              "adapter for those (rank at most that), or rebuild the base with --lora-slots "
                              "ADAPTER_DIR")


def build_adapter(opts: AdapterOptions, *, progress: Progress = lambda _m: None) -> AdapterBuild:
    from edgebundle.archive import verify_bundle, write_bundle
    from packager.llm.build import validation_texts
    from packager.llm import common

    t0 = time.perf_counter()
    cfg = lora.peft_config(opts.adapter)
    base = verify_bundle(opts.base)
    bm = base.manifest
    if bm.format != "genai":
        raise InputError(f"{opts.base.name} is a {bm.format} bundle; an adapter's base is a generative (genai) bundle")
    if not bm.generation.get("lora"):
        raise InputError(f"{opts.base.name} has no LoRA slots: an adapter cannot be switched into it",
                         hint="rebuild the base with --lora-slots r=RANK,targets=q_proj,v_proj (or --lora-slots "
                              "ADAPTER_DIR); its outputs stay the base's until an adapter is active")
    if bm.target.get("name") != opts.target:
        raise InputError(f"{opts.base.name} was built for {bm.target.get('name')}, not {opts.target}",
                         hint="an adapter is built for its base's target: pass that -t")
    slots = lora.Slots.from_dict(bm.generation["lora"])
    check_fit(cfg, slots, opts.base.name)
    name = opts.name or common.default_name(opts.adapter)
    dest = Path(opts.out_dir) / f"{name}-{opts.version}-{opts.target}.edgepack"
    if dest.exists() and not opts.overwrite:
        raise InputError(f"{opts.out_dir} already holds {dest.name}",
                         hint="build a new --version, into another --out-dir, or pass --overwrite to replace it")
    texts, text_source = validation_texts(opts.validation)
    signer = common.signer(opts.sign_key)
    with tempfile.TemporaryDirectory(prefix="edgepack-adapter-") as tmp:
        work = Path(tmp)
        folder = work / "base"
        base.extract(folder)
        progress(f"adapted float reference (PEFT on {Path(opts.model).name}, fp32) on {len(texts)} held-out texts")
        ref = reference(Path(opts.model), texts, work / "reference", adapter=Path(opts.adapter))
        path = lora.write_adapter(lora.fit(ref.lora, slots), work / lora.ADAPTER_FILE)
        progress(f"scoring the adapter on {opts.base.name}'s decoder ({ref.positions} tokens)")
        q, q0, golden = _scored(folder / bm.model_file, path, ref, bm.generation["golden"])
        if not q.passes(opts.gate):
            raise AccuracyGateError(
                f"{opts.target}: the adapted decoder fails the generation gate against the adapted float model: "
                f"agreement {q.agreement:.1%} (needs {opts.gate.min_agreement:.0%}), perplexity x{q.ppl_ratio:.3f} "
                f"(at most {opts.gate.max_ppl_ratio}); the bare base scores {q0.agreement:.1%}",
                hint="is MODEL the folder the base was built from and the adapter trained on? Else loosen "
                     "--min-agreement/--max-ppl-ratio, or rebuild the base at a higher precision")
        shared = {"validation": {"source": text_source, "texts": len(texts)}, "gate": opts.gate.to_dict(),
                  "reference": {"parameters": ref.params, "positions": ref.positions,
                                "perplexity": round(ref.perplexity, 3), "seconds": round(ref.seconds, 1)}}
        m = _manifest(opts, name, bm, cfg, slots, golden, path.stat().st_size,
                      report={"quality": q.to_dict(), "base_quality": q0.to_dict(), **shared},
                      provenance=dict(common.provenance(opts), adapter=str(opts.adapter), base_bundle=str(opts.base)))
        progress(f"writing {dest.name}")
        write_bundle(dest, m, {lora.ADAPTER_FILE: path}, signer=signer)
    return AdapterBuild(name, opts.version, opts.target, dest, dest.stat().st_size, Path(opts.base),
                        Path(opts.base).stat().st_size, q, q0, time.perf_counter() - t0, shared)


def _scored(model_file: Path, adapter_file: Path, ref, base_golden: list[dict]):
    """The adapter's quality, the bare base's, and the adapted greedy tokens on the base's golden prompts."""
    from edgeruntime import LoadSpec, load_runtime
    from packager.llm import common

    rt = load_runtime(str(model_file), LoadSpec(format="genai", threads=common.threads(None), allow_cpu_fallback=True))
    try:
        rt.load_adapter(str(adapter_file), CANDIDATE)
        rt.activate(CANDIDATE)
        q = score(rt, ref)
        golden = tuple(Golden(g["prompt"], tuple(g["prompt_ids"]), tuple(rt.greedy(g["prompt_ids"], len(g["ids"]))))
                       for g in base_golden)
        rt.activate(None)
        return q, score(rt, ref), golden
    finally:
        rt.close()


def _manifest(opts: AdapterOptions, name: str, bm, cfg: dict, slots: lora.Slots, golden, size: int, *,
              report: dict, provenance: dict):
    from edgebundle.manifest import Manifest

    runtime = replace(bm.runtime, extra={**bm.runtime.extra, "memory_bytes": size})
    section = {"base_sha256": bm.weights_sha256, "base_name": bm.name, "base_version": bm.version,
               "rank": lora.adapter_rank(cfg), "targets": list(lora.adapter_targets(cfg)), "slots": slots.to_dict(),
               "golden": [g.to_dict() for g in golden], "golden_agreement": GOLDEN_AGREEMENT}
    return Manifest(name=name, version=opts.version, target=dict(bm.target), format="genai-adapter",
                    precision=PRECISION[slots.dtype], model_file=lora.ADAPTER_FILE, inputs=bm.inputs,
                    outputs=bm.outputs, runtime=runtime, report=report, provenance=provenance, adapter=section)

