"""One candidate's export: ONNX Runtime GenAI's model builder in a child process (packager.llm.ogbuild),
its folder's context length capped for the device, and the facts the bundle records about it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgebundle.errors import ConversionError
from packager.llm.lora import SlotSpec, Slots, slots_of

if TYPE_CHECKING:
    from packager.llm.cache import Source

BUILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Recipe:
    """How one candidate is made: weight precision, int4/int8 block size, MatMulNBits accuracy level
    (4: int8 activations, CPU's fast path), execution provider the graph is built for."""

    precision: str  # int4 | int8 | fp16 | fp32
    block_size: int | None = None
    accuracy_level: int | None = None
    ep: str = "cpu"

    @property
    def label(self) -> str:
        parts = [self.precision]
        if self.block_size:
            parts.append(f"b{self.block_size}")
        if self.accuracy_level:
            parts.append(f"a{self.accuracy_level}")
        if self.ep != "cpu":
            parts.append(self.ep)
        return "-".join(parts)

    def options(self) -> list[str]:
        opts = []
        if self.block_size:
            opts.append(f"block_size={self.block_size}")
        if self.accuracy_level:
            opts.append(f"accuracy_level={self.accuracy_level}")
        if self.ep == "cuda":  # Q/K RMS norm fused into attention runs on CUDA only: the graph the build
            opts.append("fuse_qk_norm_gqa=false")  # scores on its CPU must be the graph the device runs
        return opts


@dataclass(frozen=True)
class Exported:
    folder: Path
    recipe: Recipe
    weight_bytes: int  # every file of the folder: what the bundle carries
    context_length: int
    kv_bytes_per_token: int
    eos_token_ids: tuple[int, ...]
    lora: Slots | None = None  # the LoRA slots the graph carries (packager.llm.lora)


def export(src: Path, out: Path, recipe: Recipe, *, context_length: int | None = None,
           lora: SlotSpec | None = None) -> Exported:
    """Build `recipe` from the causal-LM folder `src` into `out` (replaced), with `lora` slots if given."""
    got = export_all(src, {recipe: out}, context_length=context_length, lora=lora)[recipe]
    if isinstance(got, ConversionError):
        raise got
    return got


def export_all(src: Path, jobs: dict[Recipe, Path], *, context_length: int | None = None,
               lora: SlotSpec | None = None, cache: Source | None = None) -> dict[Recipe, Exported | ConversionError]:
    """Every recipe of `jobs` built into its folder in one child process (torch imported once); a recipe
    the builder fails on gets its ConversionError, the others their Exported. With `lora`, every one
    carries those LoRA slots. With `cache`, a recipe exported before from the same folder is copied back."""
    import json
    import tempfile

    from packager.llm.cache import fetch, keep

    keys = {r: _key(cache, r, lora) for r in jobs} if cache else {}
    done: dict[Recipe, Exported | ConversionError] = {}
    for r, out in jobs.items():
        shutil.rmtree(out, ignore_errors=True)
        Path(f"{out}.status").unlink(missing_ok=True)
        if cache and fetch(cache.store, keys[r], out):
            done[r] = describe(out, r, context_length=context_length)
    jobs = {r: out for r, out in jobs.items() if r not in done}
    if not jobs:
        return done
    spec = [{"src": str(src), "out": str(out), "precision": r.precision, "ep": r.ep, "options": r.options(),
             "lora": lora.to_job() if lora else None} for r, out in jobs.items()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "packager.llm.ogbuild", f.name], capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S * len(jobs), env=env)
    except subprocess.TimeoutExpired:
        proc = None
    finally:
        os.unlink(f.name)
    for r, out in jobs.items():
        shutil.rmtree(f"{out}.cache", ignore_errors=True)
        shutil.rmtree(f"{out}.lora-template", ignore_errors=True)
        status = Path(f"{out}.status")
        msg = status.read_text().strip() if status.exists() else (
            "timed out" if proc is None else _last_line(proc.stderr) or f"exit code {proc.returncode}")
        status.unlink(missing_ok=True)
        if msg == "ok" and (out / "genai_config.json").exists():
            if cache:
                keep(cache.store, keys[r], out)  # as the builder wrote it: describe() caps the context after
            done[r] = describe(out, r, context_length=context_length)
        else:
            done[r] = ConversionError(f"onnxruntime-genai's model builder failed on {r.label}: {msg[:300]}",
                                      hint="is the folder a causal LM that onnxruntime-genai supports (Llama, "
                                           "Qwen2/3, Gemma 1-3, Phi, Mistral, SmolLM)?")
    return done


def _key(cache: Source, r: Recipe, lora: SlotSpec | None) -> str:
    from packager.llm.cache import digest_path

    slots = lora.to_job() if lora else None
    if slots and slots.get("template"):  # a PEFT folder: its bytes, not its path
        slots = dict(slots, template=digest_path(Path(slots["template"])))
    return cache.key("llm-export", precision=r.precision, ep=r.ep, options=r.options(), lora=slots)


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def describe(folder: Path, recipe: Recipe, *, context_length: int | None = None) -> Exported:
    """The exported folder's facts; with `context_length`, its genai_config is capped to it (the KV cache
    a device allocates grows with it: a 32k-token context is gigabytes a Pi does not have)."""
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    model = cfg["model"]
    if context_length:
        n = min(int(context_length), int(model["context_length"]))
        model["context_length"] = n
        cfg["search"]["max_length"] = min(int(cfg["search"].get("max_length", n)), n)
        path.write_text(json.dumps(cfg, indent=4) + "\n")
    dec = model["decoder"]
    io_bytes = 2 if recipe.precision in ("fp16", "bf16") or recipe.ep == "cuda" else 4
    kv = 2 * int(dec["num_hidden_layers"]) * int(dec["num_key_value_heads"]) * int(dec["head_size"]) * io_bytes
    eos = model.get("eos_token_id", [])
    eos = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return Exported(folder, recipe, size, int(model["context_length"]), kv, eos, slots_of(folder))
