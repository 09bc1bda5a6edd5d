"""Format backends: each owns its precisions, ladder, host runtime and lint; the Edge TPU is a
backend of its own over TFLite; profiles are checked against what the backends can do."""
from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from edgebundle.errors import ProfileError
from packager.candidates import Step
from packager.contents import runtime_section
from packager.formats import backend, backend_for
from packager.formats.edgetpu import EdgeTPUBackend
from packager.formats.onnx import OnnxBackend
from packager.formats.tflite import TFLiteBackend
from packager.profiles import load_profile
from packager.sources import InputSpec
from targets import Format, Precision


def _profile(tmp_path, **doc):
    base = dict(name="mine", format="tflite", default_precision="int8", precisions=["int8"], runtime="litert")
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(dict(base, **doc)))
    return path


def _labels(steps) -> list[str]:
    return [s.label for s in steps]


def test_each_profile_finds_its_backend():
    assert type(backend_for(load_profile("coral"))) is EdgeTPUBackend
    assert type(backend_for(load_profile("arm-cpu"))) is TFLiteBackend
    assert type(backend_for(load_profile("x86-cpu"))) is OnnxBackend
    assert backend(Format.TFLITE).precisions[-1] is Precision.INT16X8
    assert Precision.INT16X8 not in backend(Format.ONNX).precisions


def test_a_precision_the_format_cannot_do_is_refused_in_the_profile(tmp_path):
    bad = _profile(tmp_path, format="onnx", default_precision="int16x8", precisions=["int16x8", "fp32"],
                   runtime="tflite")  # two mistakes: the precision is reported first, as ever
    with pytest.raises(ProfileError) as e:
        load_profile(str(bad))
    assert str(e.value) == (f"profile {bad}: 'precisions' has 'int16x8', which format 'onnx' cannot do\n"
                            "  hint: allowed values for onnx: fp32, fp16, dynamic, dynamic-block, int8")
    from edgepack.cli import main

    res = CliRunner().invoke(main, ["targets", "show", str(bad)])
    assert res.exit_code == 2 and "which format 'onnx' cannot do" in res.output


def test_adding_a_precision_is_one_backend_edit(tmp_path, monkeypatch):
    """What `dynamic` on the TFLite ladder and int16x8 for ONNX would take: the backend's own tables."""
    p = load_profile(str(_profile(tmp_path, precisions=["int8", "dynamic", "fp32"])))
    assert _labels(backend_for(p).ladder(p, Precision.AUTO)) == ["int8", "int8-mixed", "fp32"]
    monkeypatch.setattr(TFLiteBackend, "ladder_steps", TFLiteBackend.ladder_steps[:3] + (Step(Precision.DYNAMIC),)
                        + TFLiteBackend.ladder_steps[3:])
    assert _labels(backend_for(p).ladder(p, Precision.AUTO)) == ["int8", "int8-mixed", "dynamic", "fp32"]
    onnx16 = _profile(tmp_path, format="onnx", runtime="onnxruntime", precisions=["int16x8"],
                      default_precision="int16x8")
    with pytest.raises(ProfileError):
        load_profile(str(onnx16))
    monkeypatch.setattr(OnnxBackend, "precisions", OnnxBackend.precisions + (Precision.INT16X8,))
    assert load_profile(str(onnx16)).precisions == (Precision.INT16X8,)


def test_the_edge_tpu_backend_owns_the_edge_tpu():
    coral, arm = load_profile("coral"), load_profile("arm-cpu")
    tpu, tfl = backend_for(coral), backend_for(arm)
    # no mixed steps: a node kept in float leaves the TPU, and everything after it
    assert _labels(tpu.fallbacks(arm, Precision.INT8)) == ["int16x8", "fp16", "fp32"]
    assert _labels(tfl.fallbacks(arm, Precision.INT8)) == ["int8-mixed", "int16x8", "fp16", "fp32"]
    # the host cannot load the delegate, and so cannot time the model
    assert "edgetpu" in coral.delegates and tpu.host_spec("m.tflite", coral).delegates == ()
    assert tfl.host_spec("m.tflite", arm).delegates == arm.delegates
    assert tpu.not_timed(coral).startswith("coral runs this model on edgetpu; the host's CPU cannot say")
    # 8-bit I/O
    ids = InputSpec("ids", (1, 4), "int64", shape=(1, 4))
    src = type("Src", (), {"inputs": [ids], "text": None})()
    assert [f.code for f in tpu.lint_source(src, coral)] == ["edgetpu-io"] and tfl.lint_source(src, arm) == []
    # a text model (token ids) is refused outright: nothing of it could be mapped
    text = type("Src", (), {"inputs": [ids], "text": object()})()
    [f] = tpu.lint_source(text, coral)
    assert f.code == "edgetpu-text" and f.level.value == "error" and "token ids above 255" in f.message


def test_gate_hints_name_the_layers_only_on_the_edge_tpu():
    coral, arm = load_profile("coral"), load_profile("arm-cpu")
    worst = [f"CONV_2D conv{i} (adds 0.{i}0 error)" for i in range(7)]
    hint = backend_for(coral).gate_hint(coral, Precision.INT8, lossy=lambda: worst)
    assert hint.startswith("where int8 loses the accuracy: CONV_2D conv0 (adds 0.00 error); ")
    assert "conv4" in hint and "conv5" not in hint and hint.endswith("(--quantize auto does this for you)")

    def never() -> list[str]:
        raise AssertionError("the analysis runs only for the hint that uses it")

    assert backend_for(arm).gate_hint(arm, Precision.INT8, lossy=never).startswith("try more representative")


def test_int16x8_is_skipped_once_int8_was_slower():
    tfl, arm = backend(Format.TFLITE), load_profile("arm-cpu")
    assert "int16x8 kernels are slower" in tfl.skip(Step(Precision.INT16X8), frozenset({Precision.INT8}), arm)
    assert tfl.skip(Step(Precision.INT16X8), frozenset(), arm) is None


def test_auto_skips_onnx_fp16_on_a_cpu_but_not_on_a_gpu():
    onnx = backend(Format.ONNX)
    why = onnx.skip(Step(Precision.FP16), frozenset(), load_profile("x86-cpu"))
    assert "slower than fp32" in why and "--quantize fp16" in why
    assert onnx.skip(Step(Precision.FP16, mixed=True), frozenset(), load_profile("x86-cpu")) is None
    assert onnx.skip(Step(Precision.FP16), frozenset(), load_profile("jetson-gpu")) is None


def test_runtime_section_is_written_once_for_every_target():
    coral, x86 = load_profile("coral"), load_profile("x86-cpu")
    tpu = runtime_section(coral, flex=False, compiled=False)
    assert list(tpu) == ["name", "min_version", "threads", "delegates", "providers", "tensorrt_fp16",
                         "tensorrt_engine_cache", "cpu_fallback", "flex", "edgetpu_compiled"]
    assert tpu["delegates"] == ["edgetpu"] and tpu["edgetpu_compiled"] is False
    assert runtime_section(x86, flex=False, compiled=None)["edgetpu_compiled"] is None
