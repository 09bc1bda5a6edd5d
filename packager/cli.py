"""The packager's `edgepack` commands (build, targets, inspect, verify, bench): thin Click commands
over the library. edgepack.cli assembles them with the fleet's into the one `edgepack` command and
alone maps the exception family to exit codes."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from edgebundle.errors import InputError, Reported
from edgeproto.cli_options import broker_from_options, broker_options
from packager.candidates import Search
from targets import CalibrationMethod, Precision

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ INFO/WARNING lines drown the report


@dataclass(frozen=True)
class Wiring:
    """What the assembled `edgepack` command hands these commands from the packager's peers."""

    device_profiler: Callable | None = None  # packager.options.Profiler, from the fleet side


pass_wiring = click.make_pass_decorator(Wiring, ensure=True)


def _progress(enabled: bool):
    t0 = time.perf_counter()

    def show(msg: str) -> None:
        if enabled:
            click.echo(f"[{time.perf_counter() - t0:6.1f}s] {msg}", err=True)

    return show


def _device_target(device: str | None, kw: dict, wiring: Wiring):
    """--profile-on with the broker options, as a DeviceTarget (None without --profile-on)."""
    if device is None:
        return None
    from packager.options import DeviceTarget

    return DeviceTarget(device=device, broker=broker_from_options(kw), profiler=wiring.device_profiler)


def _buckets(text: str | None) -> tuple[int, ...] | None:
    """--length-buckets: '32,128' -> (32, 128); 'none' -> (); unset -> None (from the data)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return ()
    try:
        out = tuple(int(v) for v in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise InputError(f"--length-buckets {text!r} is not a list of token counts",
                         hint="e.g. --length-buckets 32,128, or 'none' for one model at max_length")
    return out


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--target", "-t", "targets", multiple=True, required=True,
              help="Built-in target name or a profile .yaml (repeatable). See `edgepack targets list`.")
@click.option("--output", "-o", "out_dir", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
              help="Folder for the bundles.")
@click.option("--quantize", "precision", type=click.Choice([p.value for p in Precision] + ["int4"]), default="auto",
              show_default=True, help="Precision; auto = the fastest candidate that passes the gates, measured "
                                      "(a .tflite stays as it is). int4: causal LMs only.")
@click.option("--search", type=click.Choice([m.value for m in Search]), default="first", show_default=True,
              help="auto: keep the first candidate that passes (first) or try all and keep the fastest (thorough).")
@click.option("--calibration", help="Calibration data: .npz/.npy (first axis = samples), a folder of images, "
                                    "or 'random' (smoke tests only).")
@click.option("--calibration-samples", type=int, default=200, show_default=True)
@click.option("--calibration-method", type=click.Choice([m.value for m in CalibrationMethod]),
              help="ONNX static int8 calibration (default: the target's).")
@click.option("--per-channel/--per-tensor", default=None, help="ONNX int8 weight quantization granularity.")
@click.option("--validation", help=".npz with one array per input and optional labels 'y'; causal LMs: held-out "
                                   "text (.txt, one text per paragraph, or .jsonl with \"text\").")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,...",
              help="Fix dynamic dimensions of an input (repeatable).")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True,
              help="Accuracy gate: most points of accuracy (with labels) or top-1 agreement a bundle may lose.")
@click.option("--min-similarity", type=float, default=0.99, show_default=True,
              help="Accuracy gate for outputs that are not class scores: least cosine similarity to fp32 "
                   "(and relative error at most sqrt(2(1-s))).")
@click.option("--min-neighbours", type=click.FloatRange(0, 1), default=0.95, show_default=True,
              help="Accuracy gate for embeddings (unit-length vectors): least share of validation samples whose "
                   "nearest neighbour stays the same (0 switches the ranking check off).")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=None,
              help="Causal LMs: least teacher-forced top-1 agreement with the float model (default 0.85).")
@click.option("--max-ppl-ratio", type=click.FloatRange(1, None), default=None,
              help="Causal LMs: most perplexity, as a multiple of the float model's (default 1.10).")
@click.option("--context-length", type=click.IntRange(16, None), default=2048, show_default=True,
              help="Causal LMs: the context the device serves (its KV cache grows with it).")
@click.option("--chat-template", "chat_template", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Causal LMs: a Jinja chat template file for the bundle's chat endpoints, in place of the source's "
                   "(a GGUF or folder without one serves /v1/completions only).")
@click.option("--lora-slots", "lora_slots", metavar="r=RANK,targets=NAME,...|ADAPTER_DIR",
              help="Causal LMs: give the base LoRA slots (zero, so its outputs stay the base's) that adapter bundles "
                   "fill on the device without reloading it: a rank and projections (q_proj, k_proj, v_proj, o_proj, "
                   "gate_proj, up_proj, down_proj or all-linear), or a PEFT adapter folder to take them from.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Causal LMs: build this PEFT LoRA adapter folder into an adapter bundle for --base (MODEL: the "
                   "folder the base was built from, the float reference of the gate).")
@click.option("--base", "base_bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --adapter: the base bundle (built with --lora-slots) the adapter is pinned to.")
@click.option("--no-accuracy-gate", "no_gate", is_flag=True, help="Switch the accuracy gate off (the report says so).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Build cache: converted models kept by the model's bytes, data, options and tool versions, so "
                   "a rebuild converts nothing again (default: $EDGEPACK_CACHE_DIR or ~/.cache/edgepack/builds).")
@click.option("--no-cache", is_flag=True, help="Use no build cache: convert everything.")
@click.option("--overwrite", is_flag=True, help="Replace bundles of the same name, version and target in the output folder.")
@click.option("--no-speed-gate", "no_speed_gate", is_flag=True,
              help="Time nothing on this host: auto keeps the first candidate that passes the accuracy gate "
                   "(for loaded build hosts and CI, where timings are noise; the report says not timed).")
@click.option("--allow-flex", is_flag=True, help="Allow TF Select (Flex) ops in TFLite bundles.")
@click.option("--name", help="Bundle name (default: the model file's name).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Semantic version of the bundle.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset for TensorFlow sources.")
@click.option("--image-scale", type=float, default=1 / 255, show_default="1/255", help="Image folders: pixel scale.")
@click.option("--image-mean", help="Image folders: per-channel mean after scaling, e.g. 0.485,0.456,0.406.")
@click.option("--image-std", help="Image folders: per-channel std after scaling.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names, one per line, shipped in the bundle as labels.txt.")
@click.option("--tokenizer", type=click.Path(exists=True, path_type=Path),
              help="An ONNX text model's tokenizer.json (or the Hugging Face folder it came from): shipped in the "
                   "bundle, and .txt/.jsonl data is tokenized with it.")
@click.option("--length-buckets", "length_buckets",
              help="TFLite text models: the shorter sequence lengths converted beside max_length, e.g. 32,128, or "
                   "'none' (default: from the data's token lengths).")
@click.option("--sign-key", type=click.Path(exists=True, path_type=Path), help="Sign each bundle with this "
                                                                            "Ed25519 private key.")
@click.option("--json", "as_json", is_flag=True, help="Print one machine-readable report (docs/build-report.md).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the HTML report (default: NAME-VERSION-report.html next to the bundles).")
@click.option("--no-html", is_flag=True, help="Write no HTML report.")
@click.option("--profile-on", help="Device id: its agent measures the candidates (profile jobs over --broker) and "
                                   "its figures, not this host's, decide the speed gate.")
@broker_options
@pass_wiring
def build(wiring, model, targets, out_dir, precision, search, calibration, calibration_samples, calibration_method,
          per_channel, validation, input_shapes, max_accuracy_drop, min_similarity, min_neighbours, no_gate, cache_dir, no_cache, overwrite, no_speed_gate, allow_flex,
          name, version, opset, image_scale, image_mean, image_std, labels, tokenizer, length_buckets, sign_key, as_json, html_path, no_html, profile_on, **kw):
    """Convert MODEL (SavedModel dir, Hugging Face folder, .keras/.h5, .onnx, .tflite) into one bundle per target.
    With --adapter and --base: a LoRA adapter bundle for that base (MODEL: the folder the base was built from)."""
    if not Path(model).exists():  # said before the packager and its frameworks load
        raise InputError(f"model {str(model)!r} does not exist",
                         hint="pass a SavedModel directory, a Hugging Face folder, a .keras/.h5 file, an .onnx file "
                              "or a .tflite file")
    from targets import load_profile

    for t in targets:  # an unknown target or a malformed profile, said before the packager loads
        load_profile(t)
    from packager.llm.detect import is_causal_lm

    lora_slots, adapter, base_bundle = kw.pop("lora_slots"), kw.pop("adapter"), kw.pop("base_bundle")
    if kw.get("chat_template") and adapter:
        raise InputError("--chat-template goes with the base's build: an adapter bundle serves with its base's template",
                         hint="rebuild the base with --chat-template, then the adapter")
    if kw.get("chat_template") and not is_causal_lm(Path(model)):
        raise InputError(f"--chat-template is for causal LMs; {model} is not one",
                         hint="a chat template turns messages into a decoder's prompt: it has no use for this model")
    if (adapter is None) != (base_bundle is None):
        raise click.UsageError("--adapter and --base go together: the adapter folder and the base bundle it is for")
    if (adapter or lora_slots) and not is_causal_lm(Path(model)):
        raise InputError(f"--{'adapter' if adapter else 'lora-slots'} is for causal LMs; {model} is not one",
                         hint="MODEL is the Hugging Face causal-LM folder (or GGUF file) the base is built from")
    if adapter:
        if lora_slots:
            raise click.UsageError("--lora-slots builds a base; --adapter builds an adapter for one: pass one of them")
        return _build_adapter(model, adapter, base_bundle, targets, out_dir, validation, no_gate, overwrite, name,
                              version, sign_key, as_json, kw)
    if is_causal_lm(Path(model)):
        return _build_llm(model, targets, out_dir, precision, validation, no_gate, overwrite, name, version,
                          sign_key, as_json, dict(kw, cache_dir=cache_dir, no_cache=no_cache), lora_slots)
    if precision == "int4":
        raise InputError("--quantize int4 is for causal LMs (block-wise int4 weights of a decoder)",
                         hint="for this model use auto, int8, dynamic, dynamic-block, int16x8, fp16 or fp32")
    kw = {k: v for k, v in kw.items() if k not in _LLM_ONLY}
    buckets = _buckets(length_buckets)
    from packager.build import BuildOptions, build as run_build
    from packager.data import ImagePreprocessing
    from packager.report import build_table
    from packager.sources import parse_input_shapes
    from packager.store import default_dir as default_cache_dir

    prep = ImagePreprocessing(scale=image_scale, mean=_floats(image_mean) or (0.0,), std=_floats(image_std) or (1.0,))
    opts = BuildOptions(
        model=model, targets=tuple(targets), out_dir=out_dir, precision=Precision(precision), search=Search(search),
        calibration=calibration, calibration_samples=calibration_samples, validation=validation,
        input_shapes=tuple(parse_input_shapes(input_shapes).items()), max_accuracy_drop=max_accuracy_drop,
        min_similarity=min_similarity, min_neighbours=min_neighbours, accuracy_gate=not no_gate,
        speed_gate=not no_speed_gate, cache=not no_cache, cache_dir=cache_dir or default_cache_dir(), overwrite=overwrite, allow_flex=allow_flex, name=name, version=version, opset=opset, per_channel=per_channel,
        calibration_method=CalibrationMethod(calibration_method) if calibration_method else None,
        image_prep=prep, labels=labels, tokenizer=tokenizer, length_buckets=buckets, sign_key=sign_key,
        profile_on=_device_target(profile_on, kw, wiring))
    result = run_build(opts, progress=_progress(sys.stderr.isatty() or not as_json))
    report = result.to_dict()
    if not no_html:
        from packager import html_report

        page = html_report.write(report, html_path or out_dir / f"{result.name}-{result.version}-report.html")
        report["html"] = str(page)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(build_table(report))
        if not no_html:
            click.echo(f"\nreport: {report['html']}")
    failed = [r for r in result.results if not r.ok]
    if failed:
        raise Reported(failed[0].exc)


_LLM_ONLY = ("min_agreement", "max_ppl_ratio", "context_length", "chat_template")


def _llm_gate(kw, no_gate):
    from packager.llm import quality

    return quality.Gate(min_agreement=kw.get("min_agreement") or quality.MIN_AGREEMENT,
                        max_ppl_ratio=kw.get("max_ppl_ratio") or quality.MAX_PPL_RATIO, enabled=not no_gate)


def _build_llm(model, targets, out_dir, precision, validation, no_gate, overwrite, name, version, sign_key, as_json,
               kw, lora_slots=None) -> None:
    """A causal LM: its own pipeline (packager/llm/build.py) and table."""
    from packager.llm.build import LlmOptions, build as build_llm
    from packager.llm.lora import parse_slots
    from packager.llm.report import table
    from packager.store import default_dir as default_cache_dir

    if precision not in ("auto", "int4", "int8", "fp16", "fp32"):
        raise InputError(f"--quantize {precision} does not apply to a causal LM", hint="use auto, int4, int8, fp16 or fp32")
    opts = LlmOptions(model=Path(model), targets=tuple(targets), out_dir=Path(out_dir), name=name, version=version,
                      precision=precision, validation=Path(validation) if validation else None,
                      context_length=kw.get("context_length") or 2048, gate=_llm_gate(kw, no_gate), sign_key=sign_key,
                      overwrite=overwrite, lora_slots=parse_slots(lora_slots) if lora_slots else None,
                      cache=not kw.get("no_cache"), cache_dir=kw.get("cache_dir") or default_cache_dir(),
                      chat_template=kw.get("chat_template"))
    result = build_llm(opts, progress=_progress(sys.stderr.isatty() or not as_json))
    report = result.to_dict()
    click.echo(json.dumps(report, indent=2, default=str) if as_json else table(report))
    failed = [r for r in result.results if not r.ok]
    if failed:
        raise Reported(failed[0].exc)


def _build_adapter(model, adapter, base, targets, out_dir, validation, no_gate, overwrite, name, version, sign_key,
                   as_json, kw) -> None:
    """A LoRA adapter for a base bundle with slots: one adapter bundle (packager/llm/adapter.py)."""
    from packager.llm.adapter import AdapterOptions, build_adapter, table

    if len(targets) != 1:
        raise click.UsageError("an adapter is built for its base's one target: pass -t once")
    opts = AdapterOptions(model=Path(model), adapter=Path(adapter), base=Path(base), target=targets[0],
                          out_dir=Path(out_dir), name=name, version=version,
                          validation=Path(validation) if validation else None, gate=_llm_gate(kw, no_gate),
                          sign_key=sign_key, overwrite=overwrite)
    result = build_adapter(opts, progress=_progress(sys.stderr.isatty() or not as_json))
    report = result.to_dict()
    click.echo(json.dumps(report, indent=2, default=str) if as_json else table(report))


@click.group()
def targets() -> None:
    """List and show target profiles."""


@targets.command("list")
def targets_list():
    """Built-in target profiles."""
    from targets import builtin_names, load_profile  # built-ins: checked against the backends by the tests,
    # so listing them loads no backend (numpy, ONNX, TFLite code): an answer in well under a second

    for n in builtin_names():
        p = load_profile(n)
        click.echo(f"{p.name:<12} {p.format.value:<7} default {p.default_precision.value:<6} {p.description}")


@targets.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def targets_show(name, as_json):
    """Show a profile (built-in NAME or a .yaml path)."""
    from packager.profiles import load_profile

    p = load_profile(name)
    d = dict(p.to_dict(), sha256=p.sha256)
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            click.echo(f"{k:<22} {', '.join(map(str, v)) if isinstance(v, list) else v}")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle, as_json):
    """Show what a bundle holds (structure checked; use `verify` for hashes)."""
    from edgebundle.archive import open_bundle
    from packager.report import manifest_text

    b = open_bundle(bundle)
    if as_json:
        click.echo(json.dumps(dict(b.manifest.to_dict(), signed=b.signature is not None), indent=2))
    else:
        click.echo(manifest_text(b.manifest.to_dict(), signed=b.signature is not None))


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(path_type=Path),
              help="Also require a valid signature by one of these public keys (repeatable).")
def verify(bundle, pubkeys):
    """Re-check every file's size and sha256 against the manifest (and the signature)."""
    from edgebundle.archive import verify_bundle, verify_signed
    from edgebundle.signing import load_public_key

    if pubkeys:
        b, kid = verify_signed(bundle, [load_public_key(p) for p in pubkeys])
    else:
        b, kid = verify_bundle(bundle), None
    m = b.manifest
    click.echo(f"OK {bundle}: {len(m.files)} file(s) match the manifest "
               f"({m.name} {m.version}, {m.target.get('name')}, {m.format} {m.precision})"
               + (f"; signed by key {kid}" if kid else ("; signed (not checked: no --pubkey)" if b.signature
                                                        else "; unsigned")))


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--against", type=click.Path(path_type=Path),
              help="Another bundle (or .tflite/.onnx file) to compare with, interleaved in one process: "
                   "prints BUNDLE's latency as a ratio of AGAINST's with its spread.")
@click.option("--runs", type=int, default=200, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, help="Override the profile's thread count.")
@click.option("--max-seconds", type=float, default=20.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench(bundle, against, runs, warmup, threads, max_seconds, as_json):
    """Latency percentiles and throughput of BUNDLE on this host, with its runtime."""
    from edgeruntime.bench import bench_bundle, bench_text, compare_bundles, compare_text

    if against:
        res = compare_bundles(bundle, against, threads=threads, budget_s=max_seconds, max_rounds=runs)
        click.echo(json.dumps(res, indent=2) if as_json else compare_text(res))
        return
    stats, details = bench_bundle(bundle, warmup=warmup, runs=runs, max_seconds=max_seconds, threads=threads,
                                  allow_cpu_fallback=True)
    if as_json:
        click.echo(json.dumps({"bundle": str(bundle), "latency": stats.to_dict(), "runtime": details}, indent=2))
    else:
        click.echo(bench_text(stats.to_dict(), details))


COMMANDS = (build, targets, inspect, verify, bench)
