"""LoRA adapters for generative bundles (packager.llm.lora, packager.llm.adapter, edgeruntime.genai): a base
with zero slots computes the base; an adapter trained here with PEFT becomes a small signed bundle pinned to
that base, and switched in per generator it gives what the model builder's own baked export of the same
adapter gives; other bases and misfit adapters are refused with the reason."""
from __future__ import annotations

import json
import shutil
import threading
import urllib.request
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

    def fake_export_all(src, jobs, *, context_length=None, lora=None, cache=None):
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


@pytest.fixture(scope="module")
def built(kit, keys, tmp_path_factory) -> dict:
    """The PEFT adapter built through `edgepack build --adapter` into a signed bundle for the int4 base."""
    out = tmp_path_factory.mktemp("adapter-bundle")
    r = _cli("build", kit["src"], "--adapter", kit["adapter"], "--base", kit["bundles"]["int4"], "-t", "x86-cpu",
             "-o", out, "--name", "fr", "--sign-key", keys / "a.key", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    return {"bundle": Path(report["targets"][0]["bundle"]), "report": report}


@pytest.mark.slow
def test_adapter_bundle_is_small_pinned_and_gives_the_baked_models_outputs(kit, built, keys, tmp_path):
    from edgebundle.archive import verify_signed
    from edgebundle.manifest import adapter_refusal
    from edgebundle.signing import load_public_key
    from edgeruntime.genai import check_golden

    base = kit["bundles"]["int4"]
    t = built["report"]["targets"][0]
    assert t["format"] == "genai-adapter" and t["quality"]["agreement"] >= 0.85
    assert t["base_quality"]["agreement"] < t["quality"]["agreement"]  # the adapter is what makes the reference
    bundle, _key = verify_signed(built["bundle"], [load_public_key(keys / "a.pub")])
    m, bm = bundle.manifest, verify_signed(base, [load_public_key(keys / "a.pub")])[0].manifest
    size, base_size = built["bundle"].stat().st_size, base.stat().st_size
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


def _greedy(model, n: int = 12) -> str:
    return model.generation.complete(PROMPT, max_tokens=n, temperature=0).text


@pytest.mark.slow
def test_the_device_loads_an_adapter_beside_its_base_and_refuses_another_bases(kit, built, tmp_path):
    from device_agent.model import load_bundle

    base = load_bundle(kit["bundles"]["int4"], model_dir=tmp_path / "b")
    before = _greedy(base)
    with pytest.raises(BundleError, match="loads beside its base"):
        load_bundle(built["bundle"], model_dir=tmp_path / "x")
    other = load_bundle(kit["bundles"]["fp32"], model_dir=tmp_path / "f")
    with pytest.raises(BundleError, match=r"adapter pinned to base \w{12} \(tiny-int4 1.0.0\) but this device runs "
                                          r"\w{12} \(tiny-fp32 1.0.0\)"):
        load_bundle(built["bundle"], model_dir=tmp_path / "x", base=other)
    other.close()
    fr = load_bundle(built["bundle"], model_dir=tmp_path / "a", base=base)  # golden prompts checked with the adapter
    assert fr.runtime.base is base.runtime and fr.base is base and fr.name == "fr"
    adapted = _greedy(fr)
    assert adapted != before and _greedy(base) == before  # the base serves on beside it, unchanged
    assert base.version_of("fr") is None and fr.version_of("fr") == "1.0.0" and fr.version_of("tiny-int4") == "1.0.0"
    base.close()  # the base's owner lets go (an update committed the adapter): its weights stay while fr runs
    again = load_bundle(built["bundle"], model_dir=tmp_path / "a2", base=fr)  # an adapter on the serving adapter's base
    assert again.base is base and _greedy(again) == adapted
    fr.close()
    assert _greedy(again) == adapted and base.runtime._model is not None
    again.close()
    assert base.runtime._model is None  # the last view gone: the base's weights are freed


def _post(a, body: dict) -> tuple[int, dict]:
    import urllib.error

    req = urllib.request.Request(a.base + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class _Clients:
    """One client asking for completions in a loop until stopped; what did not answer 200 is kept."""

    def __init__(self, a, body: dict):
        self.sent, self.failed, self._stop = 0, [], threading.Event()
        self._thread = threading.Thread(target=self._run, args=(a, body), daemon=True)
        self._thread.start()

    def _run(self, a, body) -> None:
        while not self._stop.is_set():
            code, out = _post(a, body)
            self.sent += 1
            if code != 200:
                self.failed.append((code, out))

    def end(self) -> None:
        self._stop.set()
        self._thread.join(60)


def _resigned(path: Path, dest: Path, keys: Path, **changes) -> Path:
    """A copy of an adapter bundle with manifest fields (version, adapter section) changed, signed again."""
    from dataclasses import replace
    from functools import partial

    from edgebundle.archive import verify_bundle, write_bundle
    from edgebundle.signing import load_private_key, sign

    b = verify_bundle(path)
    files = b.extract(dest / "files")
    m = replace(b.manifest, adapter=dict(b.manifest.adapter, **changes.pop("adapter", {})), **changes)
    out = dest / m.file_name
    write_bundle(out, m, files, signer=partial(sign, private_key=load_private_key(keys / "a.key")))
    return out


@pytest.mark.agent
def test_an_adapter_pushed_to_a_serving_agent_switches_without_a_failed_request(tmp_path, broker, kit, built, keys):
    """A real agent serving the int4 base: the adapter pushed over MQTT (to the base's model, by default)
    is rolled back when the agent dies in probation (the base's outputs again), then committed under load
    with no failed request (the adapted outputs), kept across a restart (the base loaded for it from the
    store), and one pinned to another base is refused with the reason while the adapter serves on."""
    from device_agent.model import load_bundle
    from otakit import agent, push, state, wait_until

    ref_base = load_bundle(kit["bundles"]["int4"], model_dir=tmp_path / "ref-b")
    ref = load_bundle(built["bundle"], model_dir=tmp_path / "ref-a", base=ref_base)
    want_base, want_adapted = _greedy(ref_base), _greedy(ref)
    ref.close()
    ref_base.close()
    body = {"model": "tiny-int4", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}

    def text(a) -> str:
        code, out = _post(a, body)
        assert code == 200, out
        return out["choices"][0]["text"]

    a = agent(tmp_path, broker, kit["bundles"]["int4"], keys, env={"EDGEPACK_AGENT_FAULT_DELAY": "probation=30"})
    try:
        assert text(a) == want_base
        push(broker, built["bundle"], device="dev1", sign=keys / "a.key")  # --model defaults to the base's
        wait_until(lambda: state(a.data_dir) == "probation", 60, what="probation")
        a.stop("kill")
        a.env = None
        a.start()
        wait_until(lambda: state(a.data_dir) == "rolled_back", 60, what="rolled back")
        assert text(a) == want_base  # rolled back: the base alone again

        clients = _Clients(a, body)
        wait_until(lambda: clients.sent >= 3, 30, what="the LLM answering")
        progress = []
        res = push(broker, built["bundle"], device="dev1", sign=keys / "a.key", wait=True, timeout=90,
                   progress=lambda _d, e: progress.append(e["progress"]) if e.get("progress") else None)
        assert text(a) == want_adapted
        clients.end()
        assert res.ok, res.devices
        assert not clients.failed and clients.sent >= 6, (clients.sent, clients.failed[:3])
        moved, base_size = progress[-1]["total"], kit["bundles"]["int4"].stat().st_size
        print(f"adapter push moved {moved} bytes; the base bundle is {base_size}: {moved / base_size:.2%}")
        assert moved <= 0.05 * base_size

        a.stop()
        a.start()  # active.json: the adapter, and its base beside it
        assert text(a) == want_adapted

        other = _resigned(built["bundle"], tmp_path / "other", keys, version="1.0.1",
                          adapter={"base_sha256": "f" * 64, "base_name": "tiny-int4", "base_version": "0.9.0"})
        res = push(broker, other, device="dev1", sign=keys / "a.key", wait=True, timeout=60)
        final = res.devices["dev1"]
        assert final["state"] == "failed" and "adapter pinned to base ffffffffffff (tiny-int4 0.9.0) but this " \
                                             "device runs" in final["error"], final
        assert text(a) == want_adapted
    finally:
        a.stop()
