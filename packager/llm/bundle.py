"""A generative bundle: the exported decoder folder (model.onnx + its external weights, genai_config.json,
tokenizer, chat template) with a manifest of format "genai" whose `generation` section says how the device
generates: defaults, context length, KV-cache bytes per token, stop tokens and golden prompts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgebundle.archive import write_bundle
from edgebundle.generation import GenerationDefaults
from edgebundle.manifest import Manifest, TensorSpec
from packager.llm.export import Exported
from targets import TargetProfile

MODEL_FILE = "model.onnx"
GOLDEN_AGREEMENT = 0.9  # share of golden positions a device must reproduce (near-ties may flip on other CPUs)


def defaults_of(folder: Path) -> GenerationDefaults:
    """The source's generation_config.json as request defaults (greedy where it does not sample)."""
    import json

    try:
        g = json.loads((Path(folder) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return GenerationDefaults()
    sample = bool(g.get("do_sample"))
    return GenerationDefaults(max_tokens=int(g.get("max_new_tokens") or 256),
                              temperature=float(g.get("temperature", 1.0)) if sample else 0.0,
                              top_p=float(g.get("top_p", 1.0)) if sample else 1.0,
                              top_k=int(g.get("top_k", 0) or 0) if sample else 0)


@dataclass(frozen=True)
class Golden:
    prompt: str
    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]  # the candidate's greedy tokens on the build host

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "prompt_ids": list(self.prompt_ids), "ids": list(self.ids)}


@dataclass(frozen=True)
class Contents:
    name: str
    version: str
    profile: TargetProfile
    exported: Exported
    defaults: GenerationDefaults
    golden: tuple[Golden, ...]
    report: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    threads: int = 0
    load_bytes: int = 0  # measured RSS growth of loading the model (timing child); 0: not measured


def manifest(c: Contents) -> Manifest:
    ex = c.exported
    files = sorted(p.name for p in ex.folder.iterdir() if p.is_file())
    gen = {"config": "genai_config.json", "tokenizer": "tokenizer.json",
           "chat_template": "chat_template.jinja" if "chat_template.jinja" in files else None,
           "defaults": c.defaults.to_dict(), "context_length": ex.context_length,
           "kv_bytes_per_token": ex.kv_bytes_per_token, "eos_token_ids": list(ex.eos_token_ids),
           "golden": [g.to_dict() for g in c.golden], "golden_agreement": GOLDEN_AGREEMENT}
    if ex.lora is not None:  # LoRA slots: adapter bundles (packager.llm.adapter) fill them
        gen["lora"] = ex.lora.to_dict()
    runtime = {"name": "onnxruntime-genai", "min_version": "0.18.0", "threads": c.threads, "delegates": [],
               "providers": list(c.providers), "tensorrt_fp16": False, "tensorrt_engine_cache": False,
               "cpu_fallback": c.profile.cpu_fallback, "flex": False, "edgetpu_compiled": None,
               # what loading took (measured; the files' bytes where not) plus the KV cache at the full context
               "memory_bytes": (c.load_bytes or ex.weight_bytes) + ex.kv_bytes_per_token * ex.context_length}
    return Manifest(
        name=c.name, version=c.version,
        target={"name": c.profile.name, "sha256": c.profile.sha256, "profile": c.profile.to_dict()},
        format="genai", precision=ex.recipe.precision, model_file=MODEL_FILE,
        inputs=(TensorSpec("input_ids", (1, 16), "int64", shape_signature=(1, -1)),),
        outputs=(TensorSpec("logits", (1, 16, _vocab(ex)), "float32", shape_signature=(1, -1, _vocab(ex))),),
        runtime=runtime, quantization={"recipe": ex.recipe.label, "precision": ex.recipe.precision,
                                       "block_size": ex.recipe.block_size,
                                       "accuracy_level": ex.recipe.accuracy_level},
        provenance=dict(c.provenance), report=dict(c.report), warnings=tuple(c.warnings), generation=gen)


def _vocab(ex: Exported) -> int:
    import json

    return int(json.loads((ex.folder / "genai_config.json").read_text())["model"]["vocab_size"])


def write(c: Contents, out_dir: Path, *, signer=None) -> Path:
    m = manifest(c)
    files = {p.name: p for p in c.exported.folder.iterdir() if p.is_file()}
    dest = Path(out_dir) / m.file_name
    write_bundle(dest, m, files, signer=signer)
    return dest
