"""Text models end to end with tiny generated ones: a Hugging Face folder (BERT with
sentence-transformers pooling, a classifier) built from .txt/.jsonl data into bundles that carry
their tokenizer, run in process and by a real agent over KServe v2 BYTES, compared with torch."""
from __future__ import annotations

import importlib.util
import json
import urllib.request
import zipfile

import numpy as np
import pytest

from textkit import sentences, tiny_hf_folder

pytestmark = pytest.mark.slow
if missing := [m for m in ('torch', 'tokenizers') if importlib.util.find_spec(m) is None]:  # found, not imported: collection stays fast
    pytest.skip(f"{missing[0]} is not installed", allow_module_level=True)


def _texts(path, texts, labels=None):
    if labels is None:
        path.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
    else:
        path.write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)))
    return path


def _torch_embed(folder, texts):
    import torch
    import transformers

    from edgeruntime.text import TextEncoder
    from packager.hf_export import read_folder

    f = read_folder(folder)
    enc = TextEncoder.from_file(f.tokenizer, f.text_settings(["input_ids", "attention_mask", "token_type_ids"]))
    feeds = enc.encode(texts).feeds
    m = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        h = m(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    mask = feeds["attention_mask"][..., None]
    v = (h * mask).sum(1) / mask.sum(1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def sentence(tmp_path_factory):
    """A tiny sentence encoder built for x86-cpu (auto), jetson-gpu and coral (which refuses it) from text files."""
    from packager.build import BuildOptions, build

    d = tmp_path_factory.mktemp("sentence")
    folder = tiny_hf_folder(d / "encoder", kind="sentence")
    texts = sentences(260, seed=11)
    res = build(BuildOptions(model=folder, targets=("x86-cpu", "jetson-gpu", "coral"), out_dir=d / "out", name="enc",
                             calibration=str(_texts(d / "calib.txt", texts[:200])),
                             validation=str(_texts(d / "valid.txt", texts[200:])), speed_gate=False))
    return {"folder": folder, "res": res, "held_out": sentences(40, seed=99), "dir": d}


def _bundle(res, target):
    return next(r for r in res.results if r.target == target)


def test_hf_folder_builds_with_its_tokenizer_and_dynamic_int8_first(sentence):
    from edgebundle.archive import open_bundle

    res = sentence["res"]
    built = [r for r in res.results if r.target != "coral"]
    assert all(r.ok for r in built), [r.error for r in built]
    assert res.source_format == "hf"
    # coral refuses up front, on its own: the other targets still build
    coral = _bundle(res, "coral")
    assert not coral.ok and coral.error_kind == "UnsupportedOpError" and "token ids above 255" in coral.error, coral.error
    assert coral.report["candidates"] == [] and not list((sentence["dir"] / "out").glob("*coral*"))
    x86 = _bundle(res, "x86-cpu")
    assert x86.report["candidates"][0]["candidate"] == "dynamic"  # transformers try dynamic int8 first
    for t in built:
        b = open_bundle(t.bundle)
        m = b.manifest
        assert "tokenizer.json" in m.files and m.text["tokenizer"] == "tokenizer.json"
        assert m.text["settings"]["max_length"] == 48 and len(m.text["golden_ids"]) == len(m.text["golden_texts"])
        assert m.provenance["source_model"] == {"file": "encoder", "format": "hf",
                                                "sha256": m.provenance["source_model"]["sha256"]}
        assert [s.shape_signature for s in m.inputs] == [(-1, -1)] * 3
    assert open_bundle(_bundle(res, "jetson-gpu").bundle).manifest.precision == "fp16"


def _same_neighbours(got: np.ndarray, want: np.ndarray, target: str) -> None:
    """Each text's nearest neighbour is kept for >= 90 % of 40 held-out texts, and a swap only ever picks a
    runner-up that torch puts within 0.05 of the nearest. (The build's gate, --min-neighbours 0.95, holds on
    its own validation texts; on held-out ones int8 kernels differ by CPU: CI's host swapped 3 of 40.)"""
    sim_got, sim_want = got @ got.T, want @ want.T
    np.fill_diagonal(sim_got, -np.inf)
    np.fill_diagonal(sim_want, -np.inf)
    near, best = sim_got.argmax(1), sim_want.argmax(1)
    rows = np.arange(len(want))
    gap = sim_want[rows, best] - sim_want[rows, near]  # how much nearer torch's own choice is
    assert (near == best).mean() >= 0.9, (target, (near == best).mean())
    assert (gap <= 0.05).all(), (target, np.sort(gap)[-3:])  # only near ties may swap


def test_bundles_embed_text_like_torch_and_report_truncation(sentence):
    from device_agent import load_bundle

    texts = sentence["held_out"]
    want = _torch_embed(sentence["folder"], texts)
    for target in ("x86-cpu", "jetson-gpu"):
        model = load_bundle(_bundle(sentence["res"], target).bundle, allow_cpu_fallback=True)
        try:
            out = model.infer({"text": texts})
        finally:
            model.close()
        got = out["sentence_embedding"]
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
        assert cos.mean() >= 0.99 and cos.min() >= 0.98, (target, cos.mean(), cos.min())
        _same_neighbours(got, want, target)
        tokens, cut = out["text_tokens"], out["text_truncated"]
        assert tokens.shape == cut.shape == (len(texts),) and tokens.max() <= 48 and (tokens[cut] == 48).all()
    model = load_bundle(_bundle(sentence["res"], "x86-cpu").bundle)
    try:
        out = model.infer({"text": ["Short.", " ".join(sentences(6, seed=3))]})
    finally:
        model.close()
    assert out["text_truncated"].tolist() == [False, True] and out["text_tokens"][1] == 48


def test_a_tokenizer_that_drifted_is_refused_at_load(sentence, tmp_path):
    from device_agent import load_bundle
    from edgebundle.archive import open_bundle, write_bundle
    from edgebundle.errors import VerificationError

    src = _bundle(sentence["res"], "x86-cpu").bundle
    m = open_bundle(src).manifest
    parts = tmp_path / "parts"
    with zipfile.ZipFile(src) as z:
        z.extractall(parts)
    ids = [list(x) for x in m.text["golden_ids"]]
    ids[1][2] += 1  # as if this device's tokenizers library split "HELLO, World!" differently
    from dataclasses import replace

    bad = tmp_path / "drifted.edgepack"
    write_bundle(bad, replace(m, text=dict(m.text, golden_ids=ids)), {n: parts / n for n in m.files})
    with pytest.raises(VerificationError, match="golden token ids") as e:
        load_bundle(bad)
    assert any(p.startswith("golden text 1") for p in e.value.problems)


def test_classifier_folder_ships_its_labels_and_is_gated_on_labelled_jsonl(tmp_path):
    from device_agent import load_bundle
    from edgebundle.archive import open_bundle
    from packager.build import BuildOptions, build

    folder = tiny_hf_folder(tmp_path / "clf", kind="classifier")
    texts = sentences(160, seed=21)
    labels = np.arange(len(texts)) % 3
    res = build(BuildOptions(model=folder, targets=("x86-cpu",), out_dir=tmp_path / "out", name="clf",
                             calibration=str(_texts(tmp_path / "c.jsonl", texts[:120], labels[:120])),
                             validation=str(_texts(tmp_path / "v.jsonl", texts[120:], labels[120:])),
                             speed_gate=False))
    [t] = res.results
    assert t.ok, t.error
    assert t.report["accuracy"]["accuracy_drop_points"] is not None  # gated on the labels
    b = open_bundle(t.bundle)
    assert b.read("labels.txt").decode().split() == ["negative", "neutral", "positive"]
    model = load_bundle(t.bundle)
    try:
        out = model.infer({"text": texts[:4]})
    finally:
        model.close()
    assert out["logits"].shape == (4, 3)


def test_users_own_onnx_export_takes_the_tokenizer_from_its_folder(sentence, tmp_path):
    from device_agent import load_bundle
    from edgebundle.archive import open_bundle
    from packager.build import BuildOptions, build
    from packager.hf_export import export_onnx, read_folder

    onnx_path = tmp_path / "encoder.onnx"  # what a user's own torch.onnx.export writes
    export_onnx(read_folder(sentence["folder"]), onnx_path)
    d = sentence["dir"]
    res = build(BuildOptions(model=onnx_path, targets=("x86-cpu",), out_dir=tmp_path / "out", name="own",
                             tokenizer=sentence["folder"], calibration=str(d / "calib.txt"),
                             validation=str(d / "valid.txt"), speed_gate=False))
    [t] = res.results
    assert t.ok, t.error
    m = open_bundle(t.bundle).manifest
    assert m.text["settings"]["max_length"] == 48 and "tokenizer.json" in m.files
    texts = sentence["held_out"]
    model = load_bundle(t.bundle)
    try:
        got = model.infer({"text": texts})["sentence_embedding"]
    finally:
        model.close()
    want = _torch_embed(sentence["folder"], texts)
    assert ((got * want).sum(1) / np.linalg.norm(got, axis=1)).mean() >= 0.99


@pytest.mark.parametrize("what,args,message", [
    ("text data for a model without text", ["--calibration", "{txt}"], "takes no text"),
    ("a folder without tokenizer.json", ["--validation", "{txt}"], "no tokenizer.json"),
    ("a .jsonl line without text", ["--validation", "{bad}"], ":2 is not a JSON object"),
])
def test_text_input_mistakes_are_clear_errors(models, tmp_path, what, args, message):
    from click.testing import CliRunner

    from edgepack.cli import main

    txt = _texts(tmp_path / "t.txt", ["one text", "another text"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    folder = tiny_hf_folder(tmp_path / "m", kind="sentence")
    if what == "a folder without tokenizer.json":
        (folder / "tokenizer.json").unlink()
    model = models["cnn"] if what.startswith("text data") else folder
    argv = ["build", str(model), "-t", "x86-cpu", "-o", str(tmp_path / "out"), "--no-html",
            *[a.format(txt=txt, bad=bad) for a in args]]
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.agent
def test_agent_serves_text_over_kserve_bytes_json_and_binary(sentence, tmp_path):
    import tritonclient.http as httpclient

    from agents import AgentProc
    from device_agent import load_bundle

    bundle = _bundle(sentence["res"], "x86-cpu").bundle
    texts = sentence["held_out"][:3]
    local = load_bundle(bundle)
    try:
        ref = local.infer({"text": texts})
    finally:
        local.close()
    want = ref["sentence_embedding"]
    a = AgentProc(tmp_path / "data", bundle=bundle, interval=60, extra=("--log-format", "text"))
    a.model_name = "enc"
    a.start()
    try:
        meta = a.metadata()
        assert {"name": "text", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
        req = urllib.request.Request(a.base + "/v2/models/enc/infer", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            res = json.loads(r.read())
        out = {o["name"]: o for o in res["outputs"]}
        got = np.asarray(out["sentence_embedding"]["data"], np.float32).reshape(out["sentence_embedding"]["shape"])
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert out["text_truncated"]["datatype"] == "BOOL" and out["text_tokens"]["datatype"] == "INT64"
        assert out["text_truncated"]["data"] == ref["text_truncated"].tolist()
        assert out["text_tokens"]["data"] == ref["text_tokens"].tolist()
        client = httpclient.InferenceServerClient(url=a.base.removeprefix("http://"))
        inp = httpclient.InferInput("text", [len(texts)], "BYTES")
        inp.set_data_from_numpy(np.asarray(texts, dtype=object), binary_data=True)
        got = client.infer("enc", [inp]).as_numpy("sentence_embedding")
        np.testing.assert_allclose(got, want, atol=1e-5)
        bad = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [3]}]}
        req = urllib.request.Request(a.base + "/v2/models/enc/infer", data=json.dumps(bad).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and "list of strings" in json.loads(e.value.read())["error"]
    finally:
        a.stop()
