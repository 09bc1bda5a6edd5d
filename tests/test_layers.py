"""The shape of the code, as import-linter's contracts in setup.cfg state it: the `edgepack`
command over three peers (packager, device agent, fleet side) that never import each other, over
the runtime layer and the target profiles, over the contracts; and no import circle in any package."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = Path(sys.executable).with_name("lint-imports")
    res = subprocess.run([str(exe), "--config", str(ROOT / "setup.cfg"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "BROKEN" not in res.stdout and res.stdout.count("KEPT") == 2, res.stdout[-2000:]
