"""Hugging Face folders exported to ONNX in the worker process (packager/hf_export.py), checked in
ONNX Runtime against torch on real sentences tokenized by the bundle's own tokenizer code."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgebundle.errors import InputError
from textkit import sentences, tiny_hf_folder

pytestmark = pytest.mark.slow
if missing := [m for m in ('torch', 'transformers') if importlib.util.find_spec(m) is None]:  # found, not imported: collection stays fast
    pytest.skip(f"{missing[0]} is not installed", allow_module_level=True)


def _torch_outputs(folder, kind, feeds):
    import torch
    import transformers

    cls = {"classifier": transformers.AutoModelForSequenceClassification}.get(kind, transformers.AutoModel)
    m = cls.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        out = m(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    if kind == "classifier":
        return out.logits.numpy()
    h, mask = out.last_hidden_state.numpy(), feeds["attention_mask"][..., None]
    if kind == "sentence":
        v = (h * mask).sum(1) / mask.sum(1)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    return h


@pytest.mark.parametrize("kind,task,output", [("sentence", "feature-extraction", "sentence_embedding"),
                                              ("classifier", "text-classification", "logits"),
                                              ("distilbert", "feature-extraction", "last_hidden_state")])
def test_export_matches_torch_on_real_text_at_any_length(tmp_path, kind, task, output, monkeypatch):
    import onnxruntime as ort

    from edgeruntime.text import TextEncoder
    from packager import hf_export
    from packager.hf_export import export_stored, read_folder
    from packager.store import Store

    folder = read_folder(tiny_hf_folder(tmp_path / kind, kind=kind))
    assert folder.task.value == task and folder.output == output
    assert folder.max_length == (48 if kind == "sentence" else 64)
    if kind == "classifier":
        assert folder.labels == ("negative", "neutral", "positive")
    store = Store(tmp_path / "cache")
    path, ans = export_stored(folder, tmp_path / "first", store=store)
    expect_inputs = ["input_ids", "attention_mask"] + ([] if kind == "distilbert" else ["token_type_ids"])
    assert ans["inputs"] == expect_inputs and ans["max_relative_error"] < 1e-4
    # the same folder again: the export comes from the build cache, byte for byte, without the worker
    monkeypatch.setattr(hf_export, "export_onnx", lambda *a, **k: pytest.fail("exported again"))
    again, ans2 = export_stored(folder, tmp_path / "again", store=store)
    assert again.parent == tmp_path / "again" and again.read_bytes() == path.read_bytes() and ans2 == ans
    sess = ort.InferenceSession(str(again), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == [output]
    enc = TextEncoder.from_file(folder.tokenizer, folder.text_settings(ans["inputs"]))
    for texts in (["Return the value."], sentences(3, seed=5)):  # one short text; a padded batch of three
        feeds = enc.encode(texts).feeds
        got = sess.run(None, feeds)[0]
        want = _torch_outputs(folder.path, kind, feeds)
        if kind == "distilbert":  # padded positions hold whatever: compare the real tokens
            m = feeds["attention_mask"].astype(bool)
            got, want = got[m], want[m]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_folders_without_what_the_export_needs_are_refused_clearly(tmp_path):
    from packager.hf_export import read_folder

    folder = tiny_hf_folder(tmp_path / "m", kind="classifier")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="no tokenizer.json"):
        read_folder(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(InputError, match="not a Hugging Face model folder"):
        read_folder(folder)
