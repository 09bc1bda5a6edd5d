"""The README's main job: `edgepack demo` end to end, as a user runs it."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_edgepack_demo_runs_and_updates(tmp_path, broker):
    # against the test broker (mosquitto in CI); the embedded one is covered by test_demo_embedded_broker
    res = subprocess.run([sys.executable, "-m", "edgepack.cli", "demo", "--workdir", str(tmp_path / "w"),
                          "--broker", broker.url], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "update digits 1.0.0 -> 1.1.0: committed" in out
    assert ", 0 failed;" in out and "bundles built and signed: 5" in out
    assert "Traceback" not in res.stderr


def test_demo_embedded_broker_and_cleanup(tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgepack.cli", "demo", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "embedded MQTT broker on mqtt://127.0.0.1:" in res.stdout
    # every process it started is gone: no agent or broker still runs with this workdir
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "w") not in ps
