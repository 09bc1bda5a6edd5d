"""Fixture setup times for `make test-times` (benchmarks/test_times.py sums them).

pytest's --durations counts a session fixture's setup in the first test that asks for it; this
plugin says which fixture it was. Loaded by tests/conftest.py only while EDGEPACK_FIXTURE_TIMES
names a file: each process (each xdist worker too) appends one JSON line per fixture set up
(name, scope, seconds, the requesting test's module)."""
from __future__ import annotations

import json
import os
import time

import pytest

_rows: list[dict] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
    t0 = time.perf_counter()
    yield
    module = request.node.nodeid.split("::")[0] if request.node is not None else ""
    _rows.append({"fixture": fixturedef.argname, "scope": fixturedef.scope,
                  "seconds": round(time.perf_counter() - t0, 3), "module": module})


def pytest_sessionfinish(session):
    path = os.environ.get("EDGEPACK_FIXTURE_TIMES")
    if path and _rows:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in _rows)
