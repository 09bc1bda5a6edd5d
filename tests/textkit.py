"""A tiny real BERT-style tokenizer (WordPiece, lower-casing, [CLS] ... [SEP]) built in the test,
and English sentences that ship with Python (the standard library's docstrings): text data that
needs no download."""
from __future__ import annotations

import re
from pathlib import Path

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
