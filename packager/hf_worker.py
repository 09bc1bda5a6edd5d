"""The Hugging Face export worker: `python -m packager.hf_worker REQUEST.json`, run by
packager/hf_export.py in a process of its own, so torch and transformers (the optional `hf` extra)
are loaded only here, never by `edgepack --help`, the rest of the packager or the agent.

It loads the folder's model with random-free, local-only loading (no hub), wraps it so the graph
ends where the user's pipeline ends (sentence-transformers pooling and normalisation, class
logits, or token states), exports ONNX with dynamic batch and sequence axes, and checks the export
against torch on two lengths before it answers. The answer is one JSON line on stdout."""
from __future__ import annotations

import inspect
import json
import sys
import traceback
from pathlib import Path


def _wrapper(model, *, task: str, pooling: str | None, normalize: bool, inputs: list[str]):
    import torch

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *feeds):
            kw = dict(zip(inputs, feeds))
            out = self.model(**kw)
            if task != "feature-extraction":
                return out.logits
            h = out.last_hidden_state
            if pooling is None:
                return h
            mask = kw["attention_mask"].unsqueeze(-1).to(h.dtype)
            if pooling == "mean":
                v = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif pooling == "max":
                v = (h + (mask - 1) * 1e9).max(1).values
            else:  # cls
                v = h[:, 0]
            return torch.nn.functional.normalize(v, p=2.0, dim=1) if normalize else v

    return Exported().eval()


def export(req: dict) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.manual_seed(0)
    folder, task = Path(req["folder"]), req["task"]
    cls = {"feature-extraction": transformers.AutoModel,
           "text-classification": transformers.AutoModelForSequenceClassification,
           "token-classification": transformers.AutoModelForTokenClassification}[task]
    model = cls.from_pretrained(str(folder), local_files_only=True, attn_implementation="eager").eval()
    accepted = inspect.signature(model.forward).parameters
    inputs = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    wrapped = _wrapper(model, task=task, pooling=req.get("pooling"), normalize=bool(req.get("normalize")),
                       inputs=inputs)
    vocab = int(getattr(model.config, "vocab_size", 100))

    def feeds(batch: int, length: int):
        g = torch.Generator().manual_seed(length)
        ids = torch.randint(5, max(vocab, 6), (batch, length), generator=g)
        mask = torch.ones(batch, length, dtype=torch.int64)
        mask[0, length // 2:] = 0  # one padded row, so the mask's path is traced and checked
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}

    sample = feeds(2, 8)
    axes = {n: {0: "batch", 1: "sequence"} for n in inputs}
    out_name = req["output"]
    axes[out_name] = {0: "batch"} if req.get("pooling") or task == "text-classification" else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        torch.onnx.export(wrapped, tuple(sample[n] for n in inputs), req["onnx"], input_names=inputs,
                          output_names=[out_name], dynamic_axes=axes, opset_version=int(req.get("opset", 17)),
                          do_constant_folding=True, dynamo=False, external_data=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(req["onnx"], providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch, length in ((1, 5), (2, 24)):
        f = feeds(batch, min(length, int(getattr(model.config, "max_position_embeddings", 512))))
        with torch.no_grad():
            want = wrapped(*(f[n] for n in inputs)).numpy()
        got = sess.run(None, {n: f[n].numpy() for n in inputs})[0]
        worst = max(worst, float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-12)))
    return {"ok": True, "inputs": inputs, "output": out_name, "max_relative_error": worst,
            "model_type": model.config.model_type, "torch": torch.__version__,
            "transformers": transformers.__version__, "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str]) -> int:
    req = json.loads(Path(argv[1]).read_text())
    try:
        ans = export(req)
    except Exception as e:  # answered as data: the parent turns it into a ConversionError with this text
        ans = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}",
               "trace": traceback.format_exc()[-3000:]}
    sys.stdout.write(json.dumps(ans) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
