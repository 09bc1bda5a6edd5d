"""LoRA adapters for generative bundles (packager.llm.lora, packager.llm.adapter, edgeruntime.genai): a base
with zero slots computes the base; an adapter trained here with PEFT becomes a small signed bundle pinned to
that base, and switched in per generator it gives what the model builder's own baked export of the same
adapter gives; other bases and misfit adapters are refused with the reason."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgebundle.errors import BundleError, InputError
from packager.llm.lora import TARGETS, key_of, parse_slots, peft_config

SLOTS = "r=4,targets=q_proj,v_proj"
PROMPT = "Edge devices answer in"


def _cli(*args):
    from edgepack.cli import main

    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


# ---- fast: the spec, the configs, the manifest sections ----

def test_slot_specs_and_the_names_on_both_sides(tmp_path):
    assert parse_slots("r=8,targets=v_proj,q_proj") == parse_slots("r=8, targets=q_proj, v_proj")
    assert parse_slots("r=8,targets=v_proj,q_proj").targets == ("q_proj", "v_proj")  # in TARGETS' order
    assert parse_slots("r=2").targets == TARGETS and parse_slots("r=2,targets=all-linear").targets == TARGETS
    for bad, said in (("8", "neither an adapter folder"), ("r=0,targets=q_proj", "give r=RANK"),
                      ("r=4,alpha=8", "give r=RANK"), ("r=4,targets=lm_head", "lm_head are not projections")):
        with pytest.raises(InputError, match=said):
            parse_slots(bad)
    assert key_of("model.layers.11.attn.q_proj.lora_A.MatMul.weight") == (11, "q_proj", "A")
    assert key_of("base_model.model.model.layers.3.mlp.down_proj.lora_B.weight") == (3, "down_proj", "B")
    assert key_of("model.layers.0.attn.q_proj.MatMul.weight_Q4") is None
    folder = tmp_path / "a"
    folder.mkdir()
    good = {"peft_type": "LORA", "r": 4, "rank_pattern": {"v_proj": 8}, "target_modules": ["v_proj", "q_proj"],
            "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(good))
    spec = parse_slots(str(folder))
    assert (spec.rank, spec.targets, spec.template) == (8, ("q_proj", "v_proj"), folder)
    for change, said in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                         ({"target_modules": "q_proj|v_proj"}, "is a pattern"), ({"peft_type": "IA3"}, "only LORA")):
        (folder / "adapter_config.json").write_text(json.dumps(dict(good, **change)))
        with pytest.raises(InputError, match=said):
            peft_config(folder)


def _genai(extra: dict | None = None, **over) -> dict:
    files = {n: {"sha256": "0" * 64, "size": 1} for n in ("model.onnx", "model.onnx.data", "genai_config.json",
                                                           "tokenizer.json")}
    gen = {"config": "genai_config.json", "tokenizer": "tokenizer.json", "chat_template": None, "defaults": {},
           "context_length": 256, "kv_bytes_per_token": 512, "eos_token_ids": [1], "golden": [],
           "golden_agreement": 0.9, **(extra or {})}
    d = {"schema": "edgepack.bundle/1", "name": "lm", "version": "1.0.0", "target": {"name": "x86-cpu"},
         "format": "genai", "precision": "int4", "model_file": "model.onnx", "files": files,
         "inputs": [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}],
         "outputs": [{"name": "logits", "shape": [1, 16, 512], "dtype": "float32"}], "runtime": {}, "generation": gen}
    return {**d, **over}


def _adapter(slots: dict, pin: str) -> dict:
    d = _genai(format="genai-adapter", name="fr", model_file="adapter.onnx_adapter",
               files={"adapter.onnx_adapter": {"sha256": "1" * 64, "size": 2}})
    del d["generation"]
    d["adapter"] = {"base_sha256": pin, "base_name": "lm", "base_version": "1.0.0", "rank": 2, "targets": ["q_proj"],
                    "slots": slots, "golden": [{"prompt": "x", "prompt_ids": [3], "ids": [4, 5]}],
                    "golden_agreement": 0.9}
    return d


def test_manifests_carry_slots_and_adapters_and_old_readers_refuse_the_format_by_name(monkeypatch):
    from edgebundle import manifest as mf
    from edgebundle.manifest import Manifest, adapter_refusal

    slots = {"rank": 4, "dtype": "float32", "targets": ["q_proj"],
             "parameters": {"model.layers.0.attn.q_proj.lora_A.MatMul.weight": [64, 4],
                            "model.layers.0.attn.q_proj.lora_B.MatMul.weight": [4, 64]}}
    base = Manifest.from_dict(_genai({"lora": slots}))
    assert base.to_dict()["generation"]["lora"] == slots and "adapter" not in base.to_dict()
    assert "lora" not in Manifest.from_dict(_genai()).to_dict()["generation"]  # optional: older bundles read as before
    with pytest.raises(BundleError, match="generation.lora must be"):
        Manifest.from_dict(_genai({"lora": dict(slots, parameters={})}))
    a = Manifest.from_dict(_adapter(slots, base.weights_sha256))
    assert Manifest.from_json(a.to_json()) == a and adapter_refusal(base, a) is None
    other = Manifest.from_dict(_adapter(slots, "f" * 64))
    assert adapter_refusal(base, other).startswith(
        "adapter pinned to base ffffffffffff (lm 1.0.0) but this device runs")
    wider = Manifest.from_dict(_adapter(dict(slots, rank=8), base.weights_sha256))
    assert "does not have" in adapter_refusal(base, wider)
    with pytest.raises(BundleError, match="adapter is required for format genai-adapter"):
        Manifest.from_dict({k: v for k, v in _adapter(slots, "f" * 64).items() if k != "adapter"})
    with pytest.raises(BundleError, match="64 hex digits"):
        Manifest.from_dict(_adapter(slots, "not-a-sha"))
    monkeypatch.setattr(mf, "MODEL_FORMATS", ("tflite", "onnx", "genai"))  # an agent of before this change
    with pytest.raises(BundleError, match="manifest format 'genai-adapter' is not one of"):
        Manifest.from_dict(_adapter(slots, "f" * 64))


def test_cli_wiring_of_slots_and_adapters(tmp_path, monkeypatch):
    from packager.llm import build as llm_build

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    base = tmp_path / "b.edgepack"
    base.write_bytes(b"")
    r = _cli("build", tmp_path / "lm", "-t", "x86-cpu", "--adapter", tmp_path / "lm")
    assert r.exit_code == 2 and "--adapter and --base go together" in r.output
    r = _cli("build", tmp_path / "enc", "-t", "x86-cpu", "--lora-slots", SLOTS)
    assert r.exit_code == 2 and "--lora-slots is for causal LMs" in r.output
    r = _cli("build", tmp_path / "lm", "-t", "x86-cpu", "--lora-slots", "r=4,targets=embed_tokens")
    assert r.exit_code == 2 and "not projections a slot can sit on" in r.output
    seen = {}

    def fake_export_all(src, jobs, *, context_length=None, lora=None):
        seen["lora"] = lora
        raise InputError("stop here")

    monkeypatch.setattr(llm_build, "reference", lambda *a, **k: llm_build.Reference((), np.zeros(1), np.zeros(1), 1))
    monkeypatch.setattr(llm_build, "export_all", fake_export_all)
    r = _cli("build", tmp_path / "lm", "-t", "x86-cpu", "-o", tmp_path / "out", "--lora-slots", SLOTS)
    assert r.exit_code == 2 and seen["lora"] == parse_slots(SLOTS)


# ---- slow: real exports, a real adapter ----

@pytest.fixture(scope="module")
def kit(tiny_llm, keys, tmp_path_factory) -> dict:
    """A PEFT adapter of tiny_llm (rank 4 on q_proj and v_proj, trained here on French-ish text) and, from one
    builder child: int4 and fp32 bases with slots of that shape, the same two without slots, and the builder's
    own fp32 export with the adapter baked in (the oracle). Bundles: both slot bases and the plain fp32."""
    from functools import partial

    from edgebundle.signing import load_private_key, sign
    from llmkit import builder_jobs, train_adapter, write_genai
    from packager.llm.export import Recipe, describe

    out = tmp_path_factory.mktemp("lora")
    adapter = train_adapter(tiny_llm, out / "fr-adapter", rank=4, targets=("q_proj", "v_proj"))
    slots = parse_slots(SLOTS).to_job()
    int4, fp32 = Recipe("int4", 32, 4), Recipe("fp32")
    jobs = {"int4": (int4, slots, []), "fp32": (fp32, slots, []), "plain4": (int4, None, []),
            "plain": (fp32, None, []), "baked": (fp32, None, [f"adapter_path={adapter}"])}
    builder_jobs([{"src": str(tiny_llm), "out": str(out / k), "precision": r.precision, "options": r.options() + extra,
                   "lora": lora} for k, (r, lora, extra) in jobs.items()])
    ex = {k: describe(out / k, r, context_length=256) for k, (r, _l, _e) in jobs.items()}
    signer = partial(sign, private_key=load_private_key(keys / "a.key"))
    bundles = {k: write_genai(ex[k], out / "dist", name=f"tiny-{k}", signer=signer) for k in ("int4", "fp32", "plain")}
    return {"src": tiny_llm, "adapter": adapter, "ex": ex, "bundles": bundles, "out": out}


def _rt(folder: Path):
    from edgeruntime import LoadSpec, load_runtime

    return load_runtime(str(folder / "model.onnx"), LoadSpec(format="genai", threads=1))


@pytest.mark.slow
def test_zero_slots_leave_the_base_outputs_unchanged(kit):
    from edgebundle.archive import verify_bundle

    ex = kit["ex"]
    assert ex["plain"].lora is None and ex["baked"].lora is None  # a baked adapter is no slot
    s = ex["int4"].lora
    assert (s.rank, s.dtype, s.targets) == (4, "float32", ("q_proj", "v_proj")) and len(s.parameters) == 2 * 2 * 2
    assert s.parameters["model.layers.1.attn.v_proj.lora_B.MatMul.weight"] == (4, 32)  # 2 KV heads x 16
    assert ex["fp32"].lora == s  # the int4 graph kept its LoRA branches float
    gen = verify_bundle(kit["bundles"]["int4"]).manifest.generation
    assert gen["lora"] == s.to_dict()
    for slotted, plain, atol in (("fp32", "plain", 0.0), ("int4", "plain4", 1e-3)):
        a, b = _rt(ex[slotted].folder), _rt(ex[plain].folder)
        ids = a.encode("The function returns a list of the values this module provides")
        assert np.abs(a.logits(ids) - b.logits(ids)).max() <= atol, slotted
        assert a.greedy(a.encode(PROMPT), 12) == b.greedy(b.encode(PROMPT), 12)


@pytest.mark.slow
def test_adapter_bundle_is_small_pinned_and_gives_the_baked_models_outputs(kit, keys, tmp_path):
    from edgebundle.archive import verify_signed
    from edgebundle.manifest import adapter_refusal
    from edgebundle.signing import load_public_key
    from edgeruntime.genai import check_golden

    base = kit["bundles"]["int4"]
    r = _cli("build", kit["src"], "--adapter", kit["adapter"], "--base", base, "-t", "x86-cpu", "-o", tmp_path,
             "--name", "fr", "--sign-key", keys / "a.key", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    t = report["targets"][0]
    assert t["format"] == "genai-adapter" and t["quality"]["agreement"] >= 0.85
    assert t["base_quality"]["agreement"] < t["quality"]["agreement"]  # the adapter is what makes the reference
    bundle, _key = verify_signed(Path(t["bundle"]), [load_public_key(keys / "a.pub")])
    m, bm = bundle.manifest, verify_signed(base, [load_public_key(keys / "a.pub")])[0].manifest
    size, base_size = Path(t["bundle"]).stat().st_size, base.stat().st_size
    print(f"adapter bundle {size} bytes, base bundle {base_size} bytes: {size / base_size:.2%}")
    assert size <= 0.05 * base_size
    a = m.adapter
    assert m.format == "genai-adapter" and a["base_sha256"] == bm.files["model.onnx.data"].sha256
    assert (a["rank"], a["targets"], a["slots"]) == (4, ["q_proj", "v_proj"], bm.generation["lora"])
    assert adapter_refusal(bm, m) is None
    fp32 = verify_signed(kit["bundles"]["fp32"], [load_public_key(keys / "a.pub")])[0].manifest
    assert adapter_refusal(fp32, m).startswith(f"adapter pinned to base {a['base_sha256'][:12]} (tiny-int4 1.0.0) "
                                               f"but this device runs {fp32.weights_sha256[:12]} (tiny-fp32 1.0.0)")
    adapter_file = bundle.extract(tmp_path / "x")["adapter.onnx_adapter"]

    rt = _rt(kit["ex"]["int4"].folder)  # the device's side: the base loaded once, the adapter beside it
    base_out = rt.greedy(rt.encode(PROMPT), 12)
    rt.load_adapter(str(adapter_file), "fr")
    assert check_golden(rt, a["golden"], a["golden_agreement"], adapter="fr").agreement == 1.0  # same host
    assert rt.greedy(rt.encode(PROMPT), 12) == base_out  # loaded is not active
    assert rt.activate("fr") is None
    adapted = rt.greedy(rt.encode(PROMPT), 12)
    assert adapted != base_out and rt.greedy(rt.encode(PROMPT), 12, adapter=None) == base_out
    with pytest.raises(InputError, match="is active"):
        rt.unload_adapter("fr")
    assert rt.activate(None) == "fr" and rt.greedy(rt.encode(PROMPT), 12) == base_out  # rollback: the base again
    rt.unload_adapter("fr")
    assert rt.adapters == ()

    # the same adapter file in the fp32 slot base = the builder's own export with the adapter baked in
    slot, baked = _rt(kit["ex"]["fp32"].folder), _rt(kit["ex"]["baked"].folder)
    slot.load_adapter(str(adapter_file), "fr")
    slot.activate("fr")
    ids = slot.encode("Bonjour, je suis un petit modele. The function returns")
    assert np.abs(slot.logits(ids) - baked.logits(ids)).max() < 1e-4
    assert slot.greedy(slot.encode(PROMPT), 16) == baked.greedy(baked.encode(PROMPT), 16)


@pytest.mark.slow
def test_adapters_that_do_not_fit_are_refused_before_any_work(kit, tmp_path):
    src, adapter = kit["src"], kit["adapter"]
    r = _cli("build", src, "--adapter", adapter, "--base", kit["bundles"]["plain"], "-t", "x86-cpu", "-o", tmp_path)
    assert r.exit_code == 2 and "has no LoRA slots" in r.output and "--lora-slots" in r.output
    r = _cli("build", src, "--adapter", adapter, "--base", kit["bundles"]["int4"], "-t", "arm-cpu", "-o", tmp_path)
    assert r.exit_code == 2 and "was built for x86-cpu, not arm-cpu" in r.output
    wide = tmp_path / "wide"
    shutil.copytree(adapter, wide)
    cfg = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps(dict(cfg, r=8, target_modules=["q_proj", "k_proj"])))
    r = _cli("build", src, "--adapter", wide, "--base", kit["bundles"]["int4"], "-t", "x86-cpu", "-o", tmp_path)
    assert r.exit_code == 2 and "targets k_proj have no slot; rank 8 is above the slots' rank 4" in r.output
    assert not list(tmp_path.glob("*.edgepack"))
