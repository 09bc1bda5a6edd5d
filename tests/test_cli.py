"""The `edgepack` CLI: bad input gets a clear message and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from edgepack.cli import main


def run(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    out = res.output + (res.stderr if hasattr(res, "stderr") else "")
    assert "Traceback" not in out, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, out


def test_help_and_targets():
    code, out = run("--help")
    assert code == 0 and "build" in out and "verify" in out
    code, out = run("targets", "list")
    assert code == 0 and "coral" in out and "jetson-gpu" in out
    code, out = run("targets", "show", "coral", "--json")
    assert code == 0 and json.loads(out[out.index("{"):])["delegates"] == ["edgetpu"]


def test_missing_model(tmp_path):
    code, out = run("build", tmp_path / "nope.keras", "-t", "arm-cpu")
    assert code == 2 and "does not exist" in out


def test_no_speed_gate_and_profile_on_contradict(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    code, out = run("build", p, "-t", "x86-cpu", "--no-speed-gate", "--profile-on", "dev1")
    assert code == 2 and "--no-speed-gate and --profile-on contradict" in out, out


def test_length_buckets_are_token_counts_or_none(tmp_path):
    from packager.cli import _buckets

    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    for bad in ("abc", "32,x", "0", ""):
        code, out = run("build", p, "-t", "arm-cpu", "--length-buckets", bad)
        assert code == 2 and "is not a list of token counts" in out, (bad, out)
    assert (_buckets("32,128"), _buckets("none"), _buckets(None)) == ((32, 128), (), None)


def test_unknown_format(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"x")
    code, out = run("build", p, "-t", "arm-cpu")
    assert code == 2 and "cannot tell the format" in out


def test_unknown_target(tmp_path):
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    code, out = run("build", p, "-t", "jetson-gpu2")
    assert code == 2 and "unknown target 'jetson-gpu2'" in out and "did you mean 'jetson-gpu'" in out


def test_malformed_profile(tmp_path):
    prof = tmp_path / "mine.yaml"
    prof.write_text("name: mine\nformat: tflite\ndefault_precision: int8\nprecisions: [int8]\nruntime: litert\n"
                    "thread: 4\n")
    p = tmp_path / "m.onnx"
    p.write_bytes(b"x")
    code, out = run("build", p, "-t", prof)
    assert code == 2 and "unknown key(s) 'thread'" in out and "threads" in out


@pytest.mark.slow
def test_corrupt_onnx(tmp_path):
    p = tmp_path / "broken.onnx"
    p.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    code, out = run("build", p, "-t", "x86-cpu", "--quantize", "fp32", "-o", tmp_path / "out")
    assert code == 2 and "not a valid ONNX model" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_int8_without_calibration(digits, tmp_path):
    code, out = run("build", digits["model"], "-t", "arm-cpu", "--quantize", "int8", "-o", tmp_path)
    assert code == 2 and "needs calibration data" in out and "--calibration" in out
    # auto goes on without int8 and says so
    code, out = run("build", digits["model"], "-t", "arm-cpu", "--validation", digits["validation"], "-o", tmp_path)
    assert code == 0 and "skipped" in out and "not tried: no calibration data" in out


@pytest.mark.slow
def test_calibration_shape_mismatch(digits, tmp_path):
    bad = tmp_path / "calib.npz"
    np.savez(bad, image=np.zeros((10, 28, 28, 1), np.float32))
    code, out = run("build", digits["model"], "-t", "arm-cpu", "--calibration", bad, "-o", tmp_path / "out")
    assert code == 2 and "have shape (28, 28, 1)" in out and "takes (?, 8, 8, 1)" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_flex_model_exit_code(flex_savedmodel, tmp_path):
    code, out = run("build", flex_savedmodel, "-t", "arm-cpu", "--quantize", "fp32", "-o", tmp_path)
    assert code == 3 and "Cumprod" in out and "FAILED" in out


@pytest.mark.slow
def test_build_json_inspect_verify_bench(digits, tmp_path):
    code, out = run("build", digits["model"], "-t", "arm-cpu", "-t", "x86-cpu", "--calibration",
                    digits["calibration"], "--validation", digits["validation"], "--name", "digits",
                    "--version", "2.1.0", "-o", tmp_path, "--json")
    assert code == 0, out
    report = json.loads(out[out.index("{"):])
    assert report["schema"] == "edgepack.build-report/2" and report["ok"]
    assert report["shared"]["gate"] == {"enabled": True, "max_drop_points": 1.0, "min_similarity": 0.99,
                                        "min_neighbours": 0.95, "max_relative_error": 0.1414}
    for t in report["targets"]:
        assert {"bundle", "format", "precision", "candidate", "choice", "candidates", "size_bytes", "latency_ms",
                "accuracy", "gate", "lint", "warnings"} <= set(t)
        assert t["latency_ms"]["a_ms"] > 0 and t["size_bytes"]["bundle"] > 0
        assert [c for c in t["candidates"] if c["verdict"] == "chosen"][0]["candidate"] == t["candidate"]
    bundle = tmp_path / "digits-2.1.0-arm-cpu.edgepack"
    code, out = run("inspect", bundle)
    assert code == 0 and "digits 2.1.0" in out and "scale=" not in out.split("inputs:")[1].split("\n")[1]
    code, out = run("inspect", bundle, "--json")
    assert code == 0 and json.loads(out)["target"]["name"] == "arm-cpu"
    code, out = run("verify", bundle)
    assert code == 0 and out.startswith("OK")
    code, out = run("bench", bundle, "--runs", "20", "--json")
    stats = json.loads(out)["latency"]
    assert code == 0 and stats["runs"] >= 5 and stats["p99_ms"] >= stats["p50_ms"] > 0
    # tamper: flip bytes inside the model member
    bad = tmp_path / "tampered.edgepack"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(bad, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi.filename)
            if zi.filename == "model.tflite":
                data = data[:100] + bytes(b ^ 0xFF for b in data[100:110]) + data[110:]
            zout.writestr(zi, data)
    code, out = run("verify", bad)
    assert code == 5 and "model.tflite: sha256" in out


def test_verify_missing_and_garbage(tmp_path):
    code, out = run("verify", tmp_path / "none.edgepack")
    assert code == 5 and "does not exist" in out
    p = tmp_path / "g.edgepack"
    p.write_bytes(b"garbage")
    code, out = run("verify", p)
    assert code == 5 and "not an edgepack bundle" in out


@pytest.mark.slow
def test_keys_sign_verify(digits_bundle, tmp_path):
    code, out = run("keys", "generate", "--out", tmp_path, "--name", "a")
    assert code == 0 and (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    run("keys", "generate", "--out", tmp_path, "--name", "b")
    code, out = run("keys", "generate", "--out", tmp_path, "--name", "a")
    assert code == 2 and "refusing to overwrite" in out
    b = tmp_path / "d.edgepack"
    b.write_bytes(digits_bundle.read_bytes())
    code, out = run("verify", b, "--pubkey", tmp_path / "a.pub")
    assert code == 5 and "not signed" in out
    code, out = run("sign", b, "--key", tmp_path / "a.key")
    assert code == 0 and "signed" in out
    code, out = run("verify", b, "--pubkey", tmp_path / "a.pub")
    assert code == 0 and "signed by key" in out
    code, out = run("verify", b, "--pubkey", tmp_path / "b.pub")
    assert code == 5 and "does not verify with any trusted key" in out
    # the signature covers the manifest, the manifest every file: changing a file breaks it
    bad = tmp_path / "bad.edgepack"
    with zipfile.ZipFile(b) as zin, zipfile.ZipFile(bad, "w") as zout:
        for zi in zin.infolist():
            data = zin.read(zi.filename)
            zout.writestr(zi, data + b"x" if zi.filename == "golden.npz" else data)
    code, out = run("verify", bad, "--pubkey", tmp_path / "a.pub")
    assert code == 5


AGENT_ONLY = '''import sys
BLOCK = {"tensorflow", "tf2onnx", "onnx", "onnx_ir", "torch", "transformers", "keras", "tf_keras", "onnx2tf", "yaml",
         "amqtt", "sympy"}  # what the packager extra brings and the agent extra does not (setup.cfg)


class AgentOnly:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


sys.meta_path.insert(0, AgentOnly())
'''


@pytest.mark.slow  # processes
def test_packager_commands_on_an_agent_only_install_exit_6(tmp_path):
    """Issue 24, finding 2: a device with `pip install edgepack[agent]` has the `edgepack` command too;
    a packager command there says what is missing in one line and exits 6 (runtime missing). The
    install is simulated: a sitecustomize that makes the packager extra's modules unimportable."""
    import os
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(AGENT_ONLY)
    (tmp_path / "m.onnx").write_bytes(b"an ONNX model")  # there: the build gets as far as its imports
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    for args in (["targets", "list"], ["build", str(tmp_path / "m.onnx"), "-t", "arm-cpu"]):
        r = subprocess.run([sys.executable, "-m", "edgepack.cli", *args], capture_output=True, text=True, env=env,
                           timeout=60)
        assert r.returncode == 6, (args, r.returncode, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and r.stderr.startswith(f"error: `edgepack {args[0]}` needs "), r.stderr
        assert "pip install 'edgepack[packager]'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "--help"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0 and "build" in r.stdout, r.stderr
    # the packager without the demo extra: `edgepack demo` says what to install (it was a traceback)
    (tmp_path / "sitecustomize.py").write_text(AGENT_ONLY.replace('BLOCK = {', 'BLOCK = {"sklearn"} or {'))
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", "demo", "--workdir", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 6 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "scikit-learn is not installed" in r.stderr and "pip install 'edgepack[demo]'" in r.stderr
