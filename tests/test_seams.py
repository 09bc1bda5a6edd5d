"""What crosses the packager's seams is typed: a trial's Verdict, its Timing and Accuracy, the target's
report built once before the bundle is written; and they read and write the same JSON as before.
Format questions are asked of the backend or the profile (flex on an ONNX target, the Edge TPU,
accelerators), and a fallback the ONNX quantizer takes is said in the report."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from packager.figures import Accuracy, DeviceTiming, Timing
from packager.results import Trial, Verdict


def _keys(d):
    """Keys and values, in order, all the way down (what json.dumps writes)."""
    return json.dumps(d)


def test_verdicts_are_an_enum_with_the_reports_strings():
    assert [v.value for v in Verdict] == ["chosen", "passed", "accuracy", "slower", "no gain", "error", "skipped",
                                          "not tried"]
    from packager.candidates import Step
    from targets import Precision

    t = Trial(Step(Precision.INT8), verdict="accuracy")  # its JSON string reads as the verdict
    assert t.verdict is Verdict.ACCURACY and not t.passed
    assert Trial(Step(Precision.INT8), verdict=Verdict.CHOSEN).to_dict()["verdict"] == "chosen"
    with pytest.raises(ValueError):
        Trial(Step(Precision.INT8), verdict="maybe")


def test_the_timing_workers_replies_read_and_write_back_unchanged(tmp_path):
    """A real comparison and a real baseline from the timing worker, and fp32's own figure taken from
    the comparison, go through Timing and come out as the same JSON, key for key, in order."""
    from edgeruntime.timing import ModelSpec, Worker
    from tinybundles import log_bundle

    log_bundle(tmp_path)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=np.full((1, 4), 2.0, np.float32))
    spec = vars(ModelSpec(path=str(tmp_path / "model.onnx"), format="onnx", threads=1))
    worker = Worker()
    compared = dict(worker.handle({"a": spec, "b": spec, "feeds": str(feeds), "budget_s": 0.05, "max_rounds": 8,
                                   "question": "slower"}), profile_threads=0)
    own = dict(worker.handle({"a": spec, "b": None, "feeds": str(feeds), "budget_s": 0.05}), profile_threads=0)
    for reply in (compared, own, {"not_timed": "--no-speed-gate: not timed on this host"}):
        assert _keys(Timing.from_dict(reply).to_dict()) == _keys(reply)
    t = Timing.from_dict(compared)
    assert t.median == compared["ratio"]["median"] and t.ratio.verdict.value == compared["ratio"]["verdict"]
    side = t.own(label="int8").for_profile(0).to_dict()
    assert list(side) == ["a_ms", "b_ms", "baseline", "threads", "host_cores", "runtime", "rss_bytes", "from",
                          "profile_threads"]
    assert side["from"] == f"fp32's side of {compared['rounds']} interleaved rounds against int8"
    assert side["b_ms"] == compared["a_ms"] and side["threads"] == compared["threads"][:1]


def test_device_timing_and_accuracy_read_and_write_back_unchanged():
    from packager.evaluate import compare

    dev = {"device": "pi-7", "a_ms": 2.0, "b_ms": 1.0,
           "ratio": {"median": 0.5, "q1_vs_q3": 0.45, "verdict": "faster", "of": "p50"},
           "fp32": {"latency_ms": {"p50": 2.0}}, "candidate": {"latency_ms": {"p50": 1.0}}}
    assert _keys(DeviceTiming.from_dict(dev).to_dict()) == _keys(dev)
    rng = np.random.default_rng(0)
    ref = [{"p": np.eye(4)[i % 4] * 0.9 + 0.025, "v": rng.normal(size=3), "n": np.array([i])} for i in range(8)]
    got = [{k: v + 0.001 if k == "v" else v for k, v in r.items()} for r in ref]
    for labels in (None, np.arange(8) % 4):
        d = compare(ref, got, ["p", "v", "n"], labels)
        assert _keys(Accuracy.from_dict(d).to_dict()) == _keys(d)
    assert list(d["outputs"]["p"]) == ["kind", "nan_or_inf", "max_abs_error", "mean_abs_error", "top1_agreement",
                                       "cosine_similarity", "relative_error"]


def test_allow_flex_on_an_onnx_target_asks_the_backend(tmp_path):
    """--allow-flex on x86-cpu with a model its runtime cannot load: the runtime's error, as for any
    target (only TFLite has Flex ops to package unvalidated), not an AttributeError."""
    from edgebundle.errors import RuntimeUnavailableError
    from packager.build import BuildOptions
    from packager.profiles import load_profile
    from packager.registry import Artifact
    from packager.steps import CandidateSearch
    from targets import Format, Precision

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    opts = BuildOptions(model=bad, targets=("x86-cpu",), out_dir=tmp_path, allow_flex=True)
    search = CandidateSearch(SimpleNamespace(opts=opts), load_profile("x86-cpu"), tmp_path)
    art = Artifact(path=bad, format=Format.ONNX, precision=Precision.FP32)
    assert search.backend.needs_flex(art) is False
    with pytest.raises(RuntimeUnavailableError, match="could not load"):
        search._runtime(art)


def test_format_questions_are_asked_of_the_profile_and_the_runtime():
    from edgeruntime import runtime_for_format
    from packager.html_report import _sections
    from packager.profiles import load_profile

    coral, jetson, arm = (load_profile(n) for n in ("coral", "jetson-gpu", "arm-cpu"))
    assert coral.on_edgetpu and not arm.on_edgetpu and not jetson.on_edgetpu
    assert coral.accelerators == ("edgetpu",) and jetson.accelerators[0] == "TensorrtExecutionProvider"
    assert arm.is_cpu and not coral.is_cpu and not jetson.is_cpu
    assert runtime_for_format("tflite").plain_delegates(("xnnpack", "edgetpu")) == ("xnnpack",)
    assert runtime_for_format("onnx").plain_delegates(("x",)) == ("x",)
    # the Edge TPU backend's own section of the report page: its findings and its compile step
    t = {"lint": [{"level": "warning", "code": "edgetpu-fallback", "message": "op #3 cannot run"}], "edgetpu": None}
    assert "<h3>Edge TPU</h3>" in _sections(t) and "op #3 cannot run" in _sections(t)
    assert _sections({"lint": [], "edgetpu": None}) == ""


def _clf(d):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 1, (16, 10)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"]),
                               helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)], "clf",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, d / "clf.onnx")
    return d / "clf.onnx"


def _failing_pre_process(monkeypatch):
    from onnxruntime.quantization import shape_inference

    def fails(*_a, **_k):
        raise ValueError("the optimizer rejects a subgraph")

    monkeypatch.setattr(shape_inference, "quant_pre_process", fails)


def test_the_onnx_quantizers_fallback_is_recorded(tmp_path, monkeypatch):
    """ORT's pre-processing failing twice: the plain graph is quantized, and the details and the
    backend's finishing step say so (a warning in the report)."""
    from packager.cache import BuildCache
    from packager.formats.onnx import PRE_PROCESSING, OnnxBackend, _preprocessed, _unprocessed
    from packager.registry import Artifact
    from targets import Format, Precision

    _failing_pre_process(monkeypatch)
    fp32 = _clf(tmp_path)
    ctx = SimpleNamespace(cache=BuildCache(workdir=tmp_path / "cache", timer=None))
    assert _preprocessed(ctx, fp32) == fp32
    note = _unprocessed(ctx)[PRE_PROCESSING]
    assert "the optimizer rejects a subgraph" in note and "quantized as it is" in note
    art = Artifact(path=fp32, format=Format.ONNX, precision=Precision.DYNAMIC, quantization=_unprocessed(ctx))
    [warning] = OnnxBackend().finish(art, None, tmp_path, name="m", version="1").warnings
    assert "skipped onnxruntime's graph pre-processing" in warning and note in warning
    clean = SimpleNamespace(cache=BuildCache(workdir=tmp_path / "clean", timer=None))
    assert _unprocessed(clean) == {}
    assert not OnnxBackend().finish(Artifact(path=fp32, format=Format.ONNX, precision=Precision.DYNAMIC),
                                    None, tmp_path, name="m", version="1").warnings


@pytest.mark.slow
def test_a_build_names_the_fallback_and_writes_its_report_once(tmp_path, monkeypatch):
    """A real build whose pre-processing fails: the report names the fallback (quantization details and
    a warning); the bundle's manifest holds the same report the build returns, less the bundle's own
    size and signature, which only the written bundle has."""
    from edgebundle.archive import open_bundle
    from packager.build import BuildOptions, build
    from targets import Precision

    _failing_pre_process(monkeypatch)
    model = _clf(tmp_path)
    res = build(BuildOptions(model=model, targets=("x86-cpu",), out_dir=tmp_path / "out", precision=Precision.DYNAMIC,
                             speed_gate=False, cache=False))
    [r] = res.results
    assert r.ok, r.error
    assert "the optimizer rejects a subgraph" in r.report["quantization"]["graph_preprocessing"]
    assert any("skipped onnxruntime's graph pre-processing" in w for w in r.report["warnings"])
    assert [c["verdict"] for c in r.report["candidates"]] == ["chosen"]
    embedded = open_bundle(r.bundle).manifest.report
    built = json.loads(json.dumps(r.report))
    assert built.pop("signed") is False and built["size_bytes"].pop("bundle") == r.bundle.stat().st_size
    assert _keys(embedded) == _keys(built)
