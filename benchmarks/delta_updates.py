"""Delta updates (content-defined chunks) against today's full transfer, with a loopback mosquitto
and real agents.

For the digits CNN and MobileNetV2 with a 10-class head (arm-cpu fp32 and int8):
v1.0.0, then 1.1.0 with only the last layer retrained and 2.0.0 with every layer retrained (the
weights moved by noise, as training would move them; calibration data identical). Each update is
pushed to a fresh agent running 1.0.0, once as today (`push`, 1 MiB fixed chunks) and once as a
delta (`push --delta`, after 1.0.0 was pushed as a delta to another device, so its chunks are
retained as they would be in a fleet; the push adds chunk patches against 1.0.0 where they pay,
fleet/patches.py). Reported: bytes fetched / bundle (and what the same chunks would cost without
patches), push to active (seconds)
for both, and the agent's CPU seconds from push to the end of probation (medians of --repeat
runs, each on a fresh agent). Then, without a
broker: the assembly's own CPU time and peak Python heap, what storing model members (instead of
deflating them) costs in bundle size, bytes fetched per chunk size, and for the last-layer
update which model-file tensors changed (data or quantization parameters), which bundle members
the fetched bytes belong to, and the build-time cost of the canonical .tflite layout
(packager/formats/tflite_layout.py).

    python benchmarks/delta_updates.py [--cases digits-fp32,digits-int8,mobilenetv2-fp32,mobilenetv2-int8]
                                       [--repeat 3]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CACHE = Path(__file__).resolve().parent / ".cache" / "delta"
OVERHEAD = 360  # bytes per chunk besides its payload: record entry + SUBSCRIBE/SUBACK/PUBLISH/PUBACK/UNSUBSCRIBE


def _variant(src: Path, dest: Path, *, layers: str, seed: int) -> Path:
    import keras

    m = keras.models.load_model(src)
    rng = np.random.default_rng(seed)
    for layer in m.layers[-1:] if layers == "last" else m.layers:
        layer.set_weights([w + rng.normal(0, 0.02, w.shape).astype(w.dtype) * (np.std(w) + 1e-3)
                           for w in layer.get_weights()])
    m.save(dest)
    return dest


def _source(kind: str) -> tuple[Path, dict]:
    """The base Keras model and its build options (calibration/validation)."""
    if kind == "digits":
        base = CACHE / "digits" / "digits.keras"
        if not base.exists():
            from packager.examples.digits import train

            train(CACHE / "digits", epochs=20)
        return base, {"calibration": str(CACHE / "digits" / "calibration.npz"),
                      "validation": str(CACHE / "digits" / "validation.npz")}
    import keras

    base = CACHE / "mobilenetv2-10.keras"
    if not base.exists():
        keras.utils.set_random_seed(0)
        image = keras.Input((224, 224, 3), name="image")
        keras.applications.MobileNetV2(weights=None, input_tensor=image, classes=10).save(base)
    return base, {"calibration": "random", "calibration_samples": 50, "accuracy_gate": False}


def bundles(case: str) -> dict[str, Path]:
    """1.0.0, 1.1.0 (last layer retrained), 2.0.0 (all retrained) of a case, built once."""
    from packager.build import BuildOptions, build
    from targets import Precision

    kind, precision = case.split("-")
    base, opts = _source(kind)
    sources = {"1.0.0": base, "1.1.0": CACHE / f"{kind}-head.keras", "2.0.0": CACHE / f"{kind}-all.keras"}
    if not sources["1.1.0"].exists():
        _variant(base, sources["1.1.0"], layers="last", seed=1)
        _variant(base, sources["2.0.0"], layers="all", seed=2)
    out = {}
    for version, model in sources.items():
        d = CACHE / case / version
        found = sorted(d.glob("*.edgepack"))
        if not found:
            res = build(BuildOptions(model=model, targets=("arm-cpu",), out_dir=d, name=kind, version=version,
                                     precision=Precision(precision), bench_runs=5, bench_seconds=0.2, **opts))
            assert res.ok, res.results[0].error
            found = [res.results[0].bundle]
        out[version] = found[0]
    return out


def _ts(ev: dict) -> float:
    return datetime.fromisoformat(ev["ts"]).timestamp()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def update(tmp: Path, port: int, start: Path, bundle: Path, *, delta: bool, device: str) -> dict:
    """A fresh agent on `start`, then `bundle` pushed to it: fetched bytes, push->active, agent CPU."""
    import fleet
    from _procs import agent, stop
    from edgeproto.broker import BrokerConfig
    from edgeproto.desired import Probation

    a, _ = agent(tmp, start, port, device=device)
    try:
        events: list[dict] = []
        cpu0, t0 = _cpu_s(a.pid), time.time()
        res = fleet.push(bundle, BrokerConfig(url=f"mqtt://127.0.0.1:{port}"), fleet.PushOptions(
            device=device, transfer=fleet.TransferSpec(delta=delta),
            terms=fleet.Terms(probation=Probation(seconds=1, requests=10)),
            follow=fleet.Follow(timeout=300, progress=lambda d, e: events.append(e))))
        assert res.ok, res.devices
        first = {}
        for e in events:
            if "ts" in e:  # not a final state read from retained status
                first.setdefault(e["state"], _ts(e))
        cpu = _cpu_s(a.pid) - cpu0
        last = [e["progress"] for e in events if e.get("progress")][-1]
        fetched = last.get("fetched", last["bytes"])
        patch_bytes = sum(p["size"] for p in res.desired.get("transfer", {}).get("patches", ()))
        return {"fetched": fetched, "size": bundle.stat().st_size,
                "chunks_only": fetched - patch_bytes + last.get("patched", 0),
                "active_s": first["probation"] - t0, "cpu_s": cpu,
                "published": res.cost.publish_bytes if res.cost else bundle.stat().st_size}
    finally:
        stop(a)


def seed(port: int, bundle: Path) -> None:
    """v1 pushed as a delta to a device that never comes: its chunks retained, named in the index."""
    import fleet
    from edgeproto.broker import BrokerConfig

    fleet.push(bundle, BrokerConfig(url=f"mqtt://127.0.0.1:{port}"),
               fleet.PushOptions(device="seed", transfer=fleet.TransferSpec(delta=True), check_interface=False))


def assembly(old: Path, new: Path) -> tuple[float, int]:
    """fetch_delta of `new` on a store holding `old`, the missing chunks and their patches (as
    fleet.patches makes them) served from memory: CPU seconds (index + copy + decode + hash, index
    not cached yet) and the peak Python heap."""
    from device_agent.ota.delta import fetch_delta
    from device_agent.store import Store
    from edgebundle import patch
    from edgebundle.cdc import CdcParams, chunk_file
    from edgeproto.bundleref import Patch
    from edgeproto.desired import CdcTransfer, Desired
    from fleet.patches import MIN_SAVING, MIN_SHARE

    params = CdcParams.for_size(new.stat().st_size)
    chunks, old_chunks = chunk_file(new, params), chunk_file(old, params)
    data, old_data = new.read_bytes(), old.read_bytes()
    held = {c.sha256: old_data[c.offset:c.offset + c.size] for c in old_chunks}
    served = {c.sha256: data[c.offset:c.offset + c.size] for c in chunks}
    patches = []
    plans = patch.plan([(c.sha256, c.size) for c in chunks], [(c.sha256, c.size) for c in old_chunks])
    for sha, (bases, anchor) in plans.items():
        enc = patch.encode(served[sha], b"".join(held[b] for b in bases), anchor=anchor)
        if len(enc) + MIN_SAVING <= (1 - MIN_SHARE) * len(served[sha]):
            served[hashlib.sha256(enc).hexdigest()] = enc
            patches.append(Patch(chunk=sha, bases=bases, sha256=hashlib.sha256(enc).hexdigest(), size=len(enc)))
    t = CdcTransfer(topic="r/chunks", params=params, chunk_sha256=tuple(c.sha256 for c in chunks),
                    chunk_sizes=tuple(c.size for c in chunks), patches=tuple(patches))
    del data, old_data, held

    class Local:
        window = 16

        def pull(self, job, *, cancelled, count=0):
            for k in job.keys:
                job.store(k, served[job.sha256(k)])

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "data")
        (store.bundles / f"x-{old.name}").write_bytes(old.read_bytes())
        work = Path(tmp) / "work"
        work.mkdir()
        d = Desired(update_id="u", name="m", version="1.0.0", sha256=hashlib.sha256(new.read_bytes()).hexdigest(),
                    size=new.stat().st_size, transfer=t)
        tracemalloc.start()
        c0 = time.process_time()
        fetch_delta(Local(), d, work, local=store, progress=lambda *a: None, cancelled=lambda: False)
        cpu = time.process_time() - c0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return cpu, peak


def deflated_size(bundle: Path) -> int:
    """The same bundle with every member deflated (as bundles were written before delta updates)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return len(buf.getvalue())


def by_chunk_size(old: Path, new: Path) -> list[tuple[int, float, float, float]]:
    """(avg chunk size, % of the bundle fetched, % incl. ~360 bytes per chunk of overhead, % with
    patches (fleet.patches' rule) incl. overhead)."""
    from edgebundle import patch
    from edgebundle.cdc import CdcParams, chunk_file
    from fleet.patches import MIN_SAVING, MIN_SHARE

    rows = []
    ob, nb = old.read_bytes(), new.read_bytes()
    for avg in (256, 512, 2048, 8192, 16384, 65536):
        p = CdcParams(avg // 4, avg, avg * 8)
        oc, nc = chunk_file(old, p), chunk_file(new, p)
        have = {c.sha256: ob[c.offset:c.offset + c.size] for c in oc}
        missing = {c.sha256: c for c in nc if c.sha256 not in have}
        plans = patch.plan([(c.sha256, c.size) for c in nc], [(c.sha256, c.size) for c in oc])
        patched = 0
        for sha, c in missing.items():
            bases, anchor = plans[sha]
            enc = patch.encode(nb[c.offset:c.offset + c.size], b"".join(have[b] for b in bases), anchor=anchor)
            patched += len(enc) if len(enc) + MIN_SAVING <= (1 - MIN_SHARE) * c.size else c.size
        size, raw = len(nb), sum(c.size for c in missing.values())
        rows.append((avg, 100 * raw / size, 100 * (raw + OVERHEAD * len(missing)) / size,
                     100 * (patched + OVERHEAD * len(missing)) / size))
    return rows


def tensor_diff(old: Path, new: Path) -> dict:
    """How the two bundles' .tflite files differ: buffers (tensor data) whose bytes are new, shared
    ones that moved to another index (the converter's order), and tensors, matched by name, whose
    quantization parameters (scale, zero point) changed."""
    from tensorflow.lite.python import schema_py_generated as schema

    def model(bundle: Path):
        with zipfile.ZipFile(bundle) as z:
            raw = z.read(next(n for n in z.namelist() if n.endswith(".tflite")))
        return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(raw, 0))

    def quant(m) -> dict[str, tuple]:
        q = {t.name.decode(): t.quantization for t in m.subgraphs[0].tensors}
        return {n: (tuple(x.scale), tuple(x.zeroPoint)) for n, x in q.items() if x is not None and x.scale is not None}

    a, b = model(old), model(new)
    bufs_a = [bytes(x.data) for x in a.buffers if x.data is not None]
    bufs_b = [bytes(x.data) for x in b.buffers if x.data is not None]
    at = {x: i for i, x in enumerate(bufs_a)}
    fresh = [x for x in bufs_b if x not in at]
    qa, qb = quant(a), quant(b)
    return {"buffers": len(bufs_b), "new": len(fresh), "new_bytes": sum(map(len, fresh)),
            "moved": sum(1 for i, x in enumerate(bufs_b) if x in at and at[x] != i),
            "quant_changed": sorted(n for n in qa.keys() & qb.keys() if qa[n] != qb[n]),
            "renamed": len(qa.keys() ^ qb.keys())}


def by_member(old: Path, new: Path) -> dict[str, int]:
    """The default chunking's missing bytes of `new` (vs `old`), by the zip member they cover
    (a member: its local header and data; then the central directory)."""
    from edgebundle.cdc import CdcParams, chunk_file

    p = CdcParams.for_size(new.stat().st_size)
    have = {c.sha256 for c in chunk_file(old, p)}
    with zipfile.ZipFile(new) as z:
        starts = sorted((i.header_offset, i.filename) for i in z.infolist()) + [(z.start_dir, "zip directory")]
    out: dict[str, int] = {}
    for c in chunk_file(new, p):
        if c.sha256 in have:
            continue
        end = c.offset + c.size
        cuts = [c.offset] + [o for o, _ in starts if c.offset < o < end] + [end]
        for a, b in zip(cuts, cuts[1:]):
            name = [n for o, n in starts if o <= a][-1]
            out[name] = out.get(name, 0) + b - a
    return out


def model_bytes(old: Path, new: Path) -> tuple[int, int, int] | None:
    """(bytes that differ, in how many runs 64 bytes apart, model size) between the two bundles' model
    files, when they have the same length (a retrained layer of the same shape); else None."""
    def raw(bundle: Path) -> bytes:
        with zipfile.ZipFile(bundle) as z:
            return z.read(next(n for n in z.namelist() if n.endswith(".tflite")))

    a, b = raw(old), raw(new)
    if len(a) != len(b):
        return None
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    return len(diff), int(1 + np.count_nonzero(np.diff(diff) > 64)) if len(diff) else 0, len(b)


def layout_cpu(bundle: Path) -> float:
    """CPU seconds (median of 3) of writing the bundle's model in the canonical layout, as the build does."""
    from packager.formats.tflite_layout import canonical

    with zipfile.ZipFile(bundle) as z:
        raw = z.read(next(n for n in z.namelist() if n.endswith(".tflite")))
    times = []
    for _ in range(3):
        t = time.process_time()
        canonical(raw)
        times.append(time.process_time() - t)
    return statistics.median(times)


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="digits-fp32,digits-int8,mobilenetv2-fp32,mobilenetv2-int8")
    ap.add_argument("--repeat", type=int, default=3, help="runs per update (medians reported)")
    args = ap.parse_args()
    from _procs import mosquitto, stop

    import paho.mqtt.client  # noqa: F401  once per process, outside the timed pushes

    cases = {c: bundles(c) for c in args.cases.split(",")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broker, port = mosquitto(tmp)
        try:
            for n, (case, b) in enumerate(cases.items()):
                seed(port, b["1.0.0"])
                for label, version in (("last layer", "1.1.0"), ("all layers", "2.0.0")):
                    full, dlt = [], []
                    for r in range(args.repeat):  # alternated, so a busy spell hits both alike
                        full.append(update(tmp, port, b["1.0.0"], b[version], delta=False, device=f"f{n}{version}{r}"))
                        dlt.append(update(tmp, port, b["1.0.0"], b[version], delta=True, device=f"d{n}{version}{r}"))
                    rows.append((case, label, _median(full), _median(dlt)))
        finally:
            stop(broker)
    print(f"{'case':<18}{'retrained':<12}{'MB':>6}{'fetched':>9}{'no patch':>9}{'published':>10}{'full s':>8}"
          f"{'delta s':>8}{'ratio':>7}{'cpu full':>9}{'cpu delta':>10}")
    for case, label, full, dlt in rows:
        print(f"{case:<18}{label:<12}{dlt['size'] / 1e6:>6.2f}{100 * dlt['fetched'] / dlt['size']:>8.1f}%"
              f"{100 * dlt['chunks_only'] / dlt['size']:>8.1f}%"
              f"{100 * dlt['published'] / dlt['size']:>9.1f}%{full['active_s']:>8.3f}{dlt['active_s']:>8.3f}"
              f"{dlt['active_s'] / full['active_s']:>7.2f}{full['cpu_s']:>9.3f}{dlt['cpu_s']:>10.3f}")
    print("fetched = bytes the device pulled over MQTT (chunks and patches) / bundle; no patch = what the same "
          "chunks would have cost without patches; published = chunks the push had to publish "
          "(the rest retained); full = today's push (1 MiB chunks); s = push start until the new model serves; "
          "cpu = agent CPU seconds from push to the end of probation")
    print(f"\n{'case':<18}{'retrained':<12}{'assembly cpu s':>15}{'peak heap MB':>13}")
    for case, b in cases.items():
        for label, version in (("last layer", "1.1.0"), ("all layers", "2.0.0")):
            cpu, peak = assembly(b["1.0.0"], b[version])
            print(f"{case:<18}{label:<12}{cpu:>15.3f}{peak / 1e6:>13.2f}")
    print(f"\n{'case':<18}{'stored MB':>10}{'deflated MB':>12}{'cost':>7}")
    for case, b in cases.items():
        s, d = b["1.0.0"].stat().st_size, deflated_size(b["1.0.0"])
        print(f"{case:<18}{s / 1e6:>10.2f}{d / 1e6:>12.2f}{100 * (s - d) / d:>6.1f}%")
    print("\nthe model file after the last-layer retrain: buffers with new bytes, shared buffers moved to another "
          "index, tensors (by name) whose quantization parameters changed")
    for case, b in cases.items():
        d = tensor_diff(b["1.0.0"], b["1.1.0"])
        print(f"{case:<18} new {d['new']} of {d['buffers']} buffers ({d['new_bytes']} bytes), moved {d['moved']}, "
              f"quantization changed {len(d['quant_changed'])} {', '.join(d['quant_changed'][:4])}, "
              f"names not in both {d['renamed']}")
    print("\nlast layer retrained, default chunks: what is fetched, by bundle member (bytes); the model files' "
          "differing bytes (same length only); CPU of the canonical layout at build time")
    for case, b in cases.items():
        diff = model_bytes(b["1.0.0"], b["1.1.0"])
        print(f"{case:<18}", ", ".join(f"{k} {v}" for k, v in sorted(by_member(b["1.0.0"], b["1.1.0"]).items())),
              f"| model: {diff[0]} of {diff[2]} bytes differ in {diff[1]} runs" if diff else "| model: other length",
              f"| layout {1000 * layout_cpu(b['1.0.0']):.0f} ms")
    print(f"\n{'case':<18}{'avg chunk':>10}{'fetched':>9}{'+overhead':>10}{'patched+overhead':>17}"
          "   (last layer retrained)")
    for case, b in cases.items():
        for avg, pct, with_overhead, patched in by_chunk_size(b["1.0.0"], b["1.1.0"]):
            print(f"{case:<18}{avg:>10}{pct:>8.1f}%{with_overhead:>9.1f}%{patched:>16.1f}%")


if __name__ == "__main__":
    main()
