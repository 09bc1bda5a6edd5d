"""`edgepack build` for a causal LM: one float reference, each recipe exported once and scored against it
on held-out text, the passing ones timed side by side in a clean child, and per target the fastest that
passes (ties broken by size) written as a signed genai bundle. A target that cannot run a decoder (an
Edge TPU) is refused before anything is exported."""
from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgebundle.errors import ConversionError, EdgepackError, InputError
from packager.llm import bundle, cache, common
from packager.llm.detect import is_causal_lm  # noqa: F401  (re-exported)
from packager.llm.export import Exported, Recipe, export_all
from packager.llm.lora import SlotSpec
from packager.llm.quality import Gate, Quality, Reference, reference, score
from packager.llm.timing import Speed, load_bytes, measure
from packager.results import Verdict
from packager.store import Store
from targets import TargetProfile

Progress = Callable[[str], None]
CUDA = "CUDAExecutionProvider"
TIE = 0.05  # decode speeds within 5 % of each other are a tie on any host: the smaller bundle wins
GOLDEN_PROMPTS = ("The capital of France is", "Here is a short story about a robot:",
                  "def fibonacci(n):", "Water boils at a temperature of")
GOLDEN_TOKENS = 16
TEMPLATE_FILE = "chat_template.jinja"  # what the bundle's generation section names (packager/llm/bundle.py)


@dataclass(frozen=True)
class LlmOptions:
    model: Path
    targets: tuple[str, ...]
    out_dir: Path
    name: str | None = None
    version: str = "1.0.0"
    precision: str = "auto"  # auto | int4 | int8 | fp16 | fp32
    validation: Path | None = None  # held-out text: .txt (one text per paragraph) or .jsonl ({"text": ...})
    context_length: int = 2048
    gate: Gate = Gate()
    sign_key: Path | None = None
    overwrite: bool = False
    speed_rounds: int = 3
    new_tokens: int = 64
    lora_slots: SlotSpec | None = None  # every candidate carries these LoRA slots (zero: the base's outputs)
    chat_template: Path | None = None  # a Jinja file the bundle carries in place of the source's template
    cache: bool = True  # the build cache (packager/llm/cache.py), where cache_dir or $EDGEPACK_CACHE_DIR names one
    cache_dir: Path | None = None


@dataclass(frozen=True)
class Candidate:
    recipe: Recipe
    bytes: int = 0
    quality: Quality | None = None
    speed: Speed | None = None
    verdict: Verdict = Verdict.NOT_TRIED  # CHOSEN, PASSED, ACCURACY (the generation gate) or ERROR
    why: str = ""

    def to_dict(self) -> dict:
        return {"candidate": self.recipe.label, "precision": self.recipe.precision, "bytes": self.bytes,
                "quality": self.quality.to_dict() if self.quality else None,
                "speed": self.speed.to_dict() if self.speed else None, "verdict": self.verdict.value, "why": self.why}


@dataclass(frozen=True)
class LlmTarget:
    target: str
    ok: bool
    bundle: Path | None = None
    candidates: tuple[Candidate, ...] = ()
    chosen: str | None = None
    why: str = ""
    bundle_bytes: int | None = None
    error: str | None = None
    exc: EdgepackError | None = None

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "format": "genai", "bundle": str(self.bundle) if self.bundle else None,
                "bundle_bytes": self.bundle_bytes, "chosen": self.chosen, "why": self.why, "error": self.error,
                "error_kind": type(self.exc).__name__ if self.exc else None,
                "candidates": [c.to_dict() for c in self.candidates]}


@dataclass(frozen=True)
class LlmBuild:
    model: str
    name: str
    version: str
    results: tuple[LlmTarget, ...]
    seconds: float
    shared: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        return {"schema": "edgepack.build-report/1", "model": self.model, "source_format": "causal-lm",
                "ok": self.ok, "seconds": round(self.seconds, 2), "shared": self.shared,
                "targets": [r.to_dict() for r in self.results]}


def refusal(profile: TargetProfile) -> str | None:
    """Why `profile` cannot run a generative decoder, or None."""
    if profile.on_edgetpu:
        return (f"{profile.name}: the Edge TPU runs fixed-shape int8 graphs only; a decoder's growing KV cache and "
                "int4/float weights do not compile for it (build for arm-cpu or rpi5 instead)")
    return None


def recipes(profile: TargetProfile, precision: str) -> list[Recipe]:
    """The candidates a target tries: block-wise int4 and int8, each at two block sizes, and the float model.
    The block size is a speed choice as much as an accuracy one: decoding reads every weight once per token,
    and int8 block 128 reads 3 % fewer bytes (fp32 scales) in a faster kernel than block 32 (Gemma 3 270M on 2
    x86 threads: 37.9 vs 30.4 tok/s, agreement 94.0 vs 96.4 %): which passes and wins is measured. fp16 on a
    CPU is left out: ONNX Runtime's CPU kernels compute it in fp32 after a cast (a size choice, not speed)."""
    if CUDA in profile.providers:
        ladder = [Recipe("int4", 32, ep="cuda"), Recipe("fp16", ep="cuda")]
    else:
        ladder = [Recipe("int4", 32, 4), Recipe("int4", 128, 4), Recipe("int8", 32, 4), Recipe("int8", 128, 4),
                  Recipe("fp32")]
    if precision != "auto":
        ladder = [r for r in ladder if r.precision == precision] or [Recipe(precision, ep=ladder[0].ep)]
    return ladder


def build(opts: LlmOptions, *, progress: Progress = lambda _m: None) -> LlmBuild:
    from packager.profiles import load_profile

    t0 = time.perf_counter()
    profiles = [load_profile(t) for t in opts.targets]
    name = opts.name or common.default_name(opts.model)
    _refuse_overwrite(opts, name, profiles)
    texts, text_source = validation_texts(opts.validation)
    template = chat_template(opts.chat_template) if opts.chat_template else None
    signer = common.signer(opts.sign_key)
    refused = {p.name: refusal(p) for p in profiles}
    todo = [p for p in profiles if not refused[p.name]]
    results: dict[str, LlmTarget] = {n: _failed(n, ConversionError(why)) for n, why in refused.items() if why}
    shared = {"validation": {"source": text_source, "texts": len(texts)}, "gate": opts.gate.to_dict()}
    with tempfile.TemporaryDirectory(prefix="edgepack-llm-") as tmp:
        work = Path(tmp)
        if todo:
            st = cache.store(opts.cache_dir, opts.cache)
            folder, src = _source_folder(Path(opts.model), work, st, progress)
            progress(f"float reference (transformers, fp32) on {len(texts)} held-out texts")
            ref = reference(folder, texts, work / "reference", cache=src)
            shared.update(reference={"parameters": ref.params, "positions": ref.positions,
                                     "perplexity": round(ref.perplexity, 3), "seconds": round(ref.seconds, 1),
                                     "from_cache": ref.cached})
            made: dict = {}  # recipe label -> (Candidate, Exported | None); timing key -> speeds
            for p in todo:
                try:
                    results[p.name] = _target(p, opts, name, folder, ref, made, work, signer, progress, src, template)
                except EdgepackError as e:
                    results[p.name] = _failed(p.name, e)
    return LlmBuild(str(opts.model), name, opts.version, tuple(results[p.name] for p in profiles),
                    time.perf_counter() - t0, shared)


def _target(p: TargetProfile, opts: LlmOptions, name: str, folder: Path, ref: Reference, made: dict,
            work: Path, signer, progress: Progress, src: cache.Source | None, template: str | None) -> LlmTarget:
    cands: list[Candidate] = []
    exports: dict[str, Exported] = {}
    ladder = recipes(p, opts.precision)
    todo = [r for r in ladder if r.label not in made]  # each recipe is exported and scored once for all targets
    if todo:
        slots = f" with LoRA slots (rank {opts.lora_slots.rank})" if opts.lora_slots else ""
        progress(f"[{p.name}] exporting {', '.join(r.label for r in todo)}{slots}")
        built = export_all(folder, {r: work / "candidates" / r.label for r in todo}, context_length=opts.context_length,
                           lora=opts.lora_slots, cache=src)
        for r in todo:
            progress(f"[{p.name}] {r.label}: scoring on {ref.positions} tokens")
            made[r.label] = _scored(r, built[r], ref, opts.gate)
    for r in ladder:
        c, ex = made[r.label]
        if ex is not None:
            exports[r.label] = ex
        cands.append(c)
    passing = [c for c in cands if c.verdict is Verdict.PASSED]
    if not passing:
        raise _gate_error(p.name, cands, opts.gate)
    threads = common.threads(p)
    untimed = CUDA in p.providers and not common.cuda_here()
    if untimed:  # CUDA graphs timed on this CPU would rank them by CPU kernels: say so and keep the smallest
        best = min(passing, key=lambda c: c.bytes)
        why = ("not timed: this build host has no CUDA; the smallest passing (decode on a Jetson is bound by "
               "weight bytes read per token)")
    elif len(passing) > 1:
        key = ("timed", threads, tuple(c.recipe.label for c in passing))
        if key not in made:  # targets timed alike on this host (same threads, same candidates) share it
            progress(f"[{p.name}] timing {len(passing)} candidates, {threads} threads, interleaved")
            made[key] = measure({c.recipe.label: exports[c.recipe.label].folder for c in passing}, threads=threads,
                                rounds=opts.speed_rounds, new_tokens=opts.new_tokens, cuda=CUDA in p.providers)
        speeds = made[key]
        passing = [Candidate(c.recipe, c.bytes, c.quality, speeds[c.recipe.label], Verdict.PASSED) for c in passing]
        cands = [next((t for t in passing if t.recipe == c.recipe), c) for c in cands]
    if not untimed:
        best, why = choose(passing)
    cands = [_verdict(c, best, why) for c in cands]
    ex = exports[best.recipe.label]
    if template is not None:  # the bundle carries the export folder's files: the template goes in there
        (ex.folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    golden = _golden(ex)
    report = {"candidates": [c.to_dict() for c in cands], "chosen": best.recipe.label, "why": why,
              "gate": opts.gate.to_dict(), "timed_on": None if untimed else f"this build host ({platform.machine()}, {threads} threads"
                                                     + (", CUDA" if CUDA in p.providers else "") + ")",
              "kv_bytes_per_token": ex.kv_bytes_per_token, "context_length": ex.context_length}
    measured = load_bytes(ex.folder, threads=threads)
    report["memory"] = {"load_bytes": measured, "kv_bytes_at_context": ex.kv_bytes_per_token * ex.context_length,
                        "weights_bytes": ex.weight_bytes}
    contents = bundle.Contents(
        name=name, version=opts.version, profile=p, exported=ex, defaults=bundle.defaults_of(folder),
        golden=golden, report=report, provenance=common.provenance(opts), threads=p.threads,
        load_bytes=measured,
        providers=tuple(x for x in p.providers if x == CUDA))
    progress(f"[{p.name}] {best.recipe.label}: writing the bundle")
    dest = bundle.write(contents, opts.out_dir, signer=signer)
    return LlmTarget(p.name, True, dest, tuple(cands), best.recipe.label, why, dest.stat().st_size)


def _scored(r: Recipe, ex: Exported | ConversionError, ref: Reference,
            gate: Gate) -> tuple[Candidate, Exported | None]:
    from edgeruntime import LoadSpec, load_runtime

    if isinstance(ex, ConversionError):
        return Candidate(r, verdict=Verdict.ERROR, why=str(ex).splitlines()[0]), None
    try:
        rt = load_runtime(str(ex.folder / bundle.MODEL_FILE), LoadSpec(format="genai", threads=common.threads(None),
                                                                     allow_cpu_fallback=True))
    except EdgepackError as e:
        return Candidate(r, ex.weight_bytes, verdict=Verdict.ERROR, why=f"does not load here: {e}"), None
    try:
        q = score(rt, ref)
    except (EdgepackError, RuntimeError) as e:  # onnxruntime-genai raises RuntimeError for a kernel it lacks
        return Candidate(r, ex.weight_bytes, verdict=Verdict.ERROR,
                         why=f"does not run here: {str(e).splitlines()[0][:200]}"), None
    finally:
        rt.close()
    if q.passes(gate):
        return Candidate(r, ex.weight_bytes, q, verdict=Verdict.PASSED), ex
    return Candidate(r, ex.weight_bytes, q, verdict=Verdict.ACCURACY,
                     why=f"agreement {q.agreement:.1%}, perplexity x{q.ppl_ratio:.3f}"), ex


def choose(passing: list[Candidate]) -> tuple[Candidate, str]:
    """The fastest decoder that passed; a candidate within TIE of it (or whose rounds overlap its rounds)
    is a tie, and the smallest of the tied wins. Untimed (one candidate): it is the choice."""
    if len(passing) == 1 or any(c.speed is None for c in passing):
        c = min(passing, key=lambda c: c.bytes)
        return c, "the only candidate that passed the gate" if len(passing) == 1 else "smallest passing"
    fastest = max(passing, key=lambda c: c.speed.decode_tok_s)
    tied = [c for c in passing if c.speed.decode_tok_s >= fastest.speed.decode_tok_s * (1 - TIE)
            or c.speed.decode_high >= fastest.speed.decode_low]
    best = min(tied, key=lambda c: c.bytes)
    if len(tied) == 1:
        return best, f"fastest passing: {best.speed.decode_tok_s:.1f} tok/s"
    others = ", ".join(c.recipe.label for c in tied if c is not best)
    if best is fastest:
        return best, (f"fastest passing ({best.speed.decode_tok_s:.1f} tok/s) and smaller than those within noise "
                      f"of it ({others})")
    return best, (f"tied on speed with {others} ({best.speed.decode_tok_s:.1f} vs {fastest.speed.decode_tok_s:.1f} "
                  f"tok/s: rounds overlap or within {TIE:.0%}): the smallest")


def _verdict(c: Candidate, best: Candidate, why: str) -> Candidate:
    if c.recipe == best.recipe:
        return Candidate(c.recipe, c.bytes, c.quality, best.speed, Verdict.CHOSEN, why)
    if c.verdict is Verdict.PASSED:
        return Candidate(c.recipe, c.bytes, c.quality, c.speed, Verdict.PASSED, "not chosen")
    return c


def _gate_error(target: str, cands: list[Candidate], gate: Gate) -> EdgepackError:
    from edgebundle.errors import AccuracyGateError

    tried = "; ".join(f"{c.recipe.label}: " + (f"agreement {c.quality.agreement:.1%}, perplexity x{c.quality.ppl_ratio:.3f}"
                                               if c.quality else c.why) for c in cands)
    return AccuracyGateError(f"{target}: no candidate passed the generation gate (top-1 agreement >= "
                             f"{gate.min_agreement:.0%}, perplexity ratio <= {gate.max_ppl_ratio}): {tried}",
                             hint="try --precision fp32, loosen --min-agreement/--max-ppl-ratio, or check the "
                                  "validation text is the kind of text the model was trained on")


def chat_template(path: Path) -> str:
    """A --chat-template file's text, refused before any work when it is not a Jinja template."""
    import jinja2

    try:
        text = Path(path).read_text(encoding="utf-8")
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the chat template {path}: {e}", hint="a UTF-8 Jinja file") from None
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{path}:{e.lineno}: not a Jinja template: {e.message}",
                         hint="the template a Hugging Face tokenizer_config.json holds as chat_template, in a file")
    if "messages" not in text:
        raise InputError(f"{path} does not read `messages`: a chat template turns them into the prompt",
                         hint="e.g. {% for m in messages %}...{{ m['content'] }}...{% endfor %}")
    return text


def _golden(ex: Exported) -> tuple[bundle.Golden, ...]:
    """The chosen candidate's own greedy tokens on fixed prompts: the device re-checks them at load. Its chat
    template, if any, must render a conversation in the device's tokenizer (onnxruntime-genai's engine)."""
    from edgeruntime import LoadSpec, load_runtime

    rt = load_runtime(str(ex.folder / bundle.MODEL_FILE), LoadSpec(format="genai", threads=common.threads(None),
                                                                 allow_cpu_fallback=True))
    try:
        if (ex.folder / TEMPLATE_FILE).is_file():
            try:
                rt.chat_prompt([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                {"role": "user", "content": "Name a river."}],
                               (ex.folder / TEMPLATE_FILE).read_text(encoding="utf-8"))
            except InputError as e:
                raise InputError(f"the chat template does not render a conversation on the device's tokenizer: {e}",
                                 hint="a template for this model's roles (system, user, assistant), as "
                                      "transformers renders it") from None
        out = []
        for p in GOLDEN_PROMPTS:
            ids = rt.encode(p)
            out.append(bundle.Golden(p, tuple(ids), tuple(rt.greedy(ids, GOLDEN_TOKENS))))
        return tuple(out)
    finally:
        rt.close()


def validation_texts(path: Path | None) -> tuple[list[str], str]:
    """Held-out texts: a .txt file's paragraphs (blank-line separated; lines when it has none), a .jsonl
    file's "text" fields. Without a file: the standard library's docstrings (English prose that needs
    no download; pass text of your own domain for a gate that means something there)."""
    if path is None:
        return _docstrings(), "Python standard-library docstrings (no --validation given)"
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read validation texts {path}: {e}",
                         hint="pass a UTF-8 .txt file (one text per paragraph) or .jsonl with a \"text\" field") from None
    if path.suffix.lower() == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(str(json.loads(line)["text"]))
                except (ValueError, KeyError, TypeError):
                    raise InputError(f"{path}:{n}: not a JSON object with a \"text\" field") from None
    else:
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
        if len(texts) < 4:
            texts = [t.strip() for t in raw.splitlines() if t.strip()]
    texts = [t for t in texts if len(t) >= 20]
    if len(texts) < 4:
        raise InputError(f"{path} holds {len(texts)} usable text(s) (20 characters or more); the gate needs at least 4",
                         hint="held-out text the model did not see in training, a few thousand tokens in all")
    return texts, str(path)


def _docstrings() -> list[str]:
    import collections, email, json as js, logging, pathlib, textwrap, unittest, urllib.request, zipfile  # noqa: E401
    import re

    out, seen = [], set()
    for mod in (collections, email, js, logging, pathlib, textwrap, unittest, urllib.request, zipfile):
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 80 and ">>>" not in doc:
                text = re.sub(r"\s+", " ", doc).strip()
                if text not in seen:
                    seen.add(text)
                    out.append(text)
    return out


def _source_folder(model: Path, work: Path, st: Store | None,
                   progress: Progress) -> tuple[Path, cache.Source | None]:
    """The causal-LM folder to build from, and what the build cache knows it by: a folder by its bytes, a
    GGUF file's float folder by the GGUF's bytes (the folder is made from them alone: no second hash)."""
    if not model.is_file():
        return model, cache.Source.of(st, model)
    try:  # a GGUF file: dequantized to a Hugging Face folder (packager/llm/gguf.py)
        from packager.llm.gguf import read_header, to_folder
    except ImportError:
        raise InputError("GGUF sources are not supported by this edgepack") from None
    read_header(model)  # a file that is no GGUF is refused before it is hashed or looked up
    src = cache.Source(st, "gguf:" + cache.digest_path(model)) if st else None
    key = src.key("gguf-folder") if src else None
    if src and cache.fetch(st, key, work / "gguf"):
        progress(f"{model.name} (GGUF): its float folder from the build cache")
        return work / "gguf", src
    progress(f"reading {model.name} (GGUF) into a float folder")
    folder = to_folder(model, work / "gguf").folder
    cache.keep(st, key, folder)
    return folder, src


def _failed(target: str, e: EdgepackError) -> LlmTarget:
    return LlmTarget(target, False, error=str(e).splitlines()[0], exc=e)


def _refuse_overwrite(opts: LlmOptions, name: str, profiles: list[TargetProfile]) -> None:
    if opts.overwrite:
        return
    there = [f"{name}-{opts.version}-{p.name}.edgepack" for p in profiles
             if (Path(opts.out_dir) / f"{name}-{opts.version}-{p.name}.edgepack").exists()]
    if there:
        raise InputError(f"{opts.out_dir} already holds {', '.join(there)}",
                         hint="build a new --version, into another --out-dir, or pass --overwrite to replace it")



