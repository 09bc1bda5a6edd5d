"""`edgepack build` for causal LMs (packager/llm): a tiny trained decoder through the real model builder,
the real float reference and the real timing child; the rules of the choice on figures made here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgebundle.errors import InputError
from packager.llm.build import Candidate, choose, recipes, refusal, validation_texts
from packager.llm.detect import is_causal_lm
from packager.llm.export import Recipe
from packager.llm.quality import Quality
from packager.llm.timing import Speed
from packager.results import Verdict
from targets import load_profile


def _cli(*args):
    from edgepack.cli import main

    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False)


def test_causal_lm_sources_are_told_from_their_config_or_suffix(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"]}))
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert is_causal_lm(tmp_path / "lm") and is_causal_lm(tmp_path / "m.gguf")
    assert not is_causal_lm(tmp_path / "enc") and not is_causal_lm(tmp_path)


def test_each_target_gets_its_ladder_and_coral_is_refused_with_the_reason():
    cpu = [r.label for r in recipes(load_profile("arm-cpu"), "auto")]
    assert cpu == ["int4-b32-a4", "int4-b128-a4", "int8-b32-a4", "int8-b128-a4", "fp32"]
    assert [r.label for r in recipes(load_profile("x86-cpu"), "int4")] == ["int4-b32-a4", "int4-b128-a4"]
    assert {r.ep for r in recipes(load_profile("jetson-gpu"), "auto")} == {"cuda"}
    assert "Edge TPU" in refusal(load_profile("coral")) and refusal(load_profile("rpi5")) is None


def _cand(label: str, size: int, tok_s: float, low: float, high: float) -> Candidate:
    precision, *rest = label.split("-")
    r = Recipe(precision, int(rest[0][1:]) if rest else None)
    return Candidate(r, size, Quality(0.9, 1.01, 10.0, 100), Speed(5.0, tok_s, low, high, 3, 2, 128, 64), Verdict.PASSED)


def test_the_fastest_wins_unless_a_smaller_one_is_within_noise():
    fast, slow = _cand("int4-b32", 100, 30.0, 29.0, 31.0), _cand("fp32", 400, 10.0, 9.5, 10.5)
    assert choose([slow, fast])[0] is fast
    big_fast, small_close = _cand("int8-b32", 200, 30.0, 29.0, 31.0), _cand("int4-b32", 100, 29.0, 28.5, 29.5)
    best, why = choose([big_fast, small_close])
    assert best is small_close and "tied" in why and "int8-b32" in why
    small_far = _cand("int4-b32", 100, 20.0, 19.0, 21.0)  # 33 % slower, rounds apart: not a tie
    assert choose([big_fast, small_far])[0] is big_fast


def test_validation_texts_are_checked_before_any_work(tmp_path):
    with pytest.raises(InputError, match="does-not-exist"):
        validation_texts(tmp_path / "does-not-exist.txt")
    (tmp_path / "few.txt").write_text("One short text that is long enough.\n\nAnd a second one, also long enough.\n")
    with pytest.raises(InputError, match="2 usable text"):
        validation_texts(tmp_path / "few.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine and long enough to count"}\n{"txt": 1}\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        validation_texts(tmp_path / "bad.jsonl")
    texts, source = validation_texts(None)
    assert len(texts) >= 50 and "docstrings" in source


def test_a_tensor_precision_on_a_causal_lm_is_refused_at_once(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    r = _cli("build", tmp_path / "lm", "-t", "x86-cpu", "-o", tmp_path / "out", "--quantize", "int16x8")
    assert r.exit_code == 2 and "does not apply to a causal LM" in r.output
    assert not (tmp_path / "out").exists()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_template_that_cannot_serve_is_refused_before_any_work(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    bad = {"syntax.jinja": ("{% for m in messages %}{{ m['content'] }}\n{% endfor", "syntax.jinja:2: not a Jinja"),
           "blind.jinja": ("<start>{{ bos_token }}", "does not read `messages`")}
    for name, (text, why) in bad.items():
        (tmp_path / name).write_text(text)
        r = _cli("build", tmp_path / "lm", "-t", "x86-cpu", "-o", tmp_path / "out", "--chat-template", tmp_path / name)
        assert r.exit_code == 2 and why in r.output, r.output  # no weights: any later step would fail otherwise
    (tmp_path / "chatml.jinja").write_text(CHATML)
    (tmp_path / "m.onnx").write_bytes(b"not read")
    r = _cli("build", tmp_path / "m.onnx", "-t", "x86-cpu", "-o", tmp_path / "out", "--chat-template",
             tmp_path / "chatml.jinja")
    assert r.exit_code == 2 and "--chat-template is for causal LMs" in r.output, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_auto_builds_each_cpu_target_and_refuses_coral(tiny_llm, tmp_path):
    from edgebundle.archive import verify_bundle
    from edgeruntime import LoadSpec, load_runtime
    from edgeruntime.genai import check_golden

    out = tmp_path / "dist"
    (tmp_path / "chatml.jinja").write_text(CHATML)  # in place of the folder's own template
    r = _cli("build", tiny_llm, "-t", "x86-cpu", "-t", "arm-cpu", "-t", "coral", "-t", "jetson-gpu", "-o", out,
             "--name", "lm", "--json", "--chat-template", tmp_path / "chatml.jinja")
    assert r.exit_code == 3, r.output  # coral: ConversionError
    report = json.loads(r.output[r.output.index("{"):])
    by = {t["target"]: t for t in report["targets"]}
    assert not by["coral"]["ok"] and "Edge TPU" in by["coral"]["error"] and not by["coral"]["candidates"]
    gate = report["shared"]["gate"]
    for name in ("x86-cpu", "arm-cpu"):
        t = by[name]
        assert t["ok"], t
        labels = [c["candidate"] for c in t["candidates"]]
        assert labels == ["int4-b32-a4", "int4-b128-a4", "int8-b32-a4", "int8-b128-a4", "fp32"]
        chosen = next(c for c in t["candidates"] if c["verdict"] == "chosen")
        q = chosen["quality"]
        assert q["agreement"] >= gate["min_agreement"] and q["ppl_ratio"] <= gate["max_ppl_ratio"]
        assert all(c["speed"]["decode_tok_s"] > 0 for c in t["candidates"] if c["verdict"] in ("chosen", "passed"))
        fp32 = next(c for c in t["candidates"] if c["candidate"] == "fp32")
        assert fp32["quality"]["agreement"] > 0.99  # the export itself is the float model
    jetson = by["jetson-gpu"]  # CUDA graphs: scored on this CPU, not timed on it
    assert jetson["ok"] and [c["candidate"] for c in jetson["candidates"]] == ["int4-b32-cuda", "fp16-cuda"]
    assert "no CUDA" in jetson["why"] and all(c["speed"] is None for c in jetson["candidates"])
    assert verify_bundle(Path(jetson["bundle"])).manifest.runtime.providers == ("CUDAExecutionProvider",)
    # both CPU targets are timed alike on this host: one timing run, the same figures
    assert [c["speed"] for c in by["x86-cpu"]["candidates"]] == [c["speed"] for c in by["arm-cpu"]["candidates"]]
    bundle = Path(by["arm-cpu"]["bundle"])
    m = verify_bundle(bundle).manifest
    gen = m.generation
    assert m.format == "genai" and m.target["name"] == "arm-cpu" and m.precision == by["arm-cpu"]["chosen"].split("-")[0]
    assert gen["context_length"] == 256 and gen["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert gen["defaults"] == {"max_tokens": 48, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    assert gen["chat_template"] == "chat_template.jinja" and len(gen["golden"]) == 4
    folder = tmp_path / "x"
    verify_bundle(bundle).extract(folder)
    rt = load_runtime(str(folder / m.model_file), LoadSpec(format="genai", threads=1))
    assert check_golden(rt, gen["golden"], gen["golden_agreement"]).agreement == 1.0  # same host, same kernels
    assert (folder / gen["chat_template"]).read_text() == CHATML
    assert rt.chat_prompt([{"role": "user", "content": "Hi"}], CHATML) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    rt.close()

    # A rebuild with a gate nothing passes: the reference and the int8 export come from the build cache (the
    # suite's EDGEPACK_CACHE_DIR), the target fails, nothing is written.
    again = tmp_path / "again"
    r = _cli("build", tiny_llm, "-t", "x86-cpu", "-o", again, "--quantize", "int8", "--min-agreement", "0.999", "--json")
    assert r.exit_code == 4, r.output  # int8 keeps ~99 % of the next tokens: short of 99.9 %
    report = json.loads(r.output[r.output.index("{"):])
    assert report["shared"]["reference"]["from_cache"] is True, report["shared"]
    assert "no candidate passed the generation gate" in report["targets"][0]["error"]
    assert "int8-b32-a4: agreement" in report["targets"][0]["error"]
    assert not again.exists() or not list(again.glob("*.edgepack"))


def test_llm_cache_entries_are_keyed_by_bytes_and_never_trusted_damaged(tmp_path, monkeypatch):
    """packager/llm/cache.py over the build cache: a folder kept and fetched back whole; another source's
    bytes, another recipe or other texts are other keys; a damaged entry is not used (and is gone)."""
    from packager.llm import cache
    from packager.llm.export import _key

    st = cache.store(tmp_path / "cache")
    monkeypatch.delenv("EDGEPACK_CACHE_DIR", raising=False)
    assert cache.store(None) is None and cache.store(tmp_path / "cache", enabled=False) is None
    monkeypatch.setenv("EDGEPACK_CACHE_DIR", str(tmp_path / "env"))
    assert cache.store(None).root == tmp_path / "env"
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    src = cache.Source.of(st, lm)
    k8, k4 = _key(src, Recipe("int8", 32, 4), None), _key(src, Recipe("int4", 32, 4), None)
    assert k8 != k4 and k8 == _key(cache.Source.of(st, lm), Recipe("int8", 32, 4), None)
    (lm / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "x": 1}')
    assert _key(cache.Source.of(st, lm), Recipe("int8", 32, 4), None) != k8  # the folder's bytes, not its path
    assert src.key("llm-reference", texts=cache.text_digest(["a"])) != src.key("llm-reference", texts=cache.text_digest(["b"]))

    made = tmp_path / "made"
    made.mkdir()
    (made / "model.onnx").write_bytes(b"onnx" * 100)
    (made / "genai_config.json").write_text("{}")
    cache.keep(st, k8, made)
    out = tmp_path / "work" / "int8"
    out.parent.mkdir()
    assert cache.fetch(st, k8, out) and (out / "model.onnx").read_bytes() == b"onnx" * 100
    assert not cache.fetch(st, k4, tmp_path / "work" / "int4") and not (tmp_path / "work" / "int4").exists()
    kept = next((tmp_path / "cache").rglob("model.onnx"))
    kept.write_bytes(b"damaged")
    assert not cache.fetch(st, k8, tmp_path / "work" / "again") and not kept.exists()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["int8"]  # no landing folders left behind
