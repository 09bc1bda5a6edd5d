"""Decode speed of candidates, measured in a clean child process that loads only onnxruntime-genai (a
process that ran torch or TensorFlow, or more threads than cores, times noise), candidates interleaved
round by round so a busy moment of the host hits them all. Usage (child):
python -m packager.llm.timing SPEC.json  ->  JSON on stdout."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from edgebundle.errors import ConversionError

PROMPT = ("Small language models run on boards with a few gigabytes of memory and four slow cores. "
          "Each token of a reply needs every weight of the model once, so the speed of memory decides. ")


@dataclass(frozen=True)
class Speed:
    ttft_ms: float  # time to first token (prefill of the prompt + one step), median of the rounds
    decode_tok_s: float  # generated tokens per second after the first, median
    decode_low: float  # slowest and fastest round: the spread the choice is judged against
    decode_high: float
    rounds: int
    threads: int
    prompt_tokens: int
    new_tokens: int

    def to_dict(self) -> dict:
        return {"ttft_ms": round(self.ttft_ms, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "decode_range": [round(self.decode_low, 2), round(self.decode_high, 2)], "rounds": self.rounds,
                "threads": self.threads, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens}


def measure(folders: dict[str, Path], *, threads: int, prompt_tokens: int = 128, new_tokens: int = 64,
            rounds: int = 3, timeout_s: float = 1800, cuda: bool = False) -> dict[str, Speed]:
    spec = {"folders": {k: str(v) for k, v in folders.items()}, "threads": threads, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "rounds": rounds, "cuda": cuda}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run([sys.executable, "-m", "packager.llm.timing", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ConversionError(f"timing the candidates took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:] or ["no message"]
        raise ConversionError(f"timing the candidates failed: {tail[0][:300]}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for label, r in raw.items():
        dec = r["decode_tok_s"]
        out[label] = Speed(statistics.median(r["ttft_s"]) * 1e3, statistics.median(dec), min(dec), max(dec),
                           rounds, threads, r["prompt_tokens"], new_tokens)
    return out


def _child(spec: dict) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    models, windows = {}, {}
    for label, folder in spec["folders"].items():
        cfg = og.Config(folder)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": spec["threads"], "inter_op_num_threads": 1}}}}))
        cfg.clear_providers()
        if spec.get("cuda"):
            cfg.append_provider("cuda")
        m = og.Model(cfg)
        tok = og.Tokenizer(m)
        ids = list(tok.encode(PROMPT * 40))[: spec["prompt_tokens"]]
        models[label] = (m, np.asarray(ids, np.int32))
        with open(os.path.join(folder, "genai_config.json")) as f:
            dec = json.load(f)["model"]["decoder"]
        windows[id(m)] = int((dec.get("sliding_window") or {}).get("window_size", 0))
    n = spec["new_tokens"]
    res = {k: {"ttft_s": [], "decode_tok_s": [], "prompt_tokens": int(v[1].size)} for k, v in models.items()}

    def once(m, ids) -> tuple[float, float]:
        p = og.GeneratorParams(m)
        total = int(ids.size) + n  # a sliding-window model needs a KV cache of at least its window
        p.set_search_options(max_length=max(total, windows[id(m)]), min_length=total, do_sample=False)
        g = og.Generator(m, p)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        g.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            g.generate_next_token()
        t2 = time.perf_counter()
        return t1 - t0, (n - 1) / (t2 - t1)

    labels = list(models)
    for k in labels:  # warm-up: first-run allocations and weight prepacking are not speed
        once(*models[k])
    for r in range(spec["rounds"]):
        for k in labels[r % len(labels):] + labels[: r % len(labels)]:
            ttft, tps = once(*models[k])
            res[k]["ttft_s"].append(ttft)
            res[k]["decode_tok_s"].append(tps)
    return res


def load_bytes(folder: Path, *, threads: int, timeout_s: float = 600) -> int:
    """RSS growth of a fresh process (onnxruntime-genai imported) loading the model and generating a few
    tokens: what the device's agent grows by for it, before its KV cache; 0 where it cannot be read."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    spec = {"memory": str(folder), "threads": threads}
    try:
        proc = subprocess.run([sys.executable, "-m", "packager.llm.timing", json.dumps(spec)], capture_output=True,
                              text=True, env=env, timeout=timeout_s)
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["load_bytes"]) if proc.returncode == 0 else 0
    except (subprocess.TimeoutExpired, ValueError, IndexError, KeyError):
        return 0


def _memory_child(spec: dict) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    from edgeruntime.timing import rss_bytes

    before = rss_bytes() or 0
    cfg = og.Config(spec["memory"])
    cfg.clear_providers()
    m = og.Model(cfg)
    with open(os.path.join(spec["memory"], "genai_config.json")) as f:
        window = (json.load(f)["model"]["decoder"].get("sliding_window") or {}).get("window_size", 0)
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=max(24, int(window)), min_length=24, do_sample=False)
    g = og.Generator(m, p)
    g.append_tokens(np.asarray(list(og.Tokenizer(m).encode(PROMPT))[:16], np.int32))
    for _ in range(8):
        g.generate_next_token()
    return {"load_bytes": max(0, (rss_bytes() or 0) - before)}


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    print(json.dumps(_memory_child(_spec) if "memory" in _spec else _child(_spec)))
