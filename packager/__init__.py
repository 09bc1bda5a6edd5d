"""edgepack packager: converts and quantizes trained models into verified bundles.

Library entry points (no Click needed): `packager.build.build`, `packager.inspect`."""

__version__ = "0.1.0"
