"""Text in, token tensors out: the tokenizer a text bundle carries, run the same way at build time
and on the device.

The bundle ships the model's own `tokenizer.json` (Hugging Face `tokenizers`) with its settings
written out (`TextSettings`: maximum length, which model input takes which tensor, the padding id,
the sequence-length buckets of TFLite bundles), so an application sends text and never keeps a
tokenizer of its own in step with the model. The tokenizer file's own truncation and padding are
switched off: truncation is done here at `max_length` and reported per text, never silent, and
padding goes only as far as the request needs (its longest text, or the smallest bucket that fits).

`tokenizers` is optional on a device (`pip install 'edgepack[text]'`); it is imported only when a
text bundle loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from edgebundle.errors import InputError, RuntimeUnavailableError


class Role(str, Enum):
    """What a model input holds, for the tensors a tokenizer makes."""

    IDS = "ids"
    MASK = "mask"
    TYPE_IDS = "type_ids"


# The input names Hugging Face exports use, and what each takes.
STANDARD_INPUTS = {"input_ids": Role.IDS, "attention_mask": Role.MASK, "token_type_ids": Role.TYPE_IDS}


@dataclass(frozen=True)
class TextSettings:
    max_length: int
    inputs: tuple[tuple[str, Role], ...]  # model input name -> role, in the model's order
    pad_id: int = 0
    buckets: tuple[int, ...] = ()  # fixed sequence lengths (TFLite); empty: the model takes any length
    lowercase: bool | None = None  # as the tokenizer's normalizer does it (for the record, not applied here)
    special_tokens: dict = field(default_factory=dict)  # cls/sep/pad/unk/mask -> token text

    def __post_init__(self):
        if self.max_length < 2:
            raise InputError(f"text max_length {self.max_length} is below 2 (room for the special tokens)")
        if not any(r is Role.IDS for _, r in self.inputs):
            raise InputError("a text model needs an input that takes token ids (e.g. input_ids)")
        if self.buckets and (list(self.buckets) != sorted(set(self.buckets)) or self.buckets[-1] != self.max_length):
            raise InputError(f"text buckets {list(self.buckets)} must rise and end at max_length {self.max_length}")

    def to_dict(self) -> dict:
        return {"max_length": self.max_length, "inputs": {n: r.value for n, r in self.inputs}, "pad_id": self.pad_id,
                "buckets": list(self.buckets), "lowercase": self.lowercase, "special_tokens": dict(self.special_tokens),
                "truncation": "longest_first at max_length, reported per text"}

    @classmethod
    def from_dict(cls, d: dict) -> "TextSettings":
        try:
            return cls(max_length=int(d["max_length"]), inputs=tuple((n, Role(r)) for n, r in d["inputs"].items()),
                       pad_id=int(d.get("pad_id", 0)), buckets=tuple(int(b) for b in d.get("buckets") or ()),
                       lowercase=d.get("lowercase"), special_tokens=dict(d.get("special_tokens") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"text settings are malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Encoded:
    feeds: dict[str, np.ndarray]  # int64 [batch, length] per model input
    lengths: tuple[int, ...]  # tokens per text, special tokens included, after truncation
    truncated: tuple[bool, ...]  # per text: was it cut at max_length

    @property
    def length(self) -> int:
        return next(iter(self.feeds.values())).shape[1]


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise RuntimeUnavailableError("this bundle takes text and the `tokenizers` library is not installed",
                                      hint="pip install 'edgepack[text]' (or send token ids instead)") from None
    return tokenizers


class TextEncoder:
    """A bundle's tokenizer with its settings. Thread-safe: `tokenizers` releases no shared state."""

    def __init__(self, tokenizer_json: str, settings: TextSettings):
        tk = _tokenizers()
        try:
            self._tok = tk.Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # the library raises plain Exceptions on a bad file
            raise InputError(f"the bundle's tokenizer.json cannot be read: {str(e).splitlines()[0][:200]}") from None
        self._tok.no_padding()
        self._tok.enable_truncation(settings.max_length)
        self.settings = settings

    @classmethod
    def from_file(cls, path, settings: TextSettings) -> "TextEncoder":
        with open(path, encoding="utf-8") as f:
            return cls(f.read(), settings)

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (special tokens included, truncated, unpadded): what the parity check compares."""
        return [e.ids for e in self._encode(texts)]

    def encode(self, texts: list[str], *, length: int | None = None) -> Encoded:
        """Feeds for `texts`, padded to `length`, else to the smallest bucket (or the longest text) that fits."""
        encs = self._encode(texts)
        lengths = tuple(len(e.ids) for e in encs)
        need = max(lengths, default=1)
        width = length or self.fit(need)
        if width < need:
            raise InputError(f"a text of {need} tokens does not fit the length {width}")
        s = self.settings
        shape = (len(encs), width)
        cols = {Role.IDS: np.full(shape, s.pad_id, np.int64), Role.MASK: np.zeros(shape, np.int64),
                Role.TYPE_IDS: np.zeros(shape, np.int64)}
        for i, e in enumerate(encs):
            n = len(e.ids)
            cols[Role.IDS][i, :n] = e.ids
            cols[Role.MASK][i, :n] = 1
            cols[Role.TYPE_IDS][i, :n] = e.type_ids
        return Encoded(feeds={name: cols[role] for name, role in s.inputs}, lengths=lengths,
                       truncated=tuple(bool(e.overflowing) for e in encs))

    def fit(self, n: int) -> int:
        """The sequence length a request of `n` tokens runs at: its own, or the smallest bucket that holds it."""
        if not self.settings.buckets:
            return n
        return next((b for b in self.settings.buckets if b >= n), self.settings.max_length)

    def _encode(self, texts: list[str]):
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise InputError("text inputs must be a list of strings")
        try:
            return self._tok.encode_batch(list(texts))
        except Exception as e:  # a lone surrogate (named below), or whatever else the library refuses: the request's fault
            for i, t in enumerate(texts):
                check_text(t, f"text {i}")
            raise InputError(f"the tokenizer refuses these texts: {str(e).splitlines()[0][:200]}") from None


def check_text(text: str, where: str) -> str:
    """Text a tokenizer can take: a string that is valid Unicode (JSON can carry lone surrogates)."""
    if not isinstance(text, str):
        raise InputError(f"{where} must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                         f"{e.start}") from None
    return text


def text_settings(tokenizer_json, inputs: list[str], *, max_length: int, special_tokens: dict,
                  buckets: tuple[int, ...] = ()) -> TextSettings:
    """Settings for a model whose inputs are `inputs` (Hugging Face names), with the pad id and the
    lower-casing read from the tokenizer file itself."""
    import json

    tok = _tokenizers().Tokenizer.from_file(str(tokenizer_json))
    pad_id = tok.token_to_id(special_tokens.get("pad_token") or "[PAD]")
    with open(tokenizer_json, encoding="utf-8") as f:
        norm = json.load(f).get("normalizer") or {}
    return TextSettings(max_length=max_length, inputs=tuple((n, STANDARD_INPUTS[n]) for n in inputs),
                        pad_id=0 if pad_id is None else pad_id, buckets=buckets, lowercase=norm.get("lowercase"),
                        special_tokens=dict(special_tokens))


def parity_problems(encoder: TextEncoder, texts: list[str], expected: list[list[int]]) -> list[str]:
    """Golden texts whose token ids differ from those computed at build time (a drifted tokenizer library)."""
    got = encoder.ids(texts)
    out = []
    for i, (t, a, b) in enumerate(zip(texts, expected, got)):
        if list(a) != list(b):
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(f"golden text {i} ({t[:40]!r}): token {at} is {b[at] if at < len(b) else 'missing'}, "
                       f"the build had {a[at] if at < len(a) else 'nothing'}")
    if len(expected) != len(texts):
        out.append(f"{len(texts)} golden texts but {len(expected)} id lists")
    return out


__all__ = ["Encoded", "Role", "STANDARD_INPUTS", "TextEncoder", "TextSettings", "parity_problems", "text_settings"]
