"""The README's main job: `edgepack demo` end to end, as a user runs it."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_edgepack_demo_runs_updates_and_cleans_up(tmp_path):
    """As the README's quick start runs it: the embedded broker (mosquitto is the agent tests' broker
    everywhere else), five bundles built and signed, an update committed under load with no failed
    request, and every process it started gone afterwards."""
    res = subprocess.run([sys.executable, "-m", "edgepack.cli", "demo", "--workdir", str(tmp_path / "w")],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "embedded MQTT broker on mqtt://127.0.0.1:" in out
    assert "update digits 1.0.0 -> 1.1.0: committed" in out
    assert ", 0 failed;" in out and "bundles built and signed: 5" in out
    assert "Traceback" not in res.stderr
    # every process it started is gone: no agent or broker still runs with this workdir
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "w") not in ps
