"""The edgepack bundle: one file holding a model, its manifest and golden I/O.

Shared by the packager (writes bundles) and the device agent (reads and verifies
them). Depends on the standard library and numpy only: never TensorFlow.
"""
from edgebundle.errors import (
    BundleError,
    EdgepackError,
    VerificationError,
)
from edgebundle.manifest import Manifest, RuntimeSpec, TensorSpec, SCHEMA
from edgebundle.archive import Bundle, open_bundle, verify_bundle, write_bundle

__all__ = [
    "Bundle",
    "BundleError",
    "EdgepackError",
    "Manifest",
    "RuntimeSpec",
    "SCHEMA",
    "TensorSpec",
    "VerificationError",
    "open_bundle",
    "verify_bundle",
    "write_bundle",
]
