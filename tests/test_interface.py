"""Interface safety end to end: a real agent, real bundles, clients sending requests throughout.

v1 takes input `x`; v2 is the same network exported with its input named `input_layer` (what
happens between a SavedModel and a .keras export). The update is refused in staging, with the
differences named; clients see no failure; `--allow-interface-change` applies it."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from otakit import QUICK, agent, infer, push, version

pytestmark = [pytest.mark.slow, pytest.mark.agent]


@pytest.fixture(scope="module")
def iface_bundles(keys, tmp_path_factory):
    import keras

    from packager.build import BuildOptions, build
    from targets import Precision

    d = tmp_path_factory.mktemp("iface")
    made = {}
    for version, name in (("1.0.0", "x"), ("1.1.0", "input_layer")):
        np.savez(d / f"val-{name}.npz", **{name: np.random.default_rng(0).random((20, 4), dtype=np.float32)})
        inp = keras.Input((4,), name=name)
        m = keras.Model(inp, keras.layers.Dense(3, kernel_initializer="ones")(inp))
        path = d / f"m{version}.keras"
        m.save(path)
        res = build(BuildOptions(model=path, targets=("arm-cpu",), out_dir=d / version, name="iface",
                                 version=version, precision=Precision.FP32, validation=str(d / f"val-{name}.npz"),
                                 bench_runs=5, bench_seconds=0.2, speed_gate=False, sign_key=keys / "a.key"))
        assert res.ok, res.results[0].error
        made[version] = res.results[0].bundle
    return made


def test_interface_change_refused_then_allowed(tmp_path, broker, keys, iface_bundles):
    a = agent(tmp_path, broker, iface_bundles["1.0.0"], keys)
    a.model_name = "iface"
    codes: list[int] = []
    stop = threading.Event()

    def client():  # a v1 client: input `x`, for as long as the first push runs (bounded by the push timeout)
        while not stop.is_set() and len(codes) < 100_000:
            codes.append(infer(a, np.ones((1, 4)), model="iface", name="x"))

    t = threading.Thread(target=client, daemon=True)
    t.start()
    try:
        warned: list[str] = []
        res = push(broker, iface_bundles["1.1.0"], device="dev1", wait=True, sign=keys / "a.key", warn=warned.append)
        ev = res.devices["dev1"]
        assert ev["state"] == "failed", ev
        assert "interface change refused" in ev["error"] and "input 'x' removed" in ev["error"]
        assert "input 'input_layer' added" in ev["error"]
        assert warned and "will refuse the update" in warned[0] and res.warnings == warned
    finally:
        stop.set()
        t.join(15)
    assert len(codes) > 20 and set(codes) == {200}, f"{len(codes)} requests, codes {sorted(set(codes))}"
    assert version(a) == "1.0.0"

    res = push(broker, iface_bundles["1.1.0"], device="dev1", wait=True, sign=keys / "a.key",
               allow_interface_change=True, probation=QUICK)
    assert res.devices["dev1"]["state"] == "committed", res.devices
    assert version(a) == "1.1.0" and infer(a, np.ones((1, 4)), model="iface", name="input_layer") == 200
    a.stop()
