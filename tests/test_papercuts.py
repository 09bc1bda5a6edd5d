"""Issue 10's papercuts, each pinned: bundle file modes follow the umask, update retries back off
with full jitter, a missing --bundle stops the agent with exit 2, text logs keep their fields, an
int8 model larger than its fp32 source is flagged."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from agents import AgentProc
from tinybundles import log_bundle


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_bundles_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = log_bundle(tmp_path / "b")
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)
    assert not list(path.parent.glob(".*.part"))


def test_update_retries_back_off_with_full_jitter():
    import random

    from device_agent.ota.updater import backoff_delay

    # bounds: 0 .. base * 2^(attempt-1), capped
    assert backoff_delay(1, base_s=2, cap_s=300, rand=lambda: 1.0) == 2
    assert backoff_delay(4, base_s=2, cap_s=300, rand=lambda: 1.0) == 16
    assert backoff_delay(20, base_s=2, cap_s=300, rand=lambda: 1.0) == 300
    assert backoff_delay(3, base_s=2, cap_s=300, rand=lambda: 0.0) == 0
    # a fleet after an outage: 200 devices on their 5th attempt spread over the whole 0-32 s window
    rng = random.Random(7)
    delays = sorted(backoff_delay(5, base_s=2, cap_s=300, rand=rng.random) for _ in range(200))
    assert 0 <= delays[0] < 2 and 30 < delays[-1] <= 32
    assert len({round(d) for d in delays}) >= 25  # not lockstep: most whole seconds of the window are used


def test_missing_explicit_bundle_exits_2(tmp_path):
    missing = tmp_path / "nope.edgepack"
    r = subprocess.run([sys.executable, "-m", "device_agent.cli", "run", "--data-dir", str(tmp_path / "d"),
                        "--api-port", "0", "--bundle", str(missing)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"bundle '{missing}'" in r.stderr and "does not exist" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.agent
def test_text_logs_keep_the_structured_fields(tmp_path):
    a = AgentProc(tmp_path / "data", bundle=log_bundle(tmp_path / "b"), extra=("--log-format", "text")).start()
    a.stop()
    lines = a.log.read_text().splitlines()
    serving = [ln for ln in lines if "serving KServe v2 API" in ln]
    assert serving and serving[0].endswith(f"serving KServe v2 API host=127.0.0.1 port={a.port}"), lines
    ready = next(ln for ln in lines if "model ready" in ln)
    assert "name=logm" in ready and "version=1.0.0" in ready and "load_ms=" in ready
    assert not any(ln.lstrip().startswith("{") for ln in lines)  # text, not JSON


@pytest.mark.slow
def test_int8_larger_than_fp32_is_flagged(models, cnn_data, digits_build, tmp_path):
    """A tiny CNN: Q/DQ nodes and scales outweigh 8-bit weights. A real model (digits) is not flagged."""
    from packager.build import BuildOptions, build
    from targets import Precision

    res = build(BuildOptions(model=models["cnn"], targets=("x86-cpu",), out_dir=tmp_path, precision=Precision.INT8,
                             calibration=str(cnn_data), accuracy_gate=False, bench_seconds=0.2))
    r = res.results[0]
    assert r.ok, r.error
    sizes = r.report["size_bytes"]
    assert sizes["model"] > sizes["fp32_model"], sizes  # the case under test
    flagged = [w for w in r.report["warnings"] if "LARGER than fp32" in w]
    assert flagged and f"{sizes['model'] / sizes['fp32_model']:.2f}x" in flagged[0]
    digits = next(x for x in digits_build.results if x.target == "arm-cpu")
    assert digits.report["size_bytes"]["model"] < digits.report["size_bytes"]["fp32_model"]
    assert not any("LARGER" in w for w in digits.report["warnings"])


def test_the_candidate_table_wraps_a_long_why():
    """Issue 24, finding 8: a 163-character "why" made every candidate row wider than a terminal."""
    from packager.report import WHY_WIDTH, _table

    why = ("int8 missed the gate: drop 3.10 pt > 1.0 pt; kept 4 nodes in float (conv_1, conv_2, dense, "
           "softmax) and still 1.40 pt; no sensitivity analysis: the interpreter crashed")
    lines = _table([("candidate", "verdict", "why"), ("int8", "accuracy", why), ("fp32", "chosen", "")],
                   wrap_last=WHY_WIDTH)
    start = lines[0].index("why")
    assert all(len(line) - start <= WHY_WIDTH for line in lines[2:])
    assert " ".join(line[start:] for line in lines[2:]).split() == why.split()  # every word kept, in order
    assert lines[2].startswith("int8") and lines[3][:start].strip() == ""  # the rest under the why column


LOADS = r"""
import os, sys
from edgeruntime.litert import XNNPACK_INFO, without_xnnpack_info
with without_xnnpack_info():
    os.write(2, XNNPACK_INFO + b"\nERROR: a native error the user must see\n")
os.write(2, b"after\n")
if len(sys.argv) > 1:
    from edgeruntime.litert import LiteRTRuntime
    LiteRTRuntime.load(sys.argv[1])
    print("loaded")
"""


def test_litert_s_xnnpack_info_line_is_not_printed_and_other_native_lines_are(tmp_path):
    """Issue 24, finding 8: LiteRT prints 'INFO: Created TensorFlow Lite XNNPACK delegate for CPU.' on fd 2
    whatever TF_CPP_MIN_LOG_LEVEL says; the runtime adapter holds fd 2 while LiteRT sets up and passes
    everything else on."""
    r = subprocess.run([sys.executable, "-c", LOADS], capture_output=True, timeout=60)
    assert r.returncode == 0 and r.stderr == b"ERROR: a native error the user must see\nafter\n", r.stderr


@pytest.mark.slow
def test_loading_a_tflite_bundle_prints_no_litert_info(digits_bundle, tmp_path):
    from edgebundle.archive import open_bundle

    b = open_bundle(digits_bundle)
    model = b.extract(tmp_path, [b.manifest.model_file])[b.manifest.model_file]
    r = subprocess.run([sys.executable, "-c", LOADS, str(model)], capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == b"loaded", r
    assert b"XNNPACK" not in r.stderr and r.stderr.endswith(b"after\n"), r.stderr
