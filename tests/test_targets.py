"""Target profiles: built-ins, user files, and errors that name the key and the allowed values."""
import pytest
import yaml

from edgebundle.errors import ProfileError
from targets import Format, Precision, builtin_names, load_profile


def test_builtins_load():
    from packager.profiles import load_profile as checked  # against what each format's backend can do

    names = builtin_names()
    assert [checked(n) for n in names] == [load_profile(n) for n in names]  # `targets list` reads them unchecked
    assert {"arm-cpu", "jetson-gpu", "coral"} <= set(names)
    coral = load_profile("coral")
    assert coral.format is Format.TFLITE and coral.precisions == (Precision.INT8,)
    assert coral.static_shapes and coral.batch == 1 and "edgetpu" in coral.delegates
    jetson = load_profile("jetson-gpu")
    assert jetson.providers[0] == "TensorrtExecutionProvider" and jetson.default_precision is Precision.FP16
    assert load_profile("arm-cpu").sha256 != coral.sha256


def _write(tmp_path, **doc):
    base = dict(name="mine", format="tflite", default_precision="int8", precisions=["int8"], runtime="litert")
    base.update(doc)
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}))
    return p


def test_user_profile(tmp_path):
    p = load_profile(str(_write(tmp_path, threads=2)))
    assert p.name == "mine" and p.threads == 2 and p.source.endswith("mine.yaml")


def test_unknown_key_named_with_allowed_keys(tmp_path):
    with pytest.raises(ProfileError) as e:
        load_profile(str(_write(tmp_path, theads=2)))
    assert "'theads'" in str(e.value) and "threads" in e.value.hint


def test_mode_the_format_cannot_do(tmp_path):
    from packager.profiles import load_profile as load_checked  # what a format can do is its backend's to say

    with pytest.raises(ProfileError) as e:
        load_checked(str(_write(tmp_path, format="onnx", runtime="onnxruntime", precisions=["int16x8"],
                                default_precision="int16x8")))
    assert "'precisions'" in str(e.value) and "fp16" in e.value.hint


def test_bad_enum_value(tmp_path):
    with pytest.raises(ProfileError, match="'format' has 'pb'"):
        load_profile(str(_write(tmp_path, format="pb")))


def test_unknown_target_suggests():
    with pytest.raises(ProfileError, match="did you mean 'coral'"):
        load_profile("corall")


def test_malformed_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(str(p))
