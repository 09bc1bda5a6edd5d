"""packager/formats/served.py: a served child that holds more than KEEP_BYTES after a step says so, and
leaves; the next request gets a fresh child, and both steps count as done."""
from __future__ import annotations

import os

# A worker module of the served kind: each request names a file to write this child's pid to.
WORKER = """
import os, sys
from pathlib import Path
from packager.formats import served

def handle(request):
    Path(request.read_text().strip()).write_text(str(os.getpid()))

if __name__ == "__main__":
    sys.exit(served.loop(handle, lambda request: request.with_suffix(".log")))
"""


def _env(tmp_path, keep: int) -> dict:
    (tmp_path / "pidworker.py").write_text(WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), root]), EDGEPACK_SERVED_KEEP_BYTES=str(keep))


def _ask(tmp_path, env, i: int) -> int:
    from packager.formats import served

    req = tmp_path / f"r{i}.txt"
    req.write_text(str(tmp_path / f"pid{i}"))
    assert served.ask("pidworker", req, env, timeout_s=60) == 0
    return int((tmp_path / f"pid{i}").read_text())


def test_a_child_left_holding_too_much_is_replaced(tmp_path):
    from packager.formats import served

    env = _env(tmp_path, keep=1)  # every child holds more than a byte: each leaves after its step
    try:
        first, second = _ask(tmp_path, env, 0), _ask(tmp_path, env, 1)
        assert first != second
        assert "pidworker" not in served.servers  # let go as soon as it said it was leaving
    finally:
        served.servers.pop("pidworker", None)


def test_a_small_child_serves_the_next_step_too(tmp_path):
    from packager.formats import served

    env = _env(tmp_path, keep=1 << 40)
    try:
        assert _ask(tmp_path, env, 0) == _ask(tmp_path, env, 1)
    finally:
        server = served.servers.pop("pidworker", None)
        if server:
            server.close()
