"""BERT-class models to TFLite (arm-cpu, rpi5): the exact GELU and ReduceL2 rewritten for the ONNX ->
TFLite bridge (fast tests on graphs made here with onnx.helper, ONNX Runtime's outputs equal before
and after), then tiny generated BERTs built with `--quantize auto` (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from packager.formats.onnx_rewrite import expand_reduce_l2, for_tflite, fuse_exact_gelu
from targets import Precision


def _model(nodes, inits, *, opset, shape=(2, 16)):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                              [numpy_helper.from_array(np.asarray(v, np.float32 if k != "axes" else np.int64), k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _run(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _two_gelus():
    """torch's exact GELU, (x * (1 + erf(x / sqrt 2))) * 0.5, then tf2onnx's, (0.5 * x) * (1 + erf(x * 1/sqrt 2))
    with its constants in Constant nodes, then one Erf that is no GELU (x / 2)."""
    from onnx import helper, numpy_helper

    const = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))
             for name, v in (("c_isqrt2", 1 / np.sqrt(2)), ("c_one", 1.0), ("c_half", 0.5))]
    nodes = const + [
        helper.make_node("Div", ["x", "sqrt2"], ["a1"]), helper.make_node("Erf", ["a1"], ["a2"]),
        helper.make_node("Add", ["a2", "one"], ["a3"]), helper.make_node("Mul", ["x", "a3"], ["a4"]),
        helper.make_node("Mul", ["a4", "half"], ["g1"]),
        helper.make_node("Mul", ["c_isqrt2", "g1"], ["b1"]), helper.make_node("Erf", ["b1"], ["b2"]),
        helper.make_node("Add", ["c_one", "b2"], ["b3"]), helper.make_node("Mul", ["c_half", "g1"], ["b4"]),
        helper.make_node("Mul", ["b4", "b3"], ["g2"]),
        helper.make_node("Div", ["g2", "two"], ["e1"]), helper.make_node("Erf", ["e1"], ["e2"]),
        helper.make_node("Add", ["e2", "g2"], ["y"])]
    return _model(nodes, {"sqrt2": np.sqrt(2), "one": 1.0, "half": 0.5, "two": 2.0}, opset=17)


def test_exact_gelu_becomes_one_gelu_node_with_the_same_outputs():
    import onnx

    x = np.linspace(-6, 6, 32, dtype=np.float32).reshape(2, 16)
    model = _two_gelus()
    before = _run(model, x)
    rewritten, done = for_tflite(model)
    onnx.checker.check_model(rewritten)
    ops = [n.op_type for n in rewritten.graph.node if n.op_type != "Constant"]
    assert done == {"gelu_fused": 2, "opset": "upgraded to 20 for the Gelu op"}
    assert ops == ["Gelu", "Gelu", "Div", "Erf", "Add"]  # the Erf that is no GELU stays
    np.testing.assert_allclose(_run(rewritten, x), before, rtol=1e-6, atol=1e-6)


def test_a_gelu_whose_parts_are_used_elsewhere_is_left_alone():
    from onnx import helper

    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["a1"]), helper.make_node("Erf", ["a1"], ["a2"]),
             helper.make_node("Add", ["a2", "one"], ["a3"]), helper.make_node("Mul", ["x", "a3"], ["a4"]),
             helper.make_node("Mul", ["a4", "half"], ["g"]), helper.make_node("Add", ["g", "a2"], ["y"])]
    model = _model(nodes, {"sqrt2": np.sqrt(2), "one": 1.0, "half": 0.5}, opset=20)
    assert fuse_exact_gelu(model) == 0 and [n.op_type for n in model.graph.node][:2] == ["Div", "Erf"]


@pytest.mark.parametrize("opset,axes_input", [(11, False), (13, False), (17, False), (18, True), (20, True)])
def test_reduce_l2_becomes_sqrt_of_a_sum_of_squares_at_every_opset(opset, axes_input):
    import onnx
    from onnx import helper

    inputs, attrs = (["x", "axes"], {}) if axes_input else (["x"], {"axes": [1]})
    nodes = [helper.make_node("ReduceL2", inputs, ["n"], keepdims=1, **attrs), helper.make_node("Div", ["x", "n"], ["y"])]
    model = _model(nodes, {"axes": [1]} if axes_input else {}, opset=opset, shape=(3, 8))
    x = np.random.default_rng(opset).normal(0, 2, (3, 8)).astype(np.float32)
    before = _run(model, x)
    assert expand_reduce_l2(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Mul", "ReduceSum", "Sqrt", "Div"]
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(_run(model, x), axis=1), 1.0, rtol=1e-5)


# ---- tiny generated BERTs (exact GELU) built for arm-cpu ----

@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    pytest.importorskip("torch")
    from textkit import sentences, tiny_hf_folder

    d = tmp_path_factory.mktemp("gelu")
    texts = sentences(220, seed=5)
    (d / "calib.txt").write_text("\n".join(texts[:160]) + "\n")
    (d / "valid.txt").write_text("\n".join(texts[160:]) + "\n")
    return tiny_hf_folder(d / "encoder", kind="sentence", act="gelu"), d


def _build(encoder, tmp_path, monkeypatch, *, cached=True, **opts):
    """A build whose system temp dir is `tmp_path/tmp` (its children's too): what it leaves there is a leak.
    `cached=False`: the run's build cache off, for a converter that fails on purpose."""
    import tempfile

    from packager.build import BuildOptions, build

    folder, d = encoder
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    if not cached:
        monkeypatch.delenv("EDGEPACK_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    # random weights: many near ties among the 60 validation texts, so dynamic int8 keeps the nearest
    # neighbour of 93-97 % of them from run to run (one text either side of the default 95 %)
    # one model at max_length: length buckets (a conversion each) are test_text_buckets'
    opts = {"targets": ("arm-cpu",), "bench_seconds": 0.5, "min_neighbours": 0.9, "length_buckets": (), **opts}
    res = build(BuildOptions(model=folder, out_dir=tmp_path / "out", name="enc", calibration=str(d / "calib.txt"),
                             validation=str(d / "valid.txt"), **opts))
    # .ses: a 51-byte session-id file the native runtimes (ONNX Runtime, LiteRT) write once per temp dir
    return res, sorted(p.name for p in tmp.iterdir() if p.name != ".ses")


def _embed(bundle_path, folder, texts):
    """The bundle's embeddings of `texts`, fed as token tensors padded to its static length."""
    from device_agent import load_bundle
    from edgeruntime.text import TextEncoder, TextSettings

    model = load_bundle(bundle_path, allow_cpu_fallback=True)
    try:
        m = model.manifest
        enc = TextEncoder.from_file(folder / "tokenizer.json", TextSettings.from_dict(m.text["settings"]))
        width = m.inputs[0].shape[1]
        texts = [t for t in texts if len(enc.ids([t])[0]) <= width]
        return texts, np.concatenate([model.infer(enc.encode([t], length=width).feeds)["sentence_embedding"]
                                      for t in texts])
    finally:
        model.close()


@pytest.mark.slow
def test_exact_gelu_bert_builds_for_arm_cpu_with_the_gelu_builtin(encoder, tmp_path, monkeypatch):
    from edgebundle.archive import open_bundle
    from packager.tflite_fb import ops_with_versions
    from textkit import sentences, torch_sentence_embeddings

    # what it converts to is under test, not this host's timings (the speed gate has test_build's tests)
    res, left = _build(encoder, tmp_path, monkeypatch, speed_gate=False)
    assert res.ok, [r.error for r in res.results]
    assert left == []  # the build folder and every child's scratch are gone
    r = res.results[0]
    first = r.report["candidates"][0]
    assert first["candidate"] == "dynamic", r.report["candidates"]  # a transformer tries dynamic int8 first
    assert first["verdict"] == "chosen", first
    bundle = open_bundle(r.bundle)
    ops = {name for name, _ in ops_with_versions(bundle.read("model.tflite"))}
    assert "GELU" in ops and not any(o.startswith("Flex") for o in ops), sorted(ops)
    q = bundle.manifest.quantization
    assert q["graph_rewrites"] == {"gelu_fused": 2, "opset": "upgraded to 20 for the Gelu op", "reduce_l2_expanded": 1}
    texts, got = _embed(r.bundle, encoder[0], sentences(30, seed=77))
    want = torch_sentence_embeddings(encoder[0], texts, max_length=64)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert len(texts) >= 20 and cos.mean() >= 0.99 and cos.min() >= 0.98, (cos.mean(), cos.min())


@pytest.mark.slow
def test_a_converter_that_aborts_is_one_failed_candidate(encoder, tmp_path, monkeypatch):
    """The int8 quantizer's child really dies of SIGABRT (the worker's test-only fault hook); the build
    tries the other candidates, ships one, and leaves nothing in the temp dir."""
    from packager.candidates import Search
    from packager.formats.tflite_worker import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "int8")
    # The calibrated rungs only (arm-cpu's ladder would convert dynamic, int8-mixed and fp16 too, a
    # minute that asserts nothing more). int8 converts, and dies; what ships is not under test, so
    # nothing is timed.
    profile = tmp_path / "calibrated.yaml"
    profile.write_text("name: calibrated\nformat: tflite\ndefault_precision: int8\nprecisions: [int8, int16x8, fp32]\n"
                       "static_shapes: true\nbatch: 1\nruntime: litert\nthreads: 2\n")
    res, left = _build(encoder, tmp_path, monkeypatch, targets=(str(profile),), search=Search.THOROUGH, cached=False,
                       speed_gate=False)
    assert res.ok, [r.error for r in res.results]
    assert left == []
    rows = {c["candidate"]: c for c in res.results[0].report["candidates"]}
    assert rows["int8"]["verdict"] == "error"
    assert rows["int8"]["why"] == "the TFLite converter crashed (SIGABRT) on the int8 model"
    assert "input_ids" in rows["int16x8"]["why"] and "integer" in rows["int16x8"]["why"]
    assert any(c["verdict"] == "chosen" for c in rows.values())


@pytest.mark.slow
def test_the_int8_bert_that_aborts_litert_without_delegates_is_caught_in_a_child(encoder, tmp_path, monkeypatch):
    """The issue's abort, for real: LiteRT aborts in allocate_tensors of a full int8 BERT under
    BUILTIN_WITHOUT_DEFAULT_DELEGATES (what the sensitivity analysis runs), while the same model runs
    with XNNPACK. The probe child dies of SIGABRT and the build process gets a ConversionError."""
    from edgebundle.archive import open_bundle
    from edgebundle.errors import ConversionError
    from packager.formats import tflite_worker
    from targets import Precision

    # random weights: int8 keeps the cosine but reorders near neighbours; only the int8 model matters here
    res, _ = _build(encoder, tmp_path, monkeypatch, precision=Precision.INT8, min_neighbours=0.0)
    assert res.ok, [r.error for r in res.results]

    model = tmp_path / "int8.tflite"
    model.write_bytes(open_bundle(res.results[0].bundle).read("model.tflite"))
    tflite_worker.run("probe", tmp_path / "device", samples=[], what="the int8 model", model=model, mode="device")
    with pytest.raises(ConversionError) as e:
        tflite_worker.run("probe", tmp_path / "analysis", samples=[], what="the int8 model", model=model, mode="analysis")
    assert str(e.value).splitlines()[0] == "the TFLite interpreter crashed (SIGABRT) on the int8 model"


@pytest.mark.slow
def test_auto_goes_on_when_the_sensitivity_analysis_would_abort(encoder, tmp_path, monkeypatch):
    """int8 misses a strict gate, so auto analyses it to keep nodes in float: LiteRT aborts on that
    model (see above) in the analysis child, the mixed rounds are dropped with the reason, and fp32 ships."""
    profile = tmp_path / "int8cpu.yaml"
    profile.write_text("name: int8cpu\nformat: tflite\ndefault_precision: int8\nprecisions: [int8, fp32]\n"
                       "static_shapes: true\nbatch: 1\nruntime: litert\nthreads: 2\n")
    res, left = _build(encoder, tmp_path, monkeypatch, targets=(str(profile),), min_similarity=0.99999,
                       speed_gate=False)
    assert res.ok, [r.error for r in res.results]
    assert left == []
    rows = res.results[0].report["candidates"]
    assert [(c["candidate"], c["verdict"]) for c in rows] == [("int8", "accuracy"), ("fp32", "chosen")], rows
    assert rows[0]["why"].endswith("; no sensitivity analysis: the TFLite interpreter crashed (SIGABRT) on the int8 "
                                   "model without delegates"), rows[0]["why"]


def test_matmul_graphs_try_dynamic_int8_first_on_tflite_cpu_targets(tmp_path):
    """A transformer-like ONNX graph (its weights in MatMul) starts arm-cpu's auto ladder at dynamic
    int8; explicit precisions and Coral keep their own steps."""
    import onnx
    from onnx import helper

    from packager.formats import backend_for
    from packager.profiles import load_profile
    from packager.sources import load_source

    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": np.eye(16)}, opset=17, shape=(16, 16))
    onnx.save(model, tmp_path / "dense.onnx")
    src = load_source(tmp_path / "dense.onnx", workdir=tmp_path)
    arm = load_profile("arm-cpu")
    labels = [s.label for s in backend_for(arm).plan(src, arm, Precision.AUTO)]
    assert labels == ["dynamic", "dynamic-mixed", "int8", "int8-mixed", "int16x8", "fp16", "fp32"]
    assert [s.label for s in backend_for(arm).plan(src, arm, Precision.INT8)] == ["int8"]
    coral = load_profile("coral")
    assert "dynamic" not in [s.label for s in backend_for(coral).plan(src, coral, Precision.AUTO)]


def test_calibrated_precisions_are_skipped_once_dynamic_int8_lost_the_gate():
    from packager.candidates import Candidate, Step
    from packager.results import Trial
    from packager.steps import _lost_before

    calibrated = (Precision.INT8, Precision.INT16X8)
    lost = [Trial(Step(Precision.DYNAMIC), Candidate(Precision.DYNAMIC), verdict="accuracy")]
    slower = [Trial(Step(Precision.DYNAMIC), Candidate(Precision.DYNAMIC), verdict="slower")]
    assert "already failed the accuracy gate" in _lost_before(Step(Precision.INT8), lost, calibrated)
    assert _lost_before(Step(Precision.INT16X8), lost, calibrated)
    assert _lost_before(Step(Precision.FP16), lost, calibrated) is None
    assert _lost_before(Step(Precision.INT8), slower, calibrated) is None  # int8 may still be faster
