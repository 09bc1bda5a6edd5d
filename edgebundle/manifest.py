"""Bundle manifest: a versioned JSON document, see docs/bundle-format.md."""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgebundle.errors import BundleError

SCHEMA = "edgepack.bundle/1"
# genai: an ONNX Runtime GenAI decoder folder; genai-adapter: a LoRA adapter for a genai bundle's slots
MODEL_FORMATS = ("tflite", "onnx", "genai", "genai-adapter")
GENAI_WEIGHTS = "model.onnx.data"  # a genai bundle's external weights: what an adapter is pinned to
RUNTIME_KEYS = ("name", "min_version", "threads", "delegates", "providers", "tensorrt_fp16",
                "tensorrt_engine_cache", "cpu_fallback", "flex", "edgetpu_compiled")
OPTIONAL_RUNTIME_KEYS = ("tensorrt_profile",)  # written only where set: older manifests lack them
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)


def parse_version(text: str) -> tuple:
    """Semantic version -> sortable key (prereleases sort before the release)."""
    m = _SEMVER.match(text or "")
    if not m:
        raise BundleError(
            f"version {text!r} is not a semantic version",
            hint="use MAJOR.MINOR.PATCH, e.g. 1.2.0 or 2.0.0-rc.1",
        )
    major, minor, patch, pre = m.groups()
    pre_key: tuple = (1,) if pre is None else (0,) + tuple(
        (0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split(".")
    )
    return (int(major), int(minor), int(patch), pre_key)


@dataclass(frozen=True)
class Quantization:
    """Affine quantization of an integer tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as the device runtime sees it."""

    name: str
    shape: tuple[int, ...]  # concrete shape used for checks and benchmarks
    dtype: str
    shape_signature: tuple[int, ...] | None = None  # -1 marks a dynamic dimension
    quantization: Quantization | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["shape_signature"] = list(self.shape_signature or self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        _require(d, ("name", "shape", "dtype"), "tensor")
        if d["dtype"] not in DTYPES:
            raise BundleError(f"tensor {d['name']!r} has unknown dtype {d['dtype']!r}")
        q = d.get("quantization")
        return cls(
            name=str(d["name"]),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=d["dtype"],
            shape_signature=tuple(int(x) for x in d.get("shape_signature") or d["shape"]),
            quantization=Quantization(float(q["scale"]), int(q["zero_point"])) if q else None,
        )


@dataclass(frozen=True)
class RuntimeSpec:
    """How the device runs the model: the manifest's `runtime` section, as the packager writes it.

    `keys` are the keys the section was written with, in order, and `extra` keeps the ones this
    edgepack does not know verbatim: a manifest read and written again keeps its bytes (older
    bundles, hand-made manifests and newer fields alike). A null reads as the field's default."""

    name: str | None = None
    min_version: str | None = None
    threads: int = 0  # 0: the runtime's default
    delegates: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    tensorrt_fp16: bool = False
    tensorrt_engine_cache: bool = False
    cpu_fallback: bool = False
    flex: bool = False  # the model needs the Flex delegate
    edgetpu_compiled: bool | None = None  # None: not an Edge TPU target
    # TensorRT optimisation profile of a dynamic-shape model: {input: {"min": [...], "opt": [...], "max": [...]}}
    tensorrt_profile: dict | None = None
    extra: dict = field(default_factory=dict)
    keys: tuple[str, ...] = RUNTIME_KEYS

    def to_dict(self) -> dict:
        return {k: self._json(k) for k in self.keys}

    def _json(self, key: str):
        if key in self.extra:
            return self.extra[key]
        v = getattr(self, key)
        return list(v) if isinstance(v, tuple) else v

    @classmethod
    def from_dict(cls, d: dict) -> "RuntimeSpec":
        if not isinstance(d, dict):
            raise BundleError("manifest runtime must be a JSON object")
        names = RUNTIME_KEYS + OPTIONAL_RUNTIME_KEYS
        known = {k: _runtime_value(k, v) for k, v in d.items() if k in names and v is not None}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names}, keys=tuple(d))


def _runtime_value(key: str, v):
    """A known runtime field's value, type-checked (BundleError names the field)."""
    if key in ("name", "min_version"):
        ok = isinstance(v, str)
    elif key == "threads":
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    elif key in ("delegates", "providers"):
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        v = tuple(v) if ok else v
    elif key == "tensorrt_profile":
        ok = isinstance(v, dict) and all(isinstance(k, str) and _shape_range(r) for k, r in v.items())
    else:
        ok = isinstance(v, bool)
    if not ok:
        raise BundleError(f"manifest runtime.{key} has the wrong type: {v!r:.80}")
    return v


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a bundle holds and how to run it. Code reads `runtime` typed (RuntimeSpec); nested
    free-form sections stay dicts (report, provenance): they are for people and dashboards."""

    name: str
    version: str
    target: dict  # {"name", "sha256", "profile": {...}}
    format: str
    precision: str
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    runtime: RuntimeSpec  # a dict is taken too (and read as one)
    files: dict[str, FileEntry] = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    golden: dict | None = None  # {"file", "count", "atol", "rtol"}
    labels_file: str | None = None
    production_ready: bool = True
    warnings: tuple[str, ...] = ()
    schema: str = SCHEMA
    # Text models: {"tokenizer": file, "settings": {...}, "golden_texts": [...], "golden_ids": [[...]]};
    # absent (not null) in the JSON of other bundles, so their manifests read as before.
    text: dict | None = None
    # Drift references: {"inputs": [TensorRef dict], "outputs": [...]} (edgeruntime.drift); absent in
    # older manifests and for bundles built without data.
    drift: dict | None = None
    # Generative models (format "genai"): what the device needs to generate (edgeruntime.genai.Generation
    # reads it); absent (not null) in every other manifest.
    generation: dict | None = None
    # LoRA adapters (format "genai-adapter"): the base it is pinned to, its golden prompts; absent elsewhere.
    adapter: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.runtime, dict):
            object.__setattr__(self, "runtime", RuntimeSpec.from_dict(self.runtime))

    @property
    def weights_sha256(self) -> str:
        """What pins an adapter to this (genai) bundle: its weights file's sha256 (the model file's where the
        weights are inline), so a rebuild of the same weights still matches while any other base does not."""
        entry = self.files.get(GENAI_WEIGHTS) or self.files.get(self.model_file)
        return entry.sha256 if entry else ""

    def with_files(self, files: dict[str, FileEntry]) -> "Manifest":
        return replace(self, files=dict(files))

    def to_dict(self) -> dict:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "format": self.format,
            "precision": self.precision,
            "model_file": self.model_file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "runtime": self.runtime.to_dict(),
            "quantization": self.quantization,
            "preprocessing": self.preprocessing,
            "files": {k: asdict(v) for k, v in sorted(self.files.items())},
            "provenance": self.provenance,
            "report": self.report,
            "golden": self.golden,
            "labels_file": self.labels_file,
            "production_ready": self.production_ready,
            "warnings": list(self.warnings),
            **({"text": self.text} if self.text is not None else {}),
            **({"drift": self.drift} if self.drift is not None else {}),
            **({"generation": self.generation} if self.generation is not None else {}),
            **({"adapter": self.adapter} if self.adapter is not None else {}),
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        from edgebundle.jsonsafe import JsonError, loads

        try:
            d = loads(data, max_depth=64)
        except JsonError as e:
            raise BundleError(f"manifest.json is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise BundleError("manifest.json must hold a JSON object")
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        schema = d.get("schema")
        if schema != SCHEMA:
            raise BundleError(
                f"unsupported manifest schema {schema!r} (this edgepack reads {SCHEMA!r})",
                hint="upgrade edgepack / edgepack-agent, or rebuild the bundle",
            )
        _require(d, ("name", "version", "target", "format", "precision", "model_file",
                     "inputs", "outputs", "runtime", "files"), "manifest")
        try:
            return cls._from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise BundleError(f"manifest has a malformed entry: {e!r}") from None

    @classmethod
    def _from_dict(cls, d: dict) -> "Manifest":
        if d["format"] not in MODEL_FORMATS:
            raise BundleError(f"manifest format {d['format']!r} is not one of {MODEL_FORMATS}")
        if not isinstance(d["version"], str) or not isinstance(d["name"], str):
            raise BundleError("manifest name and version must be strings")
        parse_version(d["version"])
        files = {str(k): FileEntry(str(v["sha256"]), _count(v["size"])) for k, v in d["files"].items()}
        inputs = tuple(TensorSpec.from_dict(t) for t in d["inputs"])
        outputs = tuple(TensorSpec.from_dict(t) for t in d["outputs"])
        if not isinstance(d["model_file"], str) or d["model_file"] not in files:
            raise BundleError(f"manifest model_file {d['model_file']!r} is not listed in files")
        golden = d.get("golden")
        if golden is not None:
            if not (isinstance(golden, dict) and golden.get("file") in files and _count(golden["count"]) >= 0
                    and _number(golden["atol"]) >= 0 and _number(golden.get("rtol", 0)) >= 0):
                raise BundleError("manifest golden must be {file (listed in files), count, atol, rtol}")
        labels = d.get("labels_file")
        if labels is not None and labels not in files:
            raise BundleError(f"manifest labels_file {labels!r} is not listed in files")
        text = d.get("text")
        if text is not None:
            _check_text(text, files)
        drift = d.get("drift")
        if drift is not None and not (isinstance(drift, dict) and all(
                isinstance(drift.get(k, []), list) for k in ("inputs", "outputs"))):
            raise BundleError("manifest drift must be {inputs: [...], outputs: [...]}")
        generation = d.get("generation")
        if (generation is not None) != (d["format"] == "genai"):
            raise BundleError("manifest generation is required for format genai, and only there")
        if generation is not None:
            _check_generation(generation, files)
        adapter = d.get("adapter")
        if (adapter is not None) != (d["format"] == "genai-adapter"):
            raise BundleError("manifest adapter is required for format genai-adapter, and only there")
        if adapter is not None:
            _check_adapter(adapter)
        return cls(
            name=str(d["name"]),
            version=str(d["version"]),
            target=dict(d["target"]),
            format=d["format"],
            precision=str(d["precision"]),
            model_file=d["model_file"],
            inputs=inputs,
            outputs=outputs,
            runtime=RuntimeSpec.from_dict(d["runtime"]),
            files=files,
            quantization=dict(d.get("quantization") or {}),
            preprocessing=dict(d.get("preprocessing") or {}),
            provenance=dict(d.get("provenance") or {}),
            report=dict(d.get("report") or {}),
            golden=golden,
            labels_file=labels,
            production_ready=bool(d.get("production_ready", True)),
            text=text,
            drift=drift,
            generation=generation,
            adapter=adapter,
            warnings=tuple(str(w) for w in d.get("warnings") or ()),
        )

    @property
    def file_name(self) -> str:
        """Canonical bundle file name: NAME-VERSION-TARGET.edgepack."""
        return f"{self.name}-{self.version}-{self.target.get('name', 'custom')}.edgepack"


def adapter_refusal(base: Manifest, adapter: Manifest) -> str | None:
    """Why `adapter` (a genai-adapter bundle) cannot run on `base` (the genai bundle a device runs), or None:
    its pin (the base's weights sha256) and the slots it fills must both be the base's."""
    if adapter.adapter is None:
        return f"{adapter.name} {adapter.version} is a {adapter.format} bundle, not a LoRA adapter"
    a = adapter.adapter
    if base.format != "genai":
        return f"adapter {adapter.name} {adapter.version} needs a generative base; this slot runs a {base.format} model"
    if a["base_sha256"] != base.weights_sha256:
        return (f"adapter pinned to base {a['base_sha256'][:12]} ({a['base_name']} {a['base_version']}) but this "
                f"device runs {base.weights_sha256[:12]} ({base.name} {base.version})")
    if (base.generation or {}).get("lora") != a["slots"]:
        return (f"adapter {adapter.name} {adapter.version} fills LoRA slots that {base.name} {base.version} "
                "does not have")
    return None


def _count(v) -> int:
    """A non-negative JSON integer (not a bool, not a float)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return int(v)


def _number(v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v != v:
        raise ValueError(f"{v!r} is not a number")
    return float(v)


def _require(d: Any, keys: tuple[str, ...], what: str) -> None:
    if not isinstance(d, dict):
        raise BundleError(f"{what} entry must be a JSON object")
    missing = [k for k in keys if k not in d]
    if missing:
        raise BundleError(f"{what} is missing required field(s): {', '.join(missing)}")


def _shape_range(r) -> bool:
    """{"min", "opt", "max"}: shapes of one rank, positive, min <= opt <= max in every dimension."""
    if not isinstance(r, dict) or set(r) != {"min", "opt", "max"}:
        return False
    shapes = [r["min"], r["opt"], r["max"]]
    if not all(isinstance(x, list) and len(x) == len(shapes[0]) and all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in x) for x in shapes):
        return False
    return all(a <= b <= c for a, b, c in zip(*shapes))


def _check_text(text, files: dict) -> None:
    """The text section's shape (its settings are read by edgeruntime.text on the device)."""
    ok = (isinstance(text, dict) and text.get("tokenizer") in files and isinstance(text.get("settings"), dict)
          and isinstance(text.get("golden_texts"), list) and isinstance(text.get("golden_ids"), list)
          and len(text["golden_texts"]) == len(text["golden_ids"])
          and all(isinstance(t, str) for t in text["golden_texts"])
          and all(isinstance(ids, list) and all(isinstance(i, int) for i in ids) for ids in text["golden_ids"]))
    if not ok:
        raise BundleError("manifest text must be {tokenizer (listed in files), settings, golden_texts, golden_ids "
                          "(one list of token ids per golden text)}")
    buckets = text.get("buckets")
    if buckets is None:
        return
    ok = (isinstance(buckets, list) and all(
        isinstance(b, dict) and b.get("file") in files and _count(b.get("length", -1)) > 0
        and _count(b.get("golden", -1)) >= 0 and _number(b.get("atol")) >= 0
        and (b.get("signature") is None or (isinstance(b["signature"], str) and b["signature"] != "")) for b in buckets)
        and [b["length"] for b in buckets] == list(text["settings"].get("buckets") or [None])[:-1])
    if not ok:
        raise BundleError("manifest text.buckets must be [{length, file (listed in files), golden, atol, signature "
                          "(optional: the file's signature that runs it)}], one per "
                          "length of text.settings.buckets below max_length, shortest first")


def _check_generation(gen, files: dict) -> None:
    """The generation section's shape; its meaning is read by edgeruntime.genai on the device."""
    ok = (isinstance(gen, dict) and gen.get("config") in files and gen.get("tokenizer") in files
          and gen.get("chat_template") in (None, *files) and isinstance(gen.get("defaults"), dict)
          and _count(gen.get("context_length", -1)) > 0 and _count(gen.get("kv_bytes_per_token", -1)) >= 0
          and _ids(gen.get("eos_token_ids")) and isinstance(gen.get("golden"), list)
          and all(isinstance(g, dict) and _ids(g.get("prompt_ids")) and _ids(g.get("ids")) for g in gen["golden"])
          and 0 <= _number(gen.get("golden_agreement", -1)) <= 1)
    if not ok:
        raise BundleError("manifest generation must be {config, tokenizer (listed in files), chat_template (listed, "
                          "or null), defaults, context_length, kv_bytes_per_token, eos_token_ids, golden: "
                          "[{prompt_ids, ids}], golden_agreement (0..1)}")
    if gen.get("lora") is not None and not _lora_slots(gen["lora"]):
        raise BundleError("manifest generation.lora must be {rank, dtype (float32 or float16), targets: [names], "
                          "parameters: {name: [dims]}} (at least one parameter)")


def _ids(v) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def _lora_slots(lora) -> bool:
    """LoRA slots (packager.llm.lora.Slots): rank, dtype, targets, parameters {name: [dims]}."""
    return (isinstance(lora, dict) and _count(lora.get("rank", -1)) > 0 and lora.get("dtype") in ("float32", "float16")
            and isinstance(lora.get("targets"), list) and all(isinstance(t, str) for t in lora["targets"])
            and isinstance(lora.get("parameters"), dict) and len(lora["parameters"]) > 0
            and all(isinstance(n, str) and isinstance(s, list) and len(s) == 2 and all(_count(x) > 0 for x in s)
                    for n, s in lora["parameters"].items()))


def _check_adapter(a) -> None:
    """The adapter section's shape (read by the agent when it stages an adapter next to its base)."""
    ok = (isinstance(a, dict) and isinstance(a.get("base_sha256"), str)
          and re.fullmatch(r"[0-9a-f]{64}", a["base_sha256"])
          and isinstance(a.get("base_name"), str) and isinstance(a.get("base_version"), str)
          and _count(a.get("rank", -1)) > 0 and isinstance(a.get("targets"), list)
          and all(isinstance(t, str) for t in a["targets"]) and _lora_slots(a.get("slots"))
          and isinstance(a.get("golden"), list)
          and all(isinstance(g, dict) and _ids(g.get("prompt_ids")) and _ids(g.get("ids")) for g in a["golden"])
          and 0 <= _number(a.get("golden_agreement", -1)) <= 1)
    if not ok:
        raise BundleError("manifest adapter must be {base_sha256 (64 hex digits), base_name, base_version, rank, "
                          "targets: [names], slots: {rank, dtype, targets, parameters}, golden: [{prompt_ids, ids}], "
                          "golden_agreement (0..1)}")
