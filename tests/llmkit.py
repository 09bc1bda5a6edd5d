"""Tiny real causal LMs made in the test: a byte-level BPE tokenizer trained on standard-library
docstrings, a 2-layer decoder (Llama-, Qwen2- or Gemma3-style config) trained for a few seconds on
the same text, so its next-token distributions are peaked the way a real model's are (a random
decoder's near-flat logits make every quantization gate a coin toss). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

from textkit import sentences

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def corpus(n: int = 500, *, seed: int = 0) -> list[str]:
    return sentences(n, seed=seed)


def _tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(kind: str, vocab: int, context: int):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                  bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if kind == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common, tie_word_embeddings=False)
    if kind == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=64, tie_word_embeddings=True)
    raise ValueError(f"unknown decoder kind {kind!r}")


def tiny_decoder(dest: Path, *, kind: str = "llama", steps: int = 120, seed: int = 0,
                 vocab_size: int = 512, context: int = 256) -> Path:
    """A Hugging Face causal-LM folder (config, safetensors, tokenizer, generation config, chat
    template) of a 2-layer decoder trained `steps` Adam steps on docstring sentences."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    texts = corpus()
    tok = _tokenizer(texts, vocab_size)
    tok.save_pretrained(dest)
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: one thread is faster, and leaves the other core to xdist
    model = AutoModelForCausalLM.from_config(_config(kind, len(tok), context))
    ids = [tok.bos_token_id] + [i for t in texts for i in tok.encode(t + "\n")]
    data = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (16,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    model.save_pretrained(dest)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=True, temperature=0.7,
                     top_p=0.9, max_new_tokens=48).save_pretrained(dest)
    (dest / "train_loss.txt").write_text(f"{loss.item():.4f}\n")
    return dest


if __name__ == "__main__":  # python tests/llmkit.py DEST [KIND]
    import sys
    import time

    t = time.perf_counter()
    out = tiny_decoder(Path(sys.argv[1]), kind=sys.argv[2] if len(sys.argv) > 2 else "llama")
    print(out, (out / "train_loss.txt").read_text().strip(), f"{time.perf_counter() - t:.1f} s")


GOLDEN_PROMPTS = ("The function returns", "This module provides", "Return a list of")


def genai_bundle(src: Path, out_dir: Path, *, target: str = "x86-cpu", precision: str = "int4",
                 version: str = "1.0.0", name: str = "tiny-llm", signer=None, work: Path | None = None,
                 lora_slots: str | None = None) -> Path:
    """A generative bundle of the folder `src` for `target` (one recipe, no search): export, golden
    prompts from the exported model's own greedy tokens, manifest, signed write. `lora_slots`: as
    `--lora-slots` takes it."""
    from packager.llm.export import Recipe, export
    from packager.llm.lora import parse_slots

    work = Path(work or out_dir / f".work-{name}-{version}-{target}")
    recipe = Recipe(precision, block_size=32 if precision == "int4" else None)
    ex = export(Path(src), work / recipe.label, recipe, context_length=256,
                lora=parse_slots(lora_slots) if lora_slots else None)
    return write_genai(ex, out_dir, target=target, version=version, name=name, signer=signer)


def write_genai(ex, out_dir: Path, *, target: str = "x86-cpu", version: str = "1.0.0", name: str = "tiny-llm",
                signer=None) -> Path:
    """The bundle of an exported decoder (packager.llm.export.Exported): golden prompts from its own greedy
    tokens, manifest, signed write."""
    from edgebundle.generation import GenerationDefaults
    from edgeruntime import LoadSpec, load_runtime
    from packager.llm import bundle
    from targets import load_profile

    profile = load_profile(target)
    rt = load_runtime(str(ex.folder / bundle.MODEL_FILE), LoadSpec(format="genai", threads=1))
    try:
        golden = []
        for p in GOLDEN_PROMPTS:
            ids = rt.encode(p)
            golden.append(bundle.Golden(p, tuple(ids), tuple(rt.greedy(ids, 8))))
    finally:
        rt.close()
    c = bundle.Contents(name=name, version=version, profile=profile, exported=ex,
                        defaults=GenerationDefaults(max_tokens=48, temperature=0.7, top_p=0.9),
                        golden=tuple(golden), threads=profile.threads,
                        providers=tuple(p for p in profile.providers if p == "CUDAExecutionProvider"))
    return bundle.write(c, out_dir, signer=signer)


def builder_jobs(jobs: list[dict]) -> None:
    """Run the model builder child (packager.llm.ogbuild) on raw jobs ({"src", "out", "precision", "ep",
    "options", "lora"}) in one process: several exports for the price of one torch import."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([dict({"ep": "cpu", "options": [], "lora": None}, **j) for j in jobs], f)
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.run([sys.executable, "-m", "packager.llm.ogbuild", f.name], capture_output=True, text=True,
                              env=env)
    finally:
        os.unlink(f.name)
    for j in jobs:
        status = Path(f"{j['out']}.status")
        said = status.read_text() if status.exists() else proc.stderr[-2000:]
        assert said == "ok", said
        status.unlink()


ADAPTER_TEXT = ("Edge devices answer in French. Bonjour, je suis un petit modele. Merci beaucoup, au revoir. ")


def train_adapter(base: Path, dest: Path, *, rank: int = 4, targets=("q_proj", "v_proj", "down_proj"),
                  steps: int = 40, seed: int = 0) -> Path:
    """A PEFT LoRA adapter of the causal-LM folder `base` trained `steps` Adam steps on ADAPTER_TEXT
    repeated: distinctive enough that the adapted model's greedy text differs from the base's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
    ids = tok(ADAPTER_TEXT * 24)["input_ids"]
    data = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.set_num_threads(threads)
    model.save_pretrained(dest)
    return Path(dest)
