"""Shared Hypothesis settings and counters for the fuzzers (tests/test_fuzz_*.py).

Normal run: EXAMPLES (default 100: the fast tier's budget) examples per fuzzer. Long run:
    EDGEPACK_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -m fuzz -p no:cacheprovider
or `python benchmarks/fuzz_figures.py`, which also prints the figures (examples tried, crashes).
EDGEPACK_FUZZ_REPORT=FILE appends one JSON line per fuzzer: {"fuzzer", "examples", "crashes"}."""
from __future__ import annotations

import json
import os
from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EDGEPACK_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
TRIED: Counter = Counter()

# any JSON value, nested a few levels
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


def report(name: str) -> None:
    """Called once a fuzzer finished without a failure (a crash fails the test before this)."""
    path = os.environ.get("EDGEPACK_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fuzzer": name, "examples": TRIED[name], "crashes": 0}) + "\n")


def mutate(doc: dict, data) -> dict:
    """One to three changes to a JSON object: a field replaced by any JSON value, removed, or a
    nested field changed."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        keys = sorted(doc)
        if not keys:
            break
        k = data.draw(st.sampled_from(keys))
        action = data.draw(st.sampled_from(["replace", "delete", "nested"]))
        if action == "delete":
            doc.pop(k)
        elif action == "nested" and isinstance(doc[k], dict) and doc[k]:
            sub = data.draw(st.sampled_from(sorted(doc[k])))
            doc[k][sub] = data.draw(JSON)
        elif action == "nested" and isinstance(doc[k], list) and doc[k]:
            doc[k][data.draw(st.integers(0, len(doc[k]) - 1))] = data.draw(JSON)
        else:
            doc[k] = data.draw(JSON)
    return doc
