"""Test tiers: the fast tier (`-m "not slow"`) starts no broker and no agent process.

A test that starts one carries the `broker` or `agent` marker (a test that takes the `broker`
fixture gets it by itself), and both markers imply `slow` (tests/conftest.py). Broker.start and
AgentProc.start call `require` so an unmarked test fails at once instead of slowing the fast tier;
outside pytest (benchmarks) nothing is checked."""
from __future__ import annotations

_marks: frozenset[str] | None = None  # the running test's markers; None outside pytest


def enter(marks: frozenset[str] | None) -> None:
    global _marks
    _marks = marks


def require(marker: str, what: str) -> None:
    if _marks is not None and marker not in _marks:
        raise RuntimeError(f"this test starts {what}: mark it @pytest.mark.{marker} (which implies slow), "
                           "so the fast tier stays free of processes")
