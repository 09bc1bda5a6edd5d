"""The on-device tokenizer (edgeruntime/text.py) with a real WordPiece tokenizer built here."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgebundle.errors import InputError
from textkit import sentences, tokenizer_json

pytest.importorskip("tokenizers")

from edgeruntime.text import STANDARD_INPUTS, Role, TextEncoder, TextSettings, parity_problems  # noqa: E402

INPUTS = tuple(STANDARD_INPUTS.items())


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_feeds_are_unpadded_on_a_dynamic_axis_and_truncation_is_reported(tok_path):
    enc = TextEncoder.from_file(tok_path, TextSettings(max_length=16, inputs=INPUTS))
    texts = ["Return the value.", sentences(1, seed=3)[0] + " " + sentences(1, seed=4)[0]]
    out = enc.encode(texts)
    assert set(out.feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == np.int64 and v.shape == (2, out.length) for v in out.feeds.values())
    assert out.length == max(out.lengths) == 16 and out.truncated == (False, True)
    ids, mask = out.feeds["input_ids"], out.feeds["attention_mask"]
    cls, sep = (json.loads(tok_path.read_text())["post_processor"]["special_tokens"][t]["ids"][0]
                for t in ("[CLS]", "[SEP]"))
    n0 = out.lengths[0]
    assert ids[0, 0] == cls and ids[0, n0 - 1] == sep and (ids[0, n0:] == 0).all()  # padded with pad_id
    assert mask[0].sum() == n0 and mask[1].sum() == 16 and ids[1, 15] == sep  # truncated keeps its [SEP]
    short = enc.encode(["Return the value."])
    assert short.length == n0 < 16  # one short text runs at its own length


def test_buckets_pick_the_smallest_that_fits(tok_path):
    enc = TextEncoder.from_file(tok_path, TextSettings(max_length=32, inputs=INPUTS, buckets=(8, 16, 32)))
    assert enc.encode(["Return the value."]).length == 8
    long = " ".join(sentences(3, seed=1))
    out = enc.encode(["Return the value.", long])
    assert out.length == 32 and out.truncated == (False, True)
    assert [enc.fit(n) for n in (1, 8, 9, 16, 17, 40)] == [8, 8, 16, 16, 32, 32]


def test_parity_check_names_the_text_and_token_that_drifted(tok_path):
    enc = TextEncoder.from_file(tok_path, TextSettings(max_length=24, inputs=INPUTS))
    texts = sentences(4, seed=2)
    golden = enc.ids(texts)
    assert parity_problems(enc, texts, golden) == []
    drifted = [list(g) for g in golden]
    drifted[2][3] += 1
    [p] = parity_problems(enc, texts, drifted)
    assert p.startswith("golden text 2") and "token 3" in p


def test_bad_settings_and_bad_input_are_clear_errors(tok_path):
    with pytest.raises(InputError, match="max_length"):
        TextSettings(max_length=1, inputs=INPUTS)
    with pytest.raises(InputError, match="token ids"):
        TextSettings(max_length=8, inputs=(("attention_mask", Role.MASK),))
    with pytest.raises(InputError, match="buckets"):
        TextSettings(max_length=32, inputs=INPUTS, buckets=(16, 8, 32))
    with pytest.raises(InputError, match="malformed"):
        TextSettings.from_dict({"inputs": {}})
    enc = TextEncoder.from_file(tok_path, TextSettings(max_length=8, inputs=INPUTS))
    with pytest.raises(InputError, match="list of strings"):
        enc.encode([b"bytes"])
    with pytest.raises(InputError, match="cannot be read"):
        TextEncoder("{not json", TextSettings(max_length=8, inputs=INPUTS))


def test_settings_round_trip(tok_path):
    s = TextSettings(max_length=32, inputs=INPUTS, buckets=(16, 32), lowercase=True, special_tokens={"cls": "[CLS]"})
    assert TextSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_text_the_tokenizer_cannot_take_is_the_requests_error(tok_path):
    """JSON carries lone surrogates; the tokenizer library raises a bare TypeError on them. Both are InputError
    (a 400 over HTTP), naming the text and the character."""
    enc = TextEncoder.from_file(tok_path, TextSettings(max_length=16, inputs=INPUTS))
    for texts, where in ((["fine", "\udcff x"], "text 1"), (["ok\ud800"], "text 0")):
        with pytest.raises(InputError) as e:
            enc.encode(texts)
        assert where in str(e.value) and "lone surrogate" in str(e.value), e.value
    assert enc.encode(["a\x00b is fine"]).lengths[0] > 2  # a NUL is text the tokenizer takes


def test_coral_refuses_a_hugging_face_folder_before_exporting_it(tok_path, tmp_path):
    """Every target refuses the text model: the build says so before the export (minutes for a base-size
    encoder). The weights file here is empty: an export would fail on it with another error."""
    from edgebundle.errors import UnsupportedOpError
    from edgepack.cli import exit_code
    from packager.build import BuildOptions, build

    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                    "max_position_embeddings": 64}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text(tok_path.read_text())
    with pytest.raises(UnsupportedOpError) as e:
        build(BuildOptions(model=folder, targets=("coral",), out_dir=tmp_path / "out"))
    assert "coral cannot run this text model" in str(e.value) and exit_code(e.value) == 3
    assert not (tmp_path / "out").exists()
