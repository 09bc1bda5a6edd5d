"""Decode speed of generative bundles against the anchors, side by side in one run (issue 26).

    python benchmarks/llm_decode.py --bundle dist/gemma-1.0.0-x86-cpu.edgepack [--bundle ...] \
        [--gguf Q4_K_M=gemma.gguf --gguf Q4_0=gemma-q4_0.gguf] [--genai int4=folder] [--threads 2]

For each case: a 128-token prompt, 128 new tokens, greedy, median of 3 rounds, the cases interleaved
round by round. Cases:
- each bundle through the agent's streaming API (`edgepack-agent` started on a free port; POST
  /v1/completions with stream and include_usage; time to the first streamed token and decode tokens/s
  from the first to the last), and the same bundle's runtime in this process (edgeruntime.genai), so the
  HTTP stream's cost shows;
- llama.cpp (llama-cpp-python, in process) on each --gguf file, when llama_cpp imports;
- ONNX Runtime GenAI in process on each --genai folder (e.g. the model builder's int4).
With --gate-folder (the float model's Hugging Face folder, e.g. the GGUF read into one) every case is also
scored the way `edgepack build` gates a candidate: teacher-forced top-1 agreement and perplexity ratio
against transformers' fp32 model on the same token ids, so the fastest anchor *that passes the same gate*
can be named. The texts are held out from the build: --gate-texts FILE, or by default prose paragraphs
of Python's language reference (pydoc_data; a build without --validation scores on module docstrings).
--score-only BUNDLE scores a bundle without timing it (a Jetson's CUDA graph on a CPU host). Also prints the agent's RSS while serving each bundle. Every case is timed in this process or the agent,
never in a process that imported torch or TensorFlow."""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = ("The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined "
          "movable metal type, an oil-based ink and a wooden screw press. Within fifty years presses were at work "
          "in more than two hundred cities across Europe, and the price of a book fell to a fraction of what a "
          "hand-copied manuscript had cost. Scholars could compare identical copies of a text for the first time, "
          "and errors that had crept in over centuries of copying could be found and corrected. ")


from packager.llm.quality import Gate  # noqa: E402  (after sys.path)

GATE = Gate()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, bundle: Path, threads: int):
        self.dir = Path(tempfile.mkdtemp(prefix="llm-bench-"))
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "device_agent.cli", "run", "--bundle", str(bundle), "--data-dir", str(self.dir / "data"),
             "--api-port", str(self.port), "--threads", str(threads), "--log-format", "text"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "agent.log", "w"), cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=2) as r:
                    data = json.load(r)["data"]
                if data:  # the API answers while the model still loads: an empty list until then
                    self.model = data[0]["id"]
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"agent exited: {(self.dir / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise SystemExit("agent not ready in 300 s")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def run(self, prompt_ids: list[int], n: int) -> tuple[float, float, int]:
        body = json.dumps({"model": self.model, "prompt": prompt_ids, "max_tokens": n, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                if doc.get("usage"):
                    tokens = doc["usage"]["completion_tokens"]
                if doc.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
        return first - t0, (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0, tokens

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class InProcess:
    """The bundle's own runtime in this process: what the HTTP stream is compared with."""

    def __init__(self, bundle: Path, threads: int):
        from edgebundle.archive import verify_bundle
        from edgeruntime import LoadSpec, load_runtime

        b = verify_bundle(bundle)
        folder = Path(tempfile.mkdtemp(prefix="llm-bench-rt-"))
        b.extract(folder)
        self.rt = load_runtime(str(folder / b.manifest.model_file), LoadSpec(format="genai", threads=threads,
                                                                             allow_cpu_fallback=True))

    def run(self, prompt_ids: list[int], n: int) -> tuple[float, float, int]:
        from edgeruntime.genai import Sampling

        t0 = time.perf_counter()
        first = last = None
        count = 0
        for _tok in self.rt.generate(prompt_ids, Sampling(max_tokens=n)):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
        return first - t0, (count - 1) / (last - first) if count > 1 else 0.0, count


class LlamaCpp:
    def __init__(self, path: Path, threads: int):
        from llama_cpp import Llama

        self.path = str(path)
        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)

    def tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True)

    def run(self, prompt_ids: list[int], n: int) -> tuple[float, float, int]:
        self.llm.reset()
        t0 = time.perf_counter()
        first = last = None
        count = 0
        for _tok in self.llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            now = time.perf_counter()
            first = first or now
            last = now
            count += 1
            if count >= n:
                break
        return first - t0, (count - 1) / (last - first) if count > 1 else 0.0, count


class GenAIFolder(InProcess):
    def __init__(self, folder: Path, threads: int):
        from edgeruntime import LoadSpec, load_runtime

        self.rt = load_runtime(str(Path(folder) / "model.onnx"), LoadSpec(format="genai", threads=threads))


def heldout_texts(n: int = 40) -> list[str]:
    """English prose a default build never scores on: paragraphs of the language reference that ships with
    Python (pydoc_data.topics), without its grammar and code blocks."""
    import re

    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith("   ") or "::=" in line or set(line) <= set("*=-") for line in lines):
                continue
            text = re.sub(r"\s+", " ", para).strip()
            if len(text) >= 200:
                out.append(text)
                break  # one paragraph a topic: many subjects, few tokens
    return out[:n]


def _quality(a, cases) -> dict:
    """Each case scored against the float model on the same ids (packager.llm.quality)."""
    import numpy as np

    from packager.llm.build import validation_texts
    from packager.llm.quality import Quality, reference, score

    texts = validation_texts(a.gate_texts)[0] if a.gate_texts else heldout_texts()
    ref = reference(a.gate_folder, texts, Path(tempfile.mkdtemp(prefix="llm-bench-ref-")))
    print(f"gate texts: {a.gate_texts or 'language-reference prose (pydoc_data)'}: {len(texts)} texts, "
          f"{ref.positions} positions, float perplexity {ref.perplexity:.2f}")
    out = {}
    for k, (runner, _ids) in cases.items():
        if isinstance(runner, InProcess):
            out[k] = score(runner.rt, ref)
        elif isinstance(runner, LlamaCpp):
            from llama_cpp import Llama

            llm = Llama(model_path=runner.path, n_ctx=1024, logits_all=True, n_threads=a.threads, verbose=False)
            tops, nlls = [], []
            for c in ref.chunks:
                llm.reset()
                llm.eval([int(i) for i in c])
                x = np.asarray(llm.scores[: len(c) - 1], np.float64)
                m = x.max(-1, keepdims=True)
                nlls.append(m[:, 0] + np.log(np.exp(x - m).sum(-1)) - x[np.arange(len(c) - 1), c[1:]])
                tops.append(x.argmax(-1))
            top, nll = np.concatenate(tops), np.concatenate(nlls)
            out[k] = Quality(float((top == ref.top1).mean()), float(np.exp(nll.mean() - ref.nll.mean())),
                             float(np.exp(nll.mean())), int(top.size))
        # the agent's HTTP case is the same bundle as its in-process case: scored there
    for k in list(cases):
        if k.endswith("(agent HTTP stream)"):
            twin = k.replace("(agent HTTP stream)", "(runtime in process)")
            if twin in out:
                out[k] = out[twin]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", default=[], type=Path)
    ap.add_argument("--gguf", action="append", default=[], help="LABEL=path.gguf (llama.cpp anchor)")
    ap.add_argument("--genai", action="append", default=[], help="LABEL=folder (ONNX Runtime GenAI anchor)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gate-folder", type=Path, help="score every case against this float model (the build's gate)")
    ap.add_argument("--gate-texts", type=Path, help="held-out texts for the gate (.txt/.jsonl, as --validation)")
    ap.add_argument("--score-only", action="append", default=[], type=Path,
                    help="a bundle to score against --gate-folder, not timed")
    a = ap.parse_args()
    cases, agents, ids_of = {}, [], {}
    for b in a.bundle:
        agent = Agent(b, a.threads)
        agents.append(agent)
        rt = InProcess(b, a.threads)
        ids_of[b.name] = rt.rt.encode(PROMPT * 4)[: a.prompt_tokens]
        cases[f"{b.name} (agent HTTP stream)"] = (agent, ids_of[b.name])
        cases[f"{b.name} (runtime in process)"] = (rt, ids_of[b.name])
    for spec in a.gguf:
        label, path = spec.split("=", 1)
        try:
            lc = LlamaCpp(Path(path), a.threads)
        except ImportError:
            print(f"llama.cpp {label}: not measured (pip install llama-cpp-python: it compiles from source)")
            continue
        cases[f"llama.cpp {label} (in process)"] = (lc, lc.tokens(PROMPT * 4)[: a.prompt_tokens])
    for spec in a.genai:
        label, path = spec.split("=", 1)
        g = GenAIFolder(Path(path), a.threads)
        cases[f"onnxruntime-genai {label} (in process)"] = (g, g.rt.encode(PROMPT * 4)[: a.prompt_tokens])
    scored = {f"{b.name} (scored, not timed)": (InProcess(b, a.threads), None) for b in a.score_only}
    quality = _quality(a, {**cases, **scored}) if a.gate_folder else {}
    for k, (runner, _ids) in scored.items():
        q = quality.get(k)
        if q:
            print(f"{k:<64} agreement {q.agreement:.1%}, ppl ratio {q.ppl_ratio:.3f}: "
                  f"{'pass' if q.passes(GATE) else 'FAIL'}")
        runner.rt.close()
    for runner, ids in cases.values():  # warm-up: first-run allocations are not speed
        runner.run(ids, 8)
    got = {k: [] for k in cases}
    names = list(cases)
    for r in range(a.rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            runner, ids = cases[k]
            got[k].append(runner.run(ids, a.new_tokens))
    print(f"\n{a.prompt_tokens}-token prompt, {a.new_tokens} new tokens, greedy, {a.threads} threads, "
          f"median of {a.rounds} ({os.uname().machine})")
    print(f"{'case':<64} {'TTFT ms':>9} {'decode tok/s':>13} {'tokens':>7}" + ("  agreement  ppl ratio  gate" if quality else ""))
    for k in names:
        ttft = statistics.median(x[0] for x in got[k]) * 1e3
        tps = statistics.median(x[1] for x in got[k])
        q = quality.get(k)
        extra = (f"  {q.agreement:>9.1%}  {q.ppl_ratio:>9.3f}  {'pass' if q.passes(GATE) else 'FAIL'}" if q else "")
        print(f"{k:<64} {ttft:>9.1f} {tps:>13.2f} {got[k][0][2]:>7}" + extra)
    for agent, b in zip(agents, a.bundle):
        print(f"agent RSS serving {b.name}: {agent.rss_mb():.0f} MB (bundle {b.stat().st_size / 2**20:.0f} MB)")
        agent.close()


if __name__ == "__main__":
    import shutil

    tempfile.tempdir = tempfile.mkdtemp(prefix="llm-bench-")  # agents' data, extracted bundles: ~1 GB each
    try:
        main()
    finally:
        shutil.rmtree(tempfile.tempdir, ignore_errors=True)
