"""Sequence length of text bundles (packager/sequence.py): TFLite length buckets chosen from the
data's token lengths, converted and validated at each length and run per text by the agent; the
x86-cpu bundle's dynamic axis (unpadded requests); the TensorRT optimisation profile of jetson-gpu
bundles, from the manifest to the EP's provider options. No GPU here: the TensorRT EP itself is not
run, only its options and the CPU fallback."""
from __future__ import annotations

import importlib.util
import json
import urllib.request
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgebundle.errors import BundleError
from edgebundle.manifest import Manifest, RuntimeSpec
from edgeruntime.onnxrt import provider_options
from edgeruntime.text import Role, TextSettings

SETTINGS = TextSettings(max_length=128, inputs=(("input_ids", Role.IDS), ("attention_mask", Role.MASK)))
TRT = "TensorrtExecutionProvider"


def _text_source(max_length: int = 128, names=("input_ids", "attention_mask")):
    from packager.sources import InputSpec, Source, SourceKind, TextInfo

    settings = replace(SETTINGS, max_length=max_length, inputs=tuple((n, Role.IDS if n == "input_ids" else Role.MASK)
                                                                      for n in names))
    return Source(path=Path("m.onnx"), kind=SourceKind.ONNX, text=TextInfo(tokenizer=Path("tokenizer.json"),
                                                                            settings=settings),
                  inputs=[InputSpec(n, (None, None), "int64", (1, max_length)) for n in names])


# ---- fast: bucket choice, lengths, the TensorRT profile and its provider options ----

@pytest.mark.parametrize("lengths,max_length,want", [
    ([10] * 20 + [25] * 60 + [60] * 20, 128, (16, 32, 64)),  # from p10 (-> 16), doubling below max_length
    ([10] * 20 + [25] * 60 + [60] * 20, 384, (16, 32, 64, 128, 256)),  # 128 tokens run at 128, not 384
    ([18] * 30 + [31] * 40 + [48] * 30, 48, (32,)),  # 64 would pass max_length: the main model covers it
    ([3, 4, 5, 5, 6], 128, (8, 16, 32, 64)),  # never below 8 tokens; longer traffic than the data's covered
    ([128] * 5, 128, ()),  # every text at max_length: nothing smaller to build
    ([5] * 10, 4096, (32, 64, 128, 256, 512, 1024, 2048)),  # at most 7 below the main model: the longest kept
    ([], 128, ()),
])
def test_buckets_come_from_the_data_lengths_as_powers_of_two_below_max_length(lengths, max_length, want):
    from packager.sequence import MOST_BUCKETS, choose_buckets

    got = choose_buckets(np.asarray(lengths), max_length)
    assert got == want and len(got) < MOST_BUCKETS
    steps = got + (max_length,)
    assert all(b <= 2 * a for a, b in zip(steps, steps[1:]))  # no text past the first runs at over 2x its length
    assert TextSettings(max_length=max_length, inputs=SETTINGS.inputs, buckets=got + (max_length,))  # valid settings


def test_token_lengths_read_the_mask_or_the_ids_up_to_the_last_non_pad():
    from packager.sequence import token_lengths

    ids = np.array([[2, 7, 9, 3, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    assert token_lengths([{"input_ids": ids, "attention_mask": mask}], SETTINGS).tolist() == [4]
    only_ids = TextSettings(max_length=8, inputs=(("input_ids", Role.IDS),))
    assert token_lengths([{"input_ids": ids}, {"input_ids": np.zeros((1, 6))}], only_ids).tolist() == [4, 0]


def test_only_tflite_text_models_with_a_dynamic_sequence_axis_are_bucketed():
    from packager.profiles import load_profile
    from packager.sequence import bucketed

    src = _text_source()
    assert bucketed(load_profile("arm-cpu"), src) and bucketed(load_profile("rpi5"), src)
    assert not bucketed(load_profile("x86-cpu"), src) and not bucketed(load_profile("jetson-gpu"), src)
    assert not bucketed(load_profile("arm-cpu"), replace(src, text=None))
    src.inputs[0].signature = (None, 128)  # the user's export fixed the length: one model it is
    assert not bucketed(load_profile("arm-cpu"), src)


def test_tensorrt_profile_spans_batch_and_length_with_the_median_as_opt():
    from packager.profiles import load_profile
    from packager.sequence import TRT_MAX_BATCH, trt_profile

    src = _text_source(max_length=64)
    prof = trt_profile(load_profile("jetson-gpu"), src, np.array([5, 20, 22, 30, 64]))
    assert prof == {n: {"min": [1, 1], "opt": [1, 22], "max": [TRT_MAX_BATCH, 64]}
                    for n in ("input_ids", "attention_mask")}
    assert trt_profile(load_profile("x86-cpu"), src, np.array([5])) is None  # no TensorRT there
    assert trt_profile(load_profile("jetson-gpu"), replace(src, text=None), np.array([5])) is None


def test_tensorrt_provider_options_come_from_the_manifest_runtime_section():
    section = {"name": "onnxruntime", "providers": [TRT, "CPUExecutionProvider"], "tensorrt_fp16": True,
               "tensorrt_profile": {"input_ids": {"min": [1, 1], "opt": [1, 31], "max": [8, 128]},
                                    "attention_mask": {"min": [1, 1], "opt": [1, 31], "max": [8, 128]}}}
    rt = RuntimeSpec.from_dict(json.loads(json.dumps(section)))
    assert rt.to_dict() == section  # read and written again, key for key
    opts = provider_options(TRT, cache_dir=None, trt_fp16=rt.tensorrt_fp16, trt_cache=False,
                            trt_profile=rt.tensorrt_profile)
    assert opts == {"trt_fp16_enable": True,
                    "trt_profile_min_shapes": "input_ids:1x1,attention_mask:1x1",
                    "trt_profile_opt_shapes": "input_ids:1x31,attention_mask:1x31",
                    "trt_profile_max_shapes": "input_ids:8x128,attention_mask:8x128"}
    assert provider_options("CPUExecutionProvider", cache_dir=None, trt_fp16=True, trt_cache=False,
                            trt_profile=rt.tensorrt_profile) == {}
    assert "trt_profile_min_shapes" not in provider_options(TRT, cache_dir=None, trt_fp16=False, trt_cache=False)
    old = RuntimeSpec.from_dict({"name": "onnxruntime", "providers": [TRT]})  # an older manifest: no profile
    assert old.tensorrt_profile is None and "tensorrt_profile" not in old.to_dict()


@pytest.mark.parametrize("bad", [
    {"input_ids": {"min": [1, 64], "opt": [1, 31], "max": [8, 128]}},  # min above opt
    {"input_ids": {"min": [1, 1], "opt": [1, 31]}},  # no max
    {"input_ids": {"min": [1], "opt": [1, 31], "max": [8, 128]}},  # ranks differ
    {"input_ids": {"min": [0, 1], "opt": [1, 31], "max": [8, 128]}},  # not positive
    [1, 2],
])
def test_a_malformed_tensorrt_profile_is_refused(bad):
    with pytest.raises(BundleError, match="tensorrt_profile"):
        RuntimeSpec.from_dict({"name": "onnxruntime", "tensorrt_profile": bad})


def _tiny_onnx(path: Path) -> Path:
    """input_ids, attention_mask [batch, sequence] int64 -> their sum (float): a dynamic text-shaped model."""
    import onnx
    from onnx import TensorProto, helper

    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
           for n in ("input_ids", "attention_mask")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])
    nodes = [helper.make_node("Add", ["input_ids", "attention_mask"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    model = helper.make_model(helper.make_graph(nodes, "g", ins, [out]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_tensorrt_profile_bundle_falls_back_to_the_cpu_here_and_runs_any_length(tmp_path):
    pytest.importorskip("onnxruntime")
    from edgeruntime.registry import load_from_manifest

    path = _tiny_onnx(tmp_path / "m.onnx")
    prof = {n: {"min": [1, 1], "opt": [1, 16], "max": [8, 64]} for n in ("input_ids", "attention_mask")}
    m = Manifest(name="t", version="1.0.0", target={"name": "jetson-gpu"}, format="onnx", precision="fp16",
                 model_file="m.onnx", inputs=(), outputs=(),
                 runtime={"providers": [TRT, "CUDAExecutionProvider", "CPUExecutionProvider"], "cpu_fallback": True,
                          "tensorrt_profile": prof})
    rt = load_from_manifest(str(path), m)
    try:
        assert rt.details["provider"] == "CPUExecutionProvider"
        for n in (3, 40):
            x = np.ones((1, n), np.int64)
            assert rt.run({"input_ids": x, "attention_mask": x})["y"].shape == (1, n)
    finally:
        rt.close()


def test_manifest_text_buckets_must_name_listed_files_one_per_smaller_length():
    from edgebundle.manifest import _check_text

    files = {"tokenizer.json": 1, "model.tflite": 1, "model.len32.tflite": 1}
    text = {"tokenizer": "tokenizer.json", "settings": {"max_length": 48, "buckets": [32, 48]}, "golden_texts": [],
            "golden_ids": [], "buckets": [{"length": 32, "file": "model.len32.tflite", "golden": 3, "atol": 0.01}]}
    _check_text(text, files)
    _check_text({k: v for k, v in text.items() if k != "buckets"}, files)  # an older text bundle
    for bad in ({"file": "model.len16.tflite"}, {"length": 16}, {"atol": -1.0}):
        with pytest.raises((BundleError, ValueError)):
            _check_text(dict(text, buckets=[dict(text["buckets"][0], **bad)]), files)


# ---- slow: a real bucketed bundle, in process and over KServe ----

def _write(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny BERT (tanh GELU, which reaches TFLite today) for arm-cpu, x86-cpu and jetson-gpu."""
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    if importlib.util.find_spec("onnx2tf") is None:  # not importorskip: importing it sets TF_USE_LEGACY_KERAS here
        pytest.skip("onnx2tf is not installed")
    from textkit import sentences, tiny_hf_folder

    from packager.build import BuildOptions, build

    d = tmp_path_factory.mktemp("buckets")
    folder = tiny_hf_folder(d / "encoder", kind="sentence", act="gelu_new")
    texts = sentences(260, seed=11)
    res = build(BuildOptions(model=folder, targets=("arm-cpu", "x86-cpu", "jetson-gpu"), out_dir=d / "out",
                             name="enc", calibration=str(_write(d / "calib.txt", texts[:200])),
                             validation=str(_write(d / "valid.txt", texts[200:])), speed_gate=False))
    assert res.ok, [r.error for r in res.results]
    return {"folder": folder, "bundles": {r.target: r.bundle for r in res.results},
            "reports": {r.target: r.report for r in res.results}}


SHORT = "The path is relative."  # well under 32 tokens
LONG = "Return a new instance of the named tuple replacing specified fields with new values."  # 36 tokens


def _infer(bundle, texts, **kw):
    from device_agent import load_bundle

    model = load_bundle(bundle, **kw)
    try:
        return model.infer({"text": texts}), model
    finally:
        model.close()


@pytest.mark.slow
def test_arm_bundle_holds_validated_buckets_ending_at_max_length(built):
    from edgebundle.archive import open_bundle

    b = open_bundle(built["bundles"]["arm-cpu"])
    m = b.manifest
    assert m.text["settings"]["buckets"] == [32, 48] and m.text["settings"]["max_length"] == 48
    [bucket] = m.text["buckets"]
    assert bucket == dict(bucket, length=32, file=m.model_file, signature="len32", golden=3)  # one file
    assert [s.shape for s in m.inputs] == [(1, 48)] * 3  # the main model (default signature): max_length
    with zipfile.ZipFile(built["bundles"]["arm-cpu"]) as z:
        assert sorted(z.namelist()) == sorted(["manifest.json", "golden.npz", "model.tflite", "tokenizer.json"])
    seq = built["reports"]["arm-cpu"]["sequence"]
    assert seq["buckets"][0]["cosine_similarity"] >= 0.99 and seq["buckets"][0]["validated_on"] >= 10
    assert seq["left_out"] == []
    size = built["reports"]["arm-cpu"]["size_bytes"]  # what the bundle carries: the weights once
    assert size["model"] == m.files[m.model_file].size  # this tiny model's graph outweighs its weights:
    assert 0 < seq["buckets"][0]["size_bytes"] < size["buckets"] < 0.5 * size["model"]  # MiniLM's is test_corpus_text's
    assert built["reports"]["arm-cpu"]["size_ratio"] == round(size["model"] / size["fp32_model"], 4)


@pytest.mark.slow
def test_each_text_runs_in_the_smallest_bucket_and_matches_torch(built):
    from textkit import sentences, torch_sentence_embeddings

    too_long = " ".join(sentences(6, seed=3))
    out, model = _infer(built["bundles"]["arm-cpu"], [SHORT, LONG, too_long])
    assert set(model.buckets) == {32}
    assert out["text_length"].tolist() == [32, 48, 48]
    assert out["text_tokens"][0] <= 32 < out["text_tokens"][1] <= 48
    assert out["text_truncated"].tolist() == [False, False, True] and out["text_tokens"][2] == 48
    want = torch_sentence_embeddings(built["folder"], [SHORT, LONG, too_long], max_length=48)
    got = out["sentence_embedding"]
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99, cos
    # The short text in its bucket gives what the max_length model gives it padded (the unbucketed reference).
    enc = model.text.encode([SHORT], length=48)
    from device_agent import load_bundle

    full = load_bundle(built["bundles"]["arm-cpu"])
    try:
        ref = full.runtime.infer(enc.feeds)["sentence_embedding"]
    finally:
        full.close()
    np.testing.assert_allclose(got[:1], ref, atol=2e-3)


@pytest.mark.slow
def test_x86_bundle_runs_unpadded_on_its_dynamic_axis(built):
    from edgebundle.archive import open_bundle

    m = open_bundle(built["bundles"]["x86-cpu"]).manifest
    assert m.text["settings"]["buckets"] == [] and "buckets" not in m.text
    assert [s.shape_signature for s in m.inputs] == [(-1, -1)] * 3
    out, _ = _infer(built["bundles"]["x86-cpu"], [SHORT])
    assert out["text_length"].tolist() == out["text_tokens"].tolist()  # no padding at all
    out, _ = _infer(built["bundles"]["x86-cpu"], [SHORT, LONG])
    assert out["text_length"].tolist() == [out["text_tokens"][1]] * 2  # the request's longest text


@pytest.mark.slow
def test_jetson_bundle_records_a_tensorrt_profile_and_falls_back_to_the_cpu(built):
    from edgebundle.archive import open_bundle

    m = open_bundle(built["bundles"]["jetson-gpu"]).manifest
    prof = m.runtime.tensorrt_profile
    assert set(prof) == {"input_ids", "attention_mask", "token_type_ids"}
    for r in prof.values():
        assert r["min"] == [1, 1] and r["max"][1] == 48 and 1 <= r["opt"][1] <= 48 and r["opt"][0] == 1
    texts = [SHORT] * 9 + [LONG]  # more texts than the profile's largest batch: run in parts
    out, model = _infer(built["bundles"]["jetson-gpu"], texts, allow_cpu_fallback=True)
    assert model._text_step == prof["input_ids"]["max"][0]
    assert out["sentence_embedding"].shape == (10, 32)
    np.testing.assert_allclose(out["sentence_embedding"][0], out["sentence_embedding"][8], atol=1e-5)


def _unpacked(bundle, tmp_path):
    """The bundle's manifest and its members unpacked under tmp_path/parts (to write an edited copy)."""
    from edgebundle.archive import open_bundle

    parts = tmp_path / "parts"
    with zipfile.ZipFile(bundle) as z:
        z.extractall(parts)
    return open_bundle(bundle).manifest, parts


@pytest.mark.slow
def test_an_older_single_model_tflite_text_bundle_still_loads_and_pads_to_its_length(built, tmp_path):
    from edgebundle.archive import write_bundle

    src = built["bundles"]["arm-cpu"]
    m, parts = _unpacked(src, tmp_path)
    text = {k: v for k, v in m.text.items() if k != "buckets"}
    text["settings"] = dict(text["settings"], buckets=[])  # what edgepack wrote before buckets
    old = tmp_path / "old.edgepack"
    (parts / m.model_file).write_bytes(_split((parts / m.model_file).read_bytes(), "serving_default"))
    write_bundle(old, replace(m, text=text), {n: parts / n for n in m.files})
    out, model = _infer(old, [SHORT, LONG])
    assert model.buckets == {} and out["text_length"].tolist() == [48, 48]
    new, _ = _infer(src, [SHORT, LONG])
    np.testing.assert_allclose(out["sentence_embedding"], new["sentence_embedding"], atol=2e-3)


def _split(merged: bytes, key: str) -> bytes:
    """The signature `key` of a merged .tflite as a model of its own (every buffer kept): the file an
    edgepack before shared weights wrote for a length bucket."""
    import flatbuffers

    from packager.tflite_fb import read_model

    m = read_model(merged)
    [sig] = [s for s in m.signatureDefs if s.signatureKey.decode() == key]
    m.subgraphs, sig.subgraphIndex, sig.signatureKey = [m.subgraphs[sig.subgraphIndex]], 0, "serving_default"
    m.signatureDefs = [sig]
    b = flatbuffers.Builder(1 << 20)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


@pytest.mark.slow
def test_an_older_bundle_with_a_file_per_bucket_still_loads_and_a_wrong_one_is_refused(built, tmp_path):
    from device_agent import load_bundle
    from edgebundle.archive import write_bundle

    src = built["bundles"]["arm-cpu"]
    m, parts = _unpacked(src, tmp_path)
    (parts / "model.len32.tflite").write_bytes(_split((parts / m.model_file).read_bytes(), "len32"))
    bucket = {k: v for k, v in m.text["buckets"][0].items() if k != "signature"}
    old_text = dict(m.text, buckets=[dict(bucket, file="model.len32.tflite")])
    old = tmp_path / "old.edgepack"
    write_bundle(old, replace(m, text=old_text), {**{n: parts / n for n in m.files}, "model.len32.tflite":
                                                   parts / "model.len32.tflite"})
    (out, model), (new, _) = _infer(old, [SHORT, LONG]), _infer(src, [SHORT, LONG])
    assert sorted(model.buckets) == [32] and out["text_length"].tolist() == [32, 48]
    np.testing.assert_array_equal(out["sentence_embedding"], new["sentence_embedding"])  # the same graphs

    (parts / "model.len32.tflite").write_bytes((parts / m.model_file).read_bytes())  # the 48-token model there
    swapped = tmp_path / "swapped.edgepack"
    write_bundle(swapped, replace(m, text=old_text), {**{n: parts / n for n in m.files}, "model.len32.tflite":
                                                       parts / "model.len32.tflite"})
    with pytest.raises(BundleError, match="length bucket model.len32.tflite takes .*not sequence length 32"):
        load_bundle(swapped)
    for sig, why in (("serving_default", "length bucket model.tflite takes .*not sequence length 32"),
                     ("len7", "has no signature 'len7'")):  # a manifest that names the wrong graph
        bad = tmp_path / f"{sig}.edgepack"
        write_bundle(bad, replace(m, text=dict(m.text, buckets=[dict(bucket, signature=sig)])),
                     {n: parts / n for n in m.files})
        with pytest.raises(BundleError, match=why):
            load_bundle(bad)


@pytest.mark.agent
def test_agent_answers_each_text_from_its_bucket_over_kserve(built, tmp_path):
    from agents import AgentProc

    bundle = built["bundles"]["arm-cpu"]
    ref, _ = _infer(bundle, [SHORT, LONG])
    a = AgentProc(tmp_path / "data", bundle=bundle, interval=60, extra=("--log-format", "text"))
    a.model_name = "enc"
    a.start()
    try:
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": [SHORT, LONG]}]}
        req = urllib.request.Request(a.base + "/v2/models/enc/infer", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            out = {o["name"]: o for o in json.loads(r.read())["outputs"]}
        assert out["text_length"]["data"] == [32, 48] and out["text_length"]["datatype"] == "INT64"
        got = np.asarray(out["sentence_embedding"]["data"], np.float32).reshape(out["sentence_embedding"]["shape"])
        np.testing.assert_allclose(got, ref["sentence_embedding"], atol=1e-5)
        # a lone surrogate (JSON can carry one) is the request's fault: a 400 naming it, and the agent serves on
        bad = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\udcff x"]}]}
        req = urllib.request.Request(a.base + "/v2/models/enc/infer", data=json.dumps(bad).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 400 and "lone surrogate" in err.value.read().decode()
        assert a._get("/v2/health/ready") == 200
    finally:
        a.stop()


# ---- fast: the reference and any-length targets run each text at its own length ----

def _pooling_onnx(path: Path, kind: str) -> Path:
    """A tiny text encoder over [batch, sequence] ids and mask: "masked" mean-pools the real tokens (padding
    changes nothing), "unmasked" pools every position, "tokens" returns a vector per position."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32), "table")
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"])]
    if kind == "masked":
        nodes += [helper.make_node("Mul", ["e", "m3"], ["em"]),
                  helper.make_node("ReduceSum", ["em", "one"], ["s"], keepdims=0),
                  helper.make_node("ReduceSum", ["m3", "one"], ["n"], keepdims=0),
                  helper.make_node("Div", ["s", "n"], ["y"])]
    elif kind == "unmasked":
        nodes += [helper.make_node("Mul", ["m3", "zero"], ["z"]), helper.make_node("Add", ["e", "z"], ["ez"]),
                  helper.make_node("ReduceMean", ["ez"], ["y"], axes=[1], keepdims=0)]
    else:
        nodes += [helper.make_node("Mul", ["e", "m3"], ["y"])]
    seq = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, seq),
                     helper.make_tensor_value_info("attention_mask", TensorProto.INT64, seq)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4] if kind == "tokens" else ["batch", 4])],
        [table, numpy_helper.from_array(np.array([-1], np.int64), "last"),
         numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.float32(0), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("kind,trimmed", [("masked", True), ("unmasked", False), ("tokens", False)])
def test_texts_run_unpadded_only_where_padding_changes_nothing(tmp_path, kind, trimmed):
    from packager.build import _reference
    from packager.data import Dataset
    from packager.options import BuildInputs
    from packager.sources import SourceKind, TextInfo, load_source

    src = load_source(_pooling_onnx(tmp_path / f"{kind}.onnx", kind), workdir=tmp_path)
    assert src.kind is SourceKind.ONNX
    src.text = TextInfo(tokenizer=tmp_path / "tokenizer.json", settings=replace(SETTINGS, max_length=16))
    lengths = (3, 9, 16, 5)
    samples = [{"input_ids": np.pad(np.arange(2, 2 + n)[None], ((0, 0), (0, 16 - n))),
                "attention_mask": (np.arange(16) < n).astype(np.int64)[None]} for n in lengths]
    refs, cut = _reference(src, Dataset(samples))
    assert (cut is not None) == trimmed
    padded = [src.reference(s) for s in samples]
    for got, want in zip(refs, padded):  # the reference is the source's answer on each text either way
        if kind != "tokens":
            np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
    if not trimmed:
        return
    assert [s["input_ids"].shape for s in cut] == [(1, n) for n in lengths]
    assert all(s["attention_mask"].all() for s in cut)
    # a converted model that takes any length is validated on the texts as they are; a fixed-length one padded
    from edgebundle.manifest import TensorSpec

    inputs = BuildInputs(opts=None, name="t", source=src, calib=None, valid=Dataset(samples), reference=refs,
                         cache=None, progress=print, signer=None, trimmed=tuple(cut))
    spec = lambda sig: tuple(TensorSpec(n, (1, 16), "int64", shape_signature=sig) for n in ("input_ids", "attention_mask"))  # noqa: E731
    assert inputs.fed(spec((-1, -1))) == list(cut) and inputs.fed(spec((1, 16))) is samples
