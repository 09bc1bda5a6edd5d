"""LoRA for generative bundles: slots in a base decoder, and adapter files that fill them.

A base built with slots (`edgepack build --lora-slots`) carries, beside every targeted projection, the
LoRA branch ONNX Runtime GenAI's model builder makes from a PEFT adapter: `x @ A` then `@ B`, added to
the projection's output (B already times the PEFT scaling). Its A and B weights are zeros, so the base
computes exactly the base, and each is also a graph input (an overridable initializer): an adapter
file in onnxruntime's adapter format, loaded with og.Adapters and activated per generator, replaces
them without reloading the base. The branches stay float in an int4/int8 base (the adapter's float
values must be able to replace them).

Slots have a fixed rank: an adapter of a lower rank is zero-padded to it (the same product); a higher
rank does not fit. Nothing here imports torch: the builder (packager.llm.ogbuild) and the PEFT model
(packager.llm.reference) run in child processes."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgebundle.errors import InputError

# The projections a slot can sit on: the names Llama, Qwen2/3, Gemma 1-3, Mistral and SmolLM share,
# which the builder makes one MatMul each (fused qkv_proj / gate_up_proj of Phi are split by the
# builder into branches that share A, which an adapter file could not address one by one).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter.onnx_adapter"
MODEL_FILE = "model.onnx"
DTYPES = {1: "float32", 10: "float16"}  # ONNX TensorProto data types a slot can have
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)\.lora_([AB])\.")


def key_of(name: str) -> tuple[int, str, str] | None:
    """(layer, module, "A" | "B") of a LoRA weight, named the builder's way
    (model.layers.0.attn.q_proj.lora_A.MatMul.weight) or PEFT's (base_model.model.model.layers.0.
    self_attn.q_proj.lora_A.weight); None for any other name."""
    m = _KEY.search(name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


@dataclass(frozen=True)
class SlotSpec:
    """What `--lora-slots` asks for: the rank and projections of the slots, from `r=8,targets=q_proj,v_proj`
    or from a PEFT adapter folder (`template`) whose configuration they take."""

    rank: int
    targets: tuple[str, ...]
    template: Path | None = None

    def to_job(self) -> dict:
        return {"rank": self.rank, "targets": list(self.targets),
                "template": str(self.template) if self.template else None}


def parse_slots(text: str) -> SlotSpec:
    """`--lora-slots`: a PEFT adapter folder, or `r=RANK,targets=NAME,NAME,...` (targets: projection names
    or all-linear, which is every one of TARGETS)."""
    path = Path(text)
    if path.is_dir():
        cfg = peft_config(path)
        return SlotSpec(adapter_rank(cfg), adapter_targets(cfg), path)
    fields: dict[str, list[str]] = {}
    key = None
    for part in (p.strip() for p in str(text).split(",")):
        if "=" in part:
            key, _, part = part.partition("=")
            key = key.strip()
            fields.setdefault(key, [])
        if key is None or not part:
            raise InputError(f"--lora-slots {text!r} is neither an adapter folder nor r=RANK,targets=NAME,...",
                             hint="e.g. --lora-slots r=8,targets=q_proj,v_proj, or the folder of a PEFT adapter")
        fields[key].append(part.strip())
    unknown = sorted(set(fields) - {"r", "targets"})
    if unknown or "r" not in fields or len(fields["r"]) != 1 or not fields["r"][0].isdigit() or int(fields["r"][0]) < 1:
        raise InputError(f"--lora-slots {text!r}: give r=RANK (a positive integer) and targets=NAME,...",
                         hint=f"e.g. r=8,targets=q_proj,v_proj; targets from {', '.join(TARGETS)} or all-linear")
    return SlotSpec(int(fields["r"][0]), _targets(fields.get("targets") or ["all-linear"]))


def _targets(names) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if names == ["all-linear"]:
        return TARGETS
    bad = sorted(set(names) - set(TARGETS))
    if bad or not names:
        raise InputError(f"LoRA targets {', '.join(bad) or '(none)'} are not projections a slot can sit on",
                         hint=f"use {', '.join(TARGETS)} or all-linear")
    return tuple(t for t in TARGETS if t in names)


def peft_config(folder: Path) -> dict:
    """A PEFT adapter folder's adapter_config.json, refused (InputError) where slots cannot carry it."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder} is not a PEFT adapter folder (adapter_config.json: {e})",
                         hint="pass the folder PeftModel.save_pretrained wrote") from None
    why = []
    if cfg.get("peft_type") != "LORA":
        why.append(f"peft_type {cfg.get('peft_type')!r} (only LORA)")
    if cfg.get("use_dora"):
        why.append("DoRA (use_dora)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        why.append("trained biases")
    if cfg.get("modules_to_save"):
        why.append(f"modules_to_save {cfg['modules_to_save']}")
    if cfg.get("fan_in_fan_out"):
        why.append("fan_in_fan_out")
    if why:
        raise InputError(f"{folder}: this adapter cannot be carried by LoRA slots: {'; '.join(why)}",
                         hint="plain LoRA on the attention and MLP projections (q/k/v/o, gate/up/down_proj)")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise InputError(f"{folder}: adapter_config.json has no rank r")
    adapter_targets(cfg)
    return cfg


def adapter_rank(cfg: dict) -> int:
    """The largest rank of an adapter (rank_pattern may raise some modules above r)."""
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def adapter_targets(cfg: dict) -> tuple[str, ...]:
    t = cfg.get("target_modules")
    if isinstance(t, str) and t != "all-linear" and t not in TARGETS:  # a regular expression: PEFT matches names
        raise InputError(f"target_modules {t!r} is a pattern; list the projections instead",
                         hint=f"target_modules=[...] from {', '.join(TARGETS)}")
    return _targets(t or [])


@dataclass(frozen=True)
class Slots:
    """A base's LoRA slots: rank, dtype and every slot weight's name and shape ([in, rank] for A,
    [rank, out] for B), as `manifest.generation.lora` records them."""

    rank: int
    dtype: str
    parameters: dict  # name -> shape tuple

    @property
    def targets(self) -> tuple[str, ...]:
        found = {key_of(n)[1] for n in self.parameters}
        return tuple(t for t in TARGETS if t in found) + tuple(sorted(found - set(TARGETS)))

    def to_dict(self) -> dict:
        return {"rank": self.rank, "dtype": self.dtype, "targets": list(self.targets),
                "parameters": {n: list(s) for n, s in sorted(self.parameters.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> "Slots":
        return cls(int(d["rank"]), str(d["dtype"]), {n: tuple(int(x) for x in s) for n, s in d["parameters"].items()})


def add_slots(folder: Path) -> Slots:
    """Turn the LoRA branches a builder baked into `folder`'s model into slots: each lora_A/lora_B
    initializer zeroed in place (the external data file keeps its layout byte for byte, so a delta
    update finds the rest) and declared a graph input of its shape."""
    import onnx
    from onnx import helper

    path = Path(folder) / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    params = {}
    for init in model.graph.initializer:
        if key_of(init.name) is None:
            continue
        if init.data_type not in DTYPES:
            raise ValueError(f"LoRA weight {init.name} is {onnx.TensorProto.DataType.Name(init.data_type)}, "
                             "not float: the builder quantized it")
        _zero(init, Path(folder))
        if init.name not in inputs:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        params[init.name] = tuple(int(d) for d in init.dims)
    if not params:
        raise ValueError("the builder made no LoRA branches")
    onnx.save(model, str(path))
    return _slots(model, params)


def _zero(init, folder: Path) -> None:
    ext = {e.key: e.value for e in init.external_data}
    if init.data_location == 1 and "location" in ext:  # EXTERNAL
        offset, length = int(ext.get("offset", 0)), int(ext["length"])
        with open(folder / ext["location"], "r+b") as f:
            f.seek(offset)
            f.write(bytes(length))
    else:
        n = int(np.prod(init.dims)) * (4 if init.data_type == 1 else 2)
        init.ClearField("float_data")
        init.ClearField("int32_data")
        init.raw_data = bytes(n)


def _slots(model, params: dict) -> Slots:
    dtype = {DTYPES[i.data_type] for i in model.graph.initializer if i.name in params}
    ranks = {s[1] if key_of(n)[2] == "A" else s[0] for n, s in params.items()}
    if len(dtype) != 1 or len(ranks) != 1:
        raise ValueError(f"LoRA slots of mixed dtypes {sorted(dtype)} or ranks {sorted(ranks)}")
    return Slots(ranks.pop(), dtype.pop(), params)


def slots_of(folder: Path) -> Slots | None:
    """The slots of an exported decoder folder (read from its graph), or None."""
    import onnx

    model = onnx.load(str(Path(folder) / MODEL_FILE), load_external_data=False)
    inputs = {i.name for i in model.graph.input}
    params = {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer
              if i.name in inputs and key_of(i.name) is not None}
    return _slots(model, params) if params else None


def fit(tensors: dict[tuple[int, str, str], np.ndarray], slots: Slots) -> dict[str, np.ndarray]:
    """An adapter's weights as the graph computes them (A: [in, r], B: [r, out], B times the scaling),
    keyed (layer, module, "A" | "B"), mapped onto the slots' names, zero-padded to the slots' rank and
    cast to their dtype; InputError naming every weight that has no slot or does not fit it."""
    by_key = {key_of(n): n for n in slots.parameters}
    out, problems = {}, []
    for key, w in sorted(tensors.items()):
        layer, module, ab = key
        name = by_key.get(key)
        if name is None:
            problems.append(f"layers.{layer}.{module}.lora_{ab}: the base has no slot there")
            continue
        shape = slots.parameters[name]
        w = np.asarray(w)
        own, r = (w.shape[0], w.shape[-1]) if ab == "A" else (w.shape[-1], w.shape[0])  # in or out; rank
        if w.ndim != 2 or own != (shape[0] if ab == "A" else shape[1]) or r > slots.rank:
            problems.append(f"layers.{layer}.{module}.lora_{ab}: shape {list(w.shape)} does not fit the slot "
                            f"{list(shape)} (rank at most {slots.rank})")
            continue
        pad = ((0, 0), (0, slots.rank - r)) if ab == "A" else ((0, slots.rank - r), (0, 0))
        out[name] = np.ascontiguousarray(np.pad(w, pad).astype(slots.dtype))
    if problems:
        raise InputError(f"the adapter does not fit the base's LoRA slots: {'; '.join(problems[:6])}"
                         + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""),
                         hint=f"the base has slots of rank {slots.rank} on {', '.join(slots.targets)}; train the "
                              "adapter on those projections at that rank or lower, or rebuild the base with "
                              "--lora-slots ADAPTER_DIR")
    return out  # a slot the adapter leaves out keeps its zeros


def write_adapter(params: dict[str, np.ndarray], dest: Path) -> Path:
    """`params` in onnxruntime's adapter format (what og.Adapters loads)."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in sorted(params.items())})
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(dest))
    return dest
