"""Child process: the float reference of a causal-LM folder (torch, fp32) on held-out texts. Usage:
python -m packager.llm.reference FOLDER TEXTS.json OUT.npz MAX_TOKENS CHUNK [ADAPTER]

The texts are tokenized with the model's own tokenizer (special tokens as the model expects), packed
into chunks of at most CHUNK tokens (MAX_TOKENS in all), and for every position the reference's top-1
next token and its negative log-likelihood of the real next token are written: each candidate is then
scored on the very same token ids (packager.llm.quality).

With ADAPTER (a PEFT LoRA folder) the reference is the adapted model, and OUT.npz also holds the adapter's
weights as the ONNX graph computes them (packager.llm.lora): "lora/LAYER/MODULE/A" = lora_A.T [in, r],
"lora/LAYER/MODULE/B" = (lora_B x PEFT's scaling).T [r, out], the scaling PEFT itself applies to that
module (alpha_pattern, rank_pattern and rsLoRA included), as the model builder bakes them."""
from __future__ import annotations

import json
import sys

import numpy as np


def chunks(tok, texts: list[str], max_tokens: int, chunk: int) -> list[list[int]]:
    out, cur, total = [], [], 0
    for t in texts:
        ids = tok(t, add_special_tokens=True)["input_ids"][:chunk]
        if len(ids) < 2:
            continue
        if cur and len(cur) + len(ids) > chunk:
            out.append(cur)
            cur = []
        cur = cur + ids
        total += len(ids)
        if total >= max_tokens:
            break
    if len(cur) >= 2:
        out.append(cur)
    return out


def lora_weights(model) -> dict[str, np.ndarray]:
    """A PeftModel's LoRA weights as the graph computes them (see the module's docstring)."""
    import re

    out = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "scaling") and "default" in getattr(module, "lora_A", {})):
            continue
        m = re.search(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)$", name)
        if not m:
            raise SystemExit(f"LoRA module {name} is not in a decoder layer")
        a = module.lora_A["default"].weight.detach().float()
        b = module.lora_B["default"].weight.detach().float() * float(module.scaling["default"])
        out[f"lora/{m.group(1)}/{m.group(2)}/A"] = a.T.contiguous().numpy()
        out[f"lora/{m.group(1)}/{m.group(2)}/B"] = b.T.contiguous().numpy()
    if not out:
        raise SystemExit("the adapter has no LoRA weights")
    return out


def main(folder: str, texts_json: str, out: str, max_tokens: int, chunk: int, adapter: str | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    texts = json.loads(open(texts_json).read())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = {}
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        lora = lora_weights(model)
    model.eval()
    ids, offsets, top1, nll = [], [0], [], []
    with torch.inference_mode():
        for c in chunks(tok, texts, max_tokens, chunk):
            logits = model(torch.tensor([c])).logits[0, :-1].float()
            logp = torch.log_softmax(logits, -1)
            target = torch.tensor(c[1:])
            ids.extend(c)
            offsets.append(len(ids))
            top1.append(logits.argmax(-1).numpy().astype(np.int32))
            nll.append((-logp.gather(1, target[:, None])[:, 0]).numpy().astype(np.float32))
    if not top1:
        raise SystemExit("no validation text is two tokens long")
    np.savez(out, ids=np.asarray(ids, np.int32), offsets=np.asarray(offsets, np.int64),
             top1=np.concatenate(top1), nll=np.concatenate(nll),
             params=np.int64(sum(p.numel() for p in model.parameters())), **lora)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
         sys.argv[6] if len(sys.argv) > 6 else None)
