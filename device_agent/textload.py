"""A text bundle's tokenizer on the device: its settings as the manifest gives them (an older TFLite
bundle's fixed length included) and the parity check against the build's token ids."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgeruntime.text import TextEncoder, TextSettings, parity_problems
from edgebundle.errors import BundleError, InputError, RuntimeUnavailableError, VerificationError
from edgebundle.manifest import Manifest


def text_encoder(m: Manifest, model_dir: Path, bundle_name: str) -> TextEncoder | None:
    """A text bundle's tokenizer, after its parity check: the golden texts must give the ids the
    build computed, or a drifted tokenizer library would feed the model other tokens than it was
    validated on. None where `tokenizers` is not installed (token tensors still work)."""
    if not m.text:
        return None
    try:
        settings = _fixed_length(TextSettings.from_dict(m.text["settings"]), m)
        enc = TextEncoder.from_file(model_dir / m.text["tokenizer"], settings)
    except RuntimeUnavailableError:
        return None
    except InputError as e:
        raise BundleError(f"{bundle_name}: {e}") from None
    problems = parity_problems(enc, m.text["golden_texts"], m.text["golden_ids"])
    if problems:
        raise VerificationError(f"{bundle_name}: this device's tokenizer does not reproduce the bundle's golden "
                                f"token ids ({len(problems)} of {len(m.text['golden_texts'])} texts differ)",
                                problems=problems, hint="install the tokenizers version the bundle was built with "
                                                        "(see its provenance), or rebuild the bundle")
    return enc


def _fixed_length(settings: TextSettings, m: Manifest) -> TextSettings:
    """A text model with a fixed sequence length and no buckets (a TFLite bundle of an older edgepack)
    takes every text padded to that length, and cut there."""
    sig = (m.inputs[0].shape_signature or m.inputs[0].shape) if m.inputs else ()
    if settings.buckets or len(sig) != 2 or sig[1] <= 0:
        return settings
    n = min(settings.max_length, sig[1])
    return replace(settings, max_length=n, buckets=(n,))
