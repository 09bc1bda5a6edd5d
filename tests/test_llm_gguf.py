"""GGUF files as a source (packager/llm/gguf.py): a file that is not a GGUF, or is cut short, or carries no
tokenizer, is refused in the build's own process with one line (no child, no torch); a tiny Llama written
here as a Q8_0 GGUF by the gguf package's writer (what llama.cpp's convert_hf_to_gguf.py writes: q/k rows
permuted, byte-level BPE vocabulary and merges) comes back as a Hugging Face folder whose weights,
tokenizer and logits are the original's within Q8_0's rounding, and exports to ONNX Runtime GenAI.
Gemma 3 270M's real GGUF is tests/test_corpus_gguf.py's."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from edgebundle.errors import InputError
from packager.llm.gguf import read_header, to_folder

NO_TORCH = importlib.util.find_spec("torch") is None  # found, not imported: collection stays fast


def _one_line(e: InputError) -> str:
    msg = e.value.args[0]
    assert "\n" not in msg and "Traceback" not in msg
    return msg


# ---- writing GGUF files ----

def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, LlamaModel.permute): rotary halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama_gguf(folder: Path, dest: Path, *, qtype: str = "Q8_0", arch: str = "llama") -> Path:
    """A Hugging Face Llama folder (tests/llmkit.py tiny_decoder) written as a GGUF the way llama.cpp's
    converter writes it: matrices in `qtype`, norms in F32, the byte-level BPE vocabulary as "gpt2"."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    tj = json.loads((folder / "tokenizer.json").read_text())
    weights = load_file(folder / "model.safetensors")
    q = gguf.GGMLQuantizationType[qtype]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(dest), arch)
    w.add_name("tiny llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tj["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template((folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").exists()
                        else "{{ messages }}")

    def put(name: str, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, np.float32)
        if a.ndim == 1:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)

    put("token_embd.weight", weights["model.embed_tokens.weight"])
    put("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights:
        put("output.weight", weights["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in LAYER_NAMES.items():
            a = weights[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                a = _permute(a, heads if gg == "attn_q" else kv)
            put(f"blk.{i}.{gg}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


def random_gguf(dest: Path, *, arch: str = "llama", tokenizer: bool = True) -> Path:
    """A small GGUF of random tensors (no torch): enough for header checks."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(dest), arch)
    w.add_context_length(128)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([chr(c) for c in range(33, 127)] * 3)  # a vocabulary longer than the reader keeps
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(rng.standard_normal((32, 64)).astype(np.float32),
                                                             gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


# ---- refused in the build's own process ----

def test_text_file_named_gguf_is_refused(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_text("this is a model, trust me\n")
    with pytest.raises(InputError) as e:
        to_folder(p, tmp_path / "out")
    assert "x.gguf is not a GGUF file" in _one_line(e)
    assert not (tmp_path / "out").exists()


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InputError) as e:
        to_folder(tmp_path / "nowhere.gguf", tmp_path / "out")
    assert "no such file" in _one_line(e)


def test_header_reads_metadata_and_tensors(tmp_path):
    h = read_header(random_gguf(tmp_path / "r.gguf"))
    assert h.architecture == "llama" and h.metadata["llama.context_length"] == 128
    assert [t.name for t in h.tensors] == ["token_embd.weight", "blk.0.attn_q.weight"]
    assert h.tensors[1].shape == (64, 32)  # GGUF order: fastest-varying dimension first
    assert h.metadata["tokenizer.ggml.tokens"].length == 282  # long arrays are skipped, their length kept


def test_fast_reader_parses_as_gguf_py_does(tmp_path):
    """The child's reader (arrays read straight from the buffer) gives gguf-py's fields part for part."""
    import gguf

    from packager.llm.gguf import fast_reader

    path = random_gguf(tmp_path / "r.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "arrays.gguf"), "llama")
    w.add_token_list(["a", "", "日本", "<s>"])
    w.add_token_scores([0.5, -1.0, 2.25, 0.0])
    w.add_token_types([1, 3, 1, 3])
    w.add_array("test.empty", [])
    w.add_array("test.bools", [True, False])
    w.add_tensor("t", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for p in (path, tmp_path / "arrays.gguf"):
        want, got = gguf.GGUFReader(p), fast_reader()(p)
        assert list(want.fields) == list(got.fields)
        for key, a in want.fields.items():
            b = got.fields[key]
            assert (a.types, a.data, len(a.parts)) == (b.types, b.data, len(b.parts)), key
            assert all(np.array_equal(a.parts[i], b.parts[i]) for i in a.data) and a.contents() == b.contents(), key
        assert [(t.name, t.data_offset) for t in want.tensors] == [(t.name, t.data_offset) for t in got.tensors]
        assert all(np.array_equal(x.data, y.data) for x, y in zip(want.tensors, got.tensors))
        if importlib.util.find_spec("transformers") is not None:  # the child's element parser: transformers' values
            from transformers.integrations.ggml import _gguf_parse_value

            from packager.llm.gguf import parse_value

            for key, f in got.fields.items():
                want_v = [_gguf_parse_value(f.parts[i], f.types) for i in f.data]
                got_v = [parse_value(f.parts[i], f.types) for i in f.data]
                assert got_v == want_v and [type(v) for v in got_v] == [type(v) for v in want_v], key


@pytest.mark.parametrize("cut", ["data", "tensor-table", "vocabulary"])
def test_truncated_gguf_is_refused(tmp_path, cut):
    p = random_gguf(tmp_path / "whole.gguf")
    blob = p.read_bytes()
    h = read_header(p)
    at = {"data": len(blob) - 100, "tensor-table": h.data_offset - 40, "vocabulary": 200}[cut]
    short = tmp_path / "short.gguf"
    short.write_bytes(blob[:at])
    with pytest.raises(InputError) as e:
        to_folder(short, tmp_path / "out")
    msg = _one_line(e)
    assert "short.gguf is truncated" in msg, msg
    assert "check its sha256" in str(e.value)


def test_gguf_without_tokenizer_is_refused(tmp_path):
    p = random_gguf(tmp_path / "bare.gguf", tokenizer=False)
    with pytest.raises(InputError) as e:
        to_folder(p, tmp_path / "out")
    assert "carries no tokenizer" in _one_line(e)


# ---- through transformers, in the child ----

@pytest.mark.slow
@pytest.mark.skipif(NO_TORCH, reason="torch is not installed")
def test_unsupported_architecture_is_refused(tmp_path):
    p = random_gguf(tmp_path / "odd.gguf", arch="wavenet9")
    with pytest.raises(InputError) as e:
        to_folder(p, tmp_path / "out")
    msg = _one_line(e)
    assert "cannot read GGUF architecture 'wavenet9'" in msg and "llama" in msg, msg
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def tiny_gguf_folder(tiny_llm, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    g = llama_gguf(tiny_llm, d / "tiny-q8_0.gguf")
    return g, to_folder(g, d / "folder")


@pytest.mark.slow
@pytest.mark.skipif(NO_TORCH, reason="torch is not installed")
def test_tiny_gguf_to_folder(tiny_llm, tiny_gguf_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmkit import corpus

    g, src = tiny_gguf_folder
    assert (src.architecture, src.model_class, src.file_type) == ("llama", "LlamaForCausalLM", "Q8_0")
    assert dict(src.tensor_types) == {"Q8_0": 16, "F32": 5}
    assert src.context_length == 256 and src.eos_token_ids == (1,) and src.chat_template
    assert src.peak_rss_bytes > 0 and src.seconds > 0 and src.folder_bytes > 0
    files = {p.name for p in src.folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "chat_template.jinja"} <= files
    assert "quantization_config" not in json.loads((src.folder / "config.json").read_text())
    assert json.loads((src.folder / "generation_config.json").read_text())["eos_token_id"] == 1

    ref = AutoModelForCausalLM.from_pretrained(tiny_llm, dtype=torch.float32).eval()
    got = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32).eval()
    assert src.parameters == ref.num_parameters()
    rs, gs = ref.state_dict(), got.state_dict()
    assert rs.keys() == gs.keys()
    for k in rs:  # Q8_0: each block of 32 rounded to 1/127 of its largest magnitude (q/k rows unpermuted)
        err = (rs[k] - gs[k]).abs().max().item()
        assert err <= rs[k].abs().max().item() / 127 + 1e-6, (k, err)

    texts = corpus(60, seed=3)[-12:]  # sentences the decoder was not trained on
    tok_ref, tok_got = AutoTokenizer.from_pretrained(tiny_llm), AutoTokenizer.from_pretrained(src.folder)
    for t in texts:
        ids = tok_ref(t)["input_ids"]
        assert tok_got(t)["input_ids"] == ids
        assert tok_got.decode(ids) == t
    ids = torch.tensor([tok_ref(" ".join(texts[:3]))["input_ids"]])
    with torch.no_grad():
        a, b = ref(ids).logits[0], got(ids).logits[0]
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.95
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


@pytest.mark.slow
@pytest.mark.skipif(NO_TORCH, reason="torch is not installed")
def test_tiny_gguf_folder_exports(tiny_gguf_folder, tmp_path):
    """The folder is a source packager.llm.export takes: its fp32 ONNX gives torch's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgeruntime import LoadSpec, load_runtime
    from packager.llm.export import Recipe, export

    _, src = tiny_gguf_folder
    ex = export(src.folder, tmp_path / "fp32", Recipe("fp32"))
    assert ex.context_length == 256 and ex.eos_token_ids == (1,)
    rt = load_runtime(str(ex.folder / "model.onnx"), LoadSpec(format="genai", threads=1))
    try:
        ids = rt.encode("Return the value of the named attribute of an object.")
        got = rt.logits(ids)
    finally:
        rt.close()
    model = AutoModelForCausalLM.from_pretrained(src.folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
